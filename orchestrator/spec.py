"""Typed job specs: one dataclass per section, validated, with dotted command-line overrides.

A job file builds a `JobSpec` in a few lines; `launch.main` applies `section.key=value`
overrides and validates everything before anything runs. Each component receives only its own
section (the data pipeline gets `spec.data`, the optimizer `spec.optim`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import signal
from dataclasses import dataclass, field
from typing import Any, Literal

# the value layer, re-exported: callers import these names from here
from orchestrator.spec_values import (
    SpecError,
    check_name,
    check_ranges,
    field_type,
    from_dict,
    parse_override,
    parse_value,
)
from orchestrator.storage import check_url
from orchestrator.tracking.metrics import CHECKPOINT_METRICS
from orchestrator.tracking.tags import free_tag_problem

__all__ = [
    "SpecError",
    "check_name",
    "check_ranges",
    "from_dict",
    "parse_value",
]


@dataclass
class ModelConfig:
    name: str = "resnet50"
    num_classes: int | None = None  # None: taken from the dataset's manifest
    shortcut: Literal["A", "B", "C"] | None = None  # None: the net's paper default
    stride_in_1x1: bool | None = None  # None: the paper's v1 placement where the net has one
    zero_init_residual: bool = False
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        check_ranges("model", self, num_classes=">= 1")

    def options(self) -> dict[str, Any]:
        """The options create_model takes; unset ones keep the net's defaults."""
        opts = {"shortcut": self.shortcut, "stride_in_1x1": self.stride_in_1x1}
        opts = {k: v for k, v in opts.items() if v is not None}
        if self.zero_init_residual:
            opts["zero_init_residual"] = True
        return opts


@dataclass
class DataConfig:
    """The job spec's `data` section."""

    url: str = ""  # dataset root (s3://..., http(s)://... or a local dir); "" = synthetic
    source: Literal["shards", "synthetic"] = "shards"  # synthetic: random batches on the device
    train_split: str = "train"
    val_split: str = "val"
    # paper: shorter side ~U[256,480], random crop, flip (+ PCA lighting on the device);
    # rrc: RandomResizedCrop(0.08-1, 3/4-4/3) + flip; cifar: pad 4, random crop, flip
    train_transform: Literal["paper", "rrc", "cifar"] = "paper"
    image_size: int = 224  # train crop and eval crop (32 for CIFAR)
    eval_resize: int = 256  # centre protocol: shorter side, then the centre image_size crop
    scale_range: tuple[int, int] = (256, 480)
    pca_lighting: float = 0.1  # AlexNet PCA lighting std; 0 disables
    # per_channel: (x - mean) / std with the manifest's per-channel mean and std;
    # per_pixel_mean: the paper's form, x minus the dataset's mean image (resized to the batch's
    # H x W where they differ), divided by one scalar (the RMS of the per-channel stds, so the
    # input keeps the scale per_channel gives); needs a dataset converted with its mean image
    normalize: Literal["per_channel", "per_pixel_mean"] = "per_channel"
    num_workers: int = 4  # DataLoader workers per rank (0: decode in the training process)
    prefetch_factor: int = 2  # batches each worker keeps ready
    shuffle_buffer: int = 1000  # samples (raw bytes) each canonical stream mixes
    # canonical streams of an epoch (orchestrator/data/epochs.py): the data order depends on
    # them, never on the world size or the loader workers. 0: the most workers x
    # max(1, data.num_workers), so that at the largest world size each loader worker reads one
    streams: int = 0
    # keep every optimizer step's sample ids with the checkpoints (python -m
    # orchestrator.data.ledger reads them back: duplicates and drops per epoch)
    ledger: bool = False
    max_bad_fraction: float = 0.01
    bad_check_after: int = 200  # samples seen before max_bad_fraction is enforced
    # check each shard's sha256 against the manifest as it streams (a mismatch stops the job,
    # naming the shard: orchestrator/data/tar.py); false reads shards unchecked, said once
    verify_shards: bool = True
    epoch_mode: Literal["exact", "resampled"] = "exact"
    samples_per_epoch: int = 0  # resampled mode: epoch length in samples (0 = split size)
    # multiscale evaluation: decoded images a worker may hold back (MiB) to fill batches of one
    # shape (`batches_by_shape`); at shorter side 640 a 4:3 image takes 1.6 MB, so the default
    # holds a few batches of 64 at the paper's largest scale
    eval_hold_mb: int = 512
    timeout_s: float = 300.0  # longest wait for one batch from a worker, then an error
    io_retry_s: float = 120.0  # how long a broken stream keeps being reopened
    # gpu: workers only check JPEG headers and ship the bytes; the training device decodes them
    # (nvJPEG) and augments the batch in one pass (orchestrator.data.gpu_augment). split: workers
    # decode a share of each batch, the device the rest (see `MixedBatch`)
    decode: Literal["cpu", "gpu", "split"] = "cpu"
    split_cpu_share: float = 0.5  # decode=split: share of each batch the workers decode, at start
    # decode=split: the loop moves the share so that neither side waits (else it stays fixed,
    # and the run is reproducible: which sample is augmented where depends on the share)
    split_adapt: bool = True
    synthetic_samples: int = 1_281_167  # synthetic source: samples per epoch
    synthetic_classes: int = 1000

    def __post_init__(self) -> None:
        if self.url:  # read only: http(s) too (the loader streams it)
            check_url(self.url, "data.url", write=False)
        self.scale_range = (int(self.scale_range[0]), int(self.scale_range[1]))
        choices = {
            "source": ("shards", "synthetic"),
            "train_transform": ("paper", "rrc", "cifar"),
            "epoch_mode": ("exact", "resampled"),
            "decode": ("cpu", "gpu", "split"),
            "normalize": ("per_channel", "per_pixel_mean"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.decode != "cpu" and self.train_transform == "cifar":
            raise ValueError(
                f"data.decode={self.decode} does the paper and rrc transforms; "
                "use decode=cpu for cifar"
            )
        check_ranges("data", self, split_cpu_share="0..1", max_bad_fraction="0..1")
        if self.train_transform == "paper" and self.scale_range[0] < self.image_size:
            raise ValueError(
                f"data.scale_range {self.scale_range} starts below image_size {self.image_size}"
            )
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"data.scale_range {self.scale_range}: low > high")
        check_ranges(
            "data",
            self,
            image_size=">= 1",
            eval_resize=">= 1",
            pca_lighting=">= 0",
            num_workers=">= 0",
            prefetch_factor=">= 1",
            shuffle_buffer=">= 0",
            streams=">= 0",
            bad_check_after=">= 0",
            samples_per_epoch=">= 0",
            eval_hold_mb=">= 1",
            timeout_s="> 0",
            io_retry_s=">= 0",
            synthetic_samples=">= 1",
            synthetic_classes=">= 1",
        )

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic" or not self.url


@dataclass
class OptimConfig:
    name: Literal["sgd"] = "sgd"
    lr: float | None = None  # None: base_lr x global_batch / 256 (the linear scaling rule)
    base_lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    # pytorch: v = m*v + g, w -= lr*v; caffe (the authors'): v = m*v + lr*g, w -= v. They differ
    # only after an lr change, where caffe's velocity still carries the old lr's steps
    momentum_form: Literal["pytorch", "caffe"] = "pytorch"

    def __post_init__(self) -> None:
        if self.momentum_form not in ("pytorch", "caffe"):
            raise ValueError(
                f"optim.momentum_form={self.momentum_form!r}: expected one of ('pytorch', 'caffe')"
            )
        check_ranges(
            "optim",
            self,
            lr="> 0",
            base_lr="> 0",
            momentum="0..1",
            weight_decay=">= 0",
            label_smoothing="0..1",
        )


@dataclass
class ScheduleConfig:
    kind: Literal["step", "plateau", "cosine"] = "step"
    max_iters: int = 600_000
    milestones: list[int] = field(default_factory=list)  # step: iterations where lr *= gamma
    gamma: float = 0.1
    warmup_iters: int = 0  # lr x warmup_factor until this iteration (ResNet-110's 0.01 start)
    warmup_factor: float = 0.1
    warmup_linear: bool = False  # ramp linearly from warmup_factor instead of a constant
    # lr x warmup_factor until the training error (all ranks, the last warmup_check_every
    # steps) is below this fraction, then the schedule's lr: ResNet-110's "0.01 until the
    # training error is below 80%". None: no such rule (warmup_iters decides)
    warmup_until_train_err: float | None = None
    warmup_check_every: int = 20  # steps per decision window of warmup_until_train_err
    plateau_patience: int = 3  # plateau: evaluations without improvement before lr *= gamma
    plateau_threshold: float = 1e-3  # improvement smaller than this (absolute) does not count
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        check_ranges(
            "schedule",
            self,
            max_iters=">= 1",
            gamma="> 0",
            warmup_iters=">= 0",
            warmup_factor="0..1",
            warmup_until_train_err="0..1",
            warmup_check_every=">= 1",
            plateau_patience=">= 0",
            plateau_threshold=">= 0",
            min_lr=">= 0",
        )
        if self.warmup_until_train_err is not None and (self.warmup_iters or self.warmup_linear):
            raise ValueError(
                "schedule.warmup_until_train_err: set either it or schedule.warmup_iters / "
                "warmup_linear (a fixed warm-up), not both; e.g. schedule.warmup_iters=0 and "
                "schedule.warmup_linear=false to warm up by the error rule"
            )


@dataclass
class ScalingConfig:
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    # the most workers; written [min, max] (e.g. scaling.num_workers=[2,8]) the job is elastic:
    # it runs on as many as the cluster has in that range, min_workers holding the min
    num_workers: int = 1
    min_workers: int = 0  # 0: not elastic (always num_workers)
    use_gpu: bool | None = None  # None: use GPUs where the machine or cluster has them
    cpus_per_worker: float = 1.0
    global_batch: int = 256
    micro_batch: int | None = None  # per worker per step; None: global_batch / num_workers
    zero_stage: Literal[0, 1, 2] = 0  # deepspeed only
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 3
    # node reclaims (a spot instance's notice, a drain) Ray restarts the job after, counted
    # apart from max_failures (Ray's FailureConfig.max_preemption_failures); -1: no limit
    max_preemption_failures: int = -1
    # an elastic job: how often Ray looks for room to grow the worker group back towards the
    # most workers (ScalingConfig.elastic_resize_monitor_interval_s); a resize restarts the
    # group, from the step it was on (every worker commits it first: ray_callbacks.py)
    resize_interval_s: float = 60.0
    torch_threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        check_ranges(
            "scaling",
            self,
            num_workers=">= 1",
            min_workers=">= 0",
            cpus_per_worker=">= 0",
            global_batch=">= 1",
            micro_batch=">= 1",
            max_failures=">= -1",  # Ray's -1: retry without end
            max_preemption_failures=">= -1",
            resize_interval_s=">= 0",
            torch_threads=">= 0",
        )
        if self.min_workers > self.num_workers:
            raise ValueError(
                f"scaling.min_workers={self.min_workers} is above num_workers="
                f"{self.num_workers}: write the range as scaling.num_workers=[min,max]"
            )

    @staticmethod
    def normalize_input(data: dict[str, Any]) -> dict[str, Any]:
        """`num_workers: [min, max]` (the elastic form) -> min_workers and num_workers."""
        workers = data.get("num_workers")
        if not isinstance(workers, (list, tuple)):
            return data
        if len(workers) != 2 or not all(type(w) is int for w in workers):
            raise SpecError(
                f"scaling.num_workers: {list(workers)!r}: write one count (e.g. 8) or a range "
                "of two counts [min, max] (e.g. [4,8]) for an elastic job"
            )
        return {**data, "min_workers": workers[0], "num_workers": workers[1]}

    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers the job runs on; equal when it is not elastic."""
        return (self.min_workers or self.num_workers, self.num_workers)

    @property
    def elastic(self) -> bool:
        return bool(self.min_workers) and self.min_workers < self.num_workers


@dataclass
class CheckpointConfig:
    storage: str = "s3://resnet/runs"  # Ray Train storage: s3://BUCKET/PREFIX or a local folder
    every_iters: int = 1000
    every_minutes: float = 0.0  # also save once this long passed since the last save (0: off)
    at_epoch_end: bool = True
    keep_last: int = 2
    best_metric: str = "val/top1_err"  # lower is better (orchestrator.tracking.metrics names)
    resume_from: str | None = None  # fork from any checkpoint (s3://... or a folder)
    shared_filesystem: bool = False  # a local `storage` every Ray node mounts (preflight)
    # Without Ray: SIGTERM, and this signal too (Slurm's --signal=USR1@120 -> "SIGUSR1"), save
    # at the next step boundary, which must come within grace_s (orchestrator.preemption)
    preempt_signal: str = "SIGTERM"
    grace_s: float = 120.0
    # On Ray: ask Ray every this many optimizer steps whether a node of the job is being
    # reclaimed (a barrier of every rank; bench/step_boundary.py measures its cost)
    preemption_poll_every: int = 10

    def __post_init__(self) -> None:
        # keep_last=0 would let retention delete the checkpoint it has just committed
        check_ranges(
            "checkpoint",
            self,
            every_iters=">= 0",
            every_minutes=">= 0",
            keep_last=">= 1",
            grace_s="> 0",
            preemption_poll_every=">= 1",
        )
        check_url(self.storage, "checkpoint.storage", write=True)
        if self.resume_from:  # read through the checkpoint store: a folder or s3://
            check_url(self.resume_from, "checkpoint.resume_from", write=False, http=False)
        check_preempt_signal(self.preempt_signal)
        if self.best_metric not in CHECKPOINT_METRICS:  # else no step would ever be the best
            raise ValueError(
                f"checkpoint.best_metric: {self.best_metric!r} is not a figure a checkpoint "
                f"records; one of {', '.join(CHECKPOINT_METRICS)}"
            )


# signals a preemption notice cannot be: uncatchable, the grace timer's, the data loader's
# child watch, or a fault that interrupts the step it is raised in
NOT_PREEMPT_SIGNALS = {"SIGKILL", "SIGSTOP", "SIGALRM", "SIGCHLD", "SIGSEGV", "SIGBUS", "SIGFPE"}


def check_preempt_signal(name: str) -> None:
    """Raise ValueError unless `name` is a signal Python knows and the loop can wait on."""
    allowed = sorted(s.name for s in signal.Signals if s.name not in NOT_PREEMPT_SIGNALS)
    if name not in allowed:
        hint = f" (did you mean SIG{name}?)" if f"SIG{name}" in allowed else ""
        raise ValueError(
            f"checkpoint.preempt_signal={name!r} is not a signal a preemption notice can be"
            f"{hint}: one of {', '.join(allowed)}"
        )


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "resnet"
    log_every: int = 50
    # at the job's end, the driver registers its best and last checkpoints as MLflow models and
    # writes its paper report (orchestrator.publish.finished); false: neither (a smoke run, CI)
    publish: bool = True
    parent_run_id: str | None = None  # nest the job's run under this one (a study's parent)
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags (a study's name, cell)

    def __post_init__(self) -> None:
        check_ranges("tracking", self, log_every=">= 1")  # the loop logs at step % log_every


@dataclass
class EvalConfig:
    """Validation during and after training (orchestrator.evaluation): center = shorter side
    data.eval_resize, centre data.image_size crop; ten_crop = 4 corners + centre and their
    flips; multiscale = whole images at each of `scales` (and mirrored), fully convolutional."""

    every_iters: int = 5000
    at_end: bool = True
    protocol: Literal["center", "ten_crop", "multiscale"] = "center"
    scales: list[int] = field(default_factory=lambda: [224, 256, 384, 480, 640])  # multiscale
    flips: bool = True  # multiscale: also the mirrored image
    bn_recalibrate: int = 0  # > 0: evaluate a copy with BN statistics averaged over N train batches
    batch_size: int = 100
    max_batches: int = 0  # 0: the whole validation split

    def __post_init__(self) -> None:
        check_ranges(
            "eval",
            self,
            every_iters=">= 0",
            bn_recalibrate=">= 0",
            batch_size=">= 1",
            max_batches=">= 0",
        )
        if not self.scales or any(not s >= 1 for s in self.scales):
            raise ValueError(f"eval.scales={self.scales}: set one or more sizes >= 1")


SEED_MAX = 2**32 - 1


@dataclass
class JobSpec:
    name: str
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_ranges("", self, seed=f"0..{SEED_MAX}")  # numpy's generators take no more

    def micro_batch(self, world_size: int | None = None) -> int:
        """The most samples a worker takes per micro-batch at `world_size` (default: the most
        workers): scaling.micro_batch, or the worker's whole share of a step."""
        per_worker = -(-self.scaling.global_batch // (world_size or self.scaling.num_workers))
        return min(self.scaling.micro_batch or per_worker, per_worker)

    def accumulation(self, world_size: int | None = None) -> int:
        """Micro-batches per optimizer step, so that the global batch is what the spec says at
        every world size (workers' shares differ by at most one sample: orchestrator.data.epochs
        weighs each sample's loss alike)."""
        w = world_size or self.scaling.num_workers
        return -(-self.scaling.global_batch // (w * self.micro_batch(w)))

    def lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.base_lr * self.scaling.global_batch / 256

    def validate(self) -> JobSpec:
        """Check cross-field rules; raises SpecError naming the field and the fix."""
        s = self.scaling
        check_name(self.name, "name")
        if s.global_batch < s.num_workers:
            raise SpecError(
                f"scaling.global_batch: {s.global_batch} is smaller than "
                f"num_workers {s.num_workers}: "
                f"every worker needs at least one sample per step; raise scaling.global_batch"
            )
        if s.strategy == "ddp" and s.zero_stage:
            raise SpecError("scaling.zero_stage: set only with scaling.strategy=deepspeed")
        if self.schedule.kind == "plateau" and self.eval.every_iters <= 0:
            raise SpecError("schedule.kind=plateau needs validation: set eval.every_iters > 0")
        if any(m <= 0 for m in self.schedule.milestones) or self.schedule.milestones != sorted(
            self.schedule.milestones
        ):
            raise SpecError(f"schedule.milestones: {self.schedule.milestones} must rise and be > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {"optim.lr": 0.1} (MLflow params, diffs between runs)."""
        return _flatten(self.to_dict())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------- building and overrides


def apply_overrides(spec: JobSpec, overrides: list[str]) -> JobSpec:
    """`section.key=value` strings -> a new, type-checked spec. Below a free mapping the rest
    of the path is the key: tracking.tags.team=vision."""
    data = spec.to_dict()
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override {item!r}: expected section.key=value, e.g. optim.lr=0.2")
        path, text = item.split("=", 1)
        tp, free = field_type(JobSpec, path.split("."))
        parts = path.split(".")
        *parents, leaf = parts[: len(parts) - len(free)] + ([".".join(free)] if free else [])
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SpecError(f"{path}: '{part}' is not a section; sections: {_sections()}")
            node = node[part]
        if leaf not in node and not free:
            where = ".".join(parents) or "spec"
            raise SpecError(f"{path}: unknown key in '{where}'; valid keys: {', '.join(node)}")
        node[leaf] = parse_override(tp, text)
        if path.startswith("tracking.tags"):
            given = {leaf: node[leaf]} if free else node[leaf]
            _check_free_tags(given if isinstance(given, dict) else {}, path)
        given_min = any(o.startswith("scaling.min_workers=") for o in overrides)
        if path == "scaling.num_workers" and isinstance(node[leaf], int) and not given_min:
            node["min_workers"] = 0  # one count: a fixed size, unless min_workers is given too
    return from_dict(JobSpec, data).validate()


def _check_free_tags(tags: dict[str, Any], path: str) -> None:
    """Refuse a user's tag the project or MLflow writes itself, or one MLflow cannot keep."""
    for key, value in tags.items():
        problem = free_tag_problem(str(key), value if isinstance(value, str) else "")
        if problem:
            where = path if path != "tracking.tags" else f"tracking.tags.{key}"
            raise SpecError(f"{where}: {problem}")


def _sections() -> str:
    return ", ".join(f.name for f in dataclasses.fields(JobSpec) if f.name not in ("name", "seed"))


def to_yaml(config: Any) -> str:
    """A readable dump of a resolved spec or any other config dataclass (no YAML library
    needed on GPU boxes)."""
    lines: list[str] = []

    def emit(d: dict[str, Any], indent: int) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                lines.append(" " * indent + f"{key}:")
                emit(value, indent + 2)
            else:
                lines.append(" " * indent + f"{key}: {json.dumps(value)}")

    emit(dataclasses.asdict(config), 0)
    return "\n".join(lines) + "\n"
