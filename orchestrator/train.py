"""The per-worker loop: build, resume, step, evaluate, checkpoint, report.

It needs only torch (and the data pipeline): Ray, MLflow and DeepSpeed are reached through
`Runtime.report`, the tracker and the strategy, so `--local` runs the same code where Ray is
absent. One code path for precision: bf16 autocast where the device is a GPU, fp32 on CPU.
Checkpoints are the Checkpointer's business (orchestrator.checkpoint); metric names follow
orchestrator.tracking.metrics.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator import startup_clock
from orchestrator.checkpoint import Checkpointer, best_checkpoint, rng_state, set_rng_state
from orchestrator.checkpoint_refs import spec_checkpoints_url
from orchestrator.cli import setup_logging
from orchestrator.data import (
    DataError,
    DeviceNormalize,
    MixedBatch,
    SplitBalancer,
    split_batch,
)
from orchestrator.data.device_copy import ahead_to_device
from orchestrator.data.epochs import at_epoch_boundary, resume_problem, spread
from orchestrator.data.gpu_augment import (
    DeviceAugment,
    decode_jpegs,
    nvjpeg_fallbacks,
    replace_undecodable,
)
from orchestrator.data.ledger import Ledger
from orchestrator.errors import OrchestratorError
from orchestrator.metrics_window import (
    MetricsWindow,
    final_line,
    marker_metrics,
    progress_line,
    warmup_decision,
)
from orchestrator.models import create_model, unwrap
from orchestrator.preemption import StepBoundary, resize_committed
from orchestrator.runtime import Runtime, Terminated, all_reduce
from orchestrator.schedule import LRSchedule
from orchestrator.spec import JobSpec, SpecError
from orchestrator.strategy import build_strategy
from orchestrator.tracking.lineage import manifest_sha256
from orchestrator.tracking.redaction import scrub
from orchestrator.tracking.tags import (
    DATASET_TAG,
    DEVICE_TAG,
    MANIFEST_TAG,
    MODEL_TAG,
    NUM_CLASSES_TAG,
    PARENT_TAG,
    STRATEGY_TAG,
    WORLD_SIZE_TAG,
)
from orchestrator.tracking.tracker import NullTracker, Tracker, job_run_url, start_tracker
from orchestrator.train_data import adopt_streams, data_position, open_ledger, train_loader

log = logging.getLogger(__name__)


class NonFiniteLoss(OrchestratorError, FloatingPointError):
    """The loss went NaN/inf; the same spec from the same checkpoint would again."""

    retryable = False  # orchestrator.runtime.retryable: fail the job at once


class Trainer:
    """Stateful trainer: everything needed to resume lives in state_dict()."""

    def __init__(self, spec: JobSpec, rt: Runtime) -> None:
        self.spec, self.rt = spec, rt
        random.seed(spec.seed + rt.rank)
        np.random.seed(spec.seed + rt.rank)
        torch.manual_seed(spec.seed)  # same init everywhere; DDP also broadcasts rank 0's
        if spec.scaling.torch_threads:
            torch.set_num_threads(spec.scaling.torch_threads)
        self.device = rt.device
        self.bf16 = spec.scaling.precision == "bf16" or (
            spec.scaling.precision == "auto" and self.device.type == "cuda"
        )
        self.loader = train_loader(spec, rt)
        self.micro_cap = spec.micro_batch(rt.world_size)
        self.num_classes = spec.model.num_classes or self.loader.num_classes
        model = create_model(spec.model.name, self.num_classes, **spec.model.options())
        model = model.to(self.device)
        if spec.model.channels_last:
            # torch's stubs leave out Module.to's memory_format keyword, which it takes
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.strategy = build_strategy(
            spec.scaling,
            spec.optim,
            model,
            lr=spec.lr(),
            micro_batch=self.micro_cap,
            accumulation=spec.accumulation(rt.world_size),
            device=self.device,
            bf16=self.bf16,
        )
        self.forward = step_forward(self.strategy.model, spec.model.compile, self.device)
        self.normalize = DeviceNormalize(
            self.loader.mean,
            self.loader.std,
            spec.data.pca_lighting,
            self.device,
            mean_image=self.loader.mean_image,
        )
        self.augment: DeviceAugment | None = None
        self.balancer = None
        if spec.data.decode != "cpu" and not spec.data.synthetic:
            # crops stay 0-255: self.normalize adds lighting and mean/std
            self.augment = DeviceAugment(
                spec.data.train_transform,
                spec.data.image_size,
                mean=(0.0, 0.0, 0.0),
                std=(1.0, 1.0, 1.0),
                scale_range=spec.data.scale_range,
                device=self.device,
            )
            if spec.data.decode == "split" and spec.data.split_adapt:
                self.balancer = SplitBalancer(self.loader)
        self.schedule = LRSchedule(spec.schedule, spec.lr())
        self.checkpointer = Checkpointer(  # markers record the spec a resubmission is checked on
            spec.checkpoint, spec_checkpoints_url(spec), rt.rank, spec.to_dict()
        )
        self.boundary = StepBoundary(spec.checkpoint, rt.rank)  # preemption, every_minutes
        self.manifest_sha256 = manifest_sha256(self.loader.manifest)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.step_in_epoch = 0  # optimizer steps of this epoch done
        self.samples_seen = 0
        self.window = MetricsWindow(self.device)
        self.latest: dict[str, float] = {}  # the newest value of every metric published
        self._measured_at: dict[str, int] = {}  # the step each of them was published at
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None  # this epoch's
        self._nonfinite = torch.zeros((), device=self.device)  # set on device, read at checks
        # schedule.warmup_until_train_err: top-1 hits (on the device) and samples since the
        # rule's last decision
        self._warmup_hits = torch.zeros((), device=self.device)
        self._warmup_samples = 0
        self._lr = spec.lr()  # the lr of the newest optimizer step
        self._finite_step = 0  # steps up to here were checked finite
        self.tracker: Tracker = NullTracker()
        self.ledger: Ledger | None = None  # data.ledger: opened by fit()
        self.tracking_run_id: str | None = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The replicated state (rank 0 writes it)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "samples_seen": self.samples_seen,
            "schedule": self.schedule.state_dict(),
            "strategy": self.strategy.state_dict(),
            "spec": self.spec.to_dict(),
            "manifest_sha256": self.manifest_sha256,
            "position": self.data_position(),
            "cpu_decode_share": self.loader.cpu_share,
            # the tracker opens its run late when MLflow was down at the start
            "tracking_run_id": self.tracker.run_id or self.tracking_run_id,
        }

    def data_position(self) -> dict[str, Any]:
        """Where the data stream stands (orchestrator.train_data.data_position). Also in the
        commit marker, for the pre-flight."""
        return data_position(self.spec, self.loader, self.epoch, self.step_in_epoch, self.rt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["manifest_sha256"] != self.manifest_sha256:
            log.warning("the dataset manifest changed since this checkpoint was written")
        saved = state["position"]
        adopt_streams(self.spec, self.loader, saved, self.rt.rank)
        problem = resume_problem(saved, self.data_position())
        if problem:  # before any weights are loaded; a restart would not change it
            raise SpecError(f"step {state['step']}: {problem}")
        self.strategy.load_state_dict(state["strategy"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.samples_seen = state["samples_seen"]
        self.step_in_epoch = state.get("step_in_epoch", state.get("batch_in_epoch", 0))
        if self.step_in_epoch and at_epoch_boundary(saved):
            # the epoch ran out at that step: start the next one (its M may differ from the
            # saved one when the global batch changed)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.tracking_run_id = state.get("tracking_run_id")
        if self.spec.data.decode == "split":  # resume at the balance found, not at the start
            self.loader.cpu_share = state.get("cpu_decode_share", self.loader.cpu_share)

    def rank_state(self) -> dict[str, Any]:
        """What differs per rank: RNG streams (the data position is in the replicated state)."""
        # the schedule is replicated; a copy per rank lets tests prove every rank decided alike
        return {
            "rng": rng_state(),
            "rank": self.rt.rank,
            "world_size": self.rt.world_size,
            "schedule": self.schedule.state_dict(),
            "step": self.step,
            "pid": os.getpid(),
            "node": self.rt.node,
        }

    def save_checkpoint(self, measured: dict[str, float]) -> float:
        """Snapshot every rank's state (committed at the next save or the end); returns the
        stall (s) training paid; `measured`: figures of this step not yet published."""
        metrics = marker_metrics(self.latest, self._measured_at, self.step, measured)
        self._check_finite()  # never save weights a non-finite loss has touched
        if self.ledger is not None:  # the steps this checkpoint holds, before its marker
            self.ledger.flush()
        states: dict[str, Any] = {f"rank-{self.rt.rank:05d}.pt": self.rank_state()}
        if self.rt.rank == 0:
            states["trainer.pt"] = self.state_dict()
        return self.checkpointer.save(
            self.step, states, self.strategy.save_shards, metrics, self.data_position()
        )

    def resume(self) -> bool:
        """Load the latest committed checkpoint of this job (or --resume-from's); True if any."""
        restored = self.checkpointer.restore(self.load_state_dict, self.strategy.load_shards)
        if restored is None:
            return False
        self._finite_step = self.step
        if restored.rank is not None:
            set_rng_state(restored.rank["rng"])
        else:  # a different world size, allowed at an epoch boundary (load_state_dict)
            log.warning("no RNG state for rank %d at step %d; reseeding", self.rt.rank, self.step)
        log.info("rank %d resumed from %s step %d", self.rt.rank, restored.root, restored.step)
        return True

    # ------------------------------------------------------------------ steps

    def _next_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next optimizer step, from where the trainer stands."""
        if self._batches is None:
            self.loader.set_epoch(self.epoch, self.step_in_epoch)
            self._batches = ahead_to_device(iter(self.loader), self.device)
            if self.balancer is not None:
                self.balancer.new_epoch()
        t_wait = time.perf_counter()
        images, labels = next(self._batches)
        startup_clock.mark("first batch")  # once: the clock stops at step 1
        waited = time.perf_counter() - t_wait
        self.window.wait_s += waited
        if self.balancer is not None:
            self.balancer.observe(waited)
        return images, labels

    def _micro_step(
        self, images: torch.Tensor, labels: torch.Tensor, last: bool, weight: float, micro: int
    ) -> None:
        """Forward and backward of one micro-batch; `weight` scales its mean loss so that the
        step's gradient is the global batch's mean (orchestrator.data.epochs, item 6)."""
        gen = torch.Generator(device="cpu").manual_seed(
            hash((self.spec.seed, self.step, micro, self.rt.rank)) & (2**63 - 1)
        )
        if isinstance(images, MixedBatch):  # decode=gpu/split: the device decodes the JPEGs
            images, labels = self._device_decode(images, labels, gen)
        x = self.normalize(images, train=True, generator=gen)
        y = labels.to(self.device, non_blocking=True)
        smoothing = self.spec.optim.label_smoothing
        with self.strategy.micro_batch(last):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
            self._nonfinite += (~torch.isfinite(loss.detach())).any()  # no sync: _check_finite
            self.strategy.backward(loss, weight)
        hits = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        self.window.add(loss.detach(), torch.stack([hits[:, 0].sum(), hits.any(1).sum()]), len(y))
        if self.schedule.warming:  # summed on the device: read only at the rule's decisions
            self._warmup_hits += hits[:, 0].sum()
            self._warmup_samples += len(y)

    def _device_decode(
        self, batch: MixedBatch, labels: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """nvJPEG, then batched crops (0-255, like the workers' pixels). A file that does not
        decode is replaced within the batch and counted with the loader's bad samples."""
        parts = [batch.pixels.to(self.device, non_blocking=True).float()]
        if len(batch.jpeg_ends):
            k = len(batch.pixels)
            decoded, tail, bad = replace_undecodable(
                decode_jpegs(batch.jpegs(), self.device), labels[k:]
            )
            if bad:
                labels = torch.cat([labels[:k], tail])
                self.loader.count_bad(bad, f"{bad} JPEG(s) the device could not decode")
            if decoded:
                assert self.augment is not None  # decode=gpu/split: built in __init__
                parts.append(self.augment(decoded, gen))
        if not len(labels):
            raise DataError("a decode=gpu batch held no decodable JPEG; see the warnings above")
        return torch.cat(parts), labels

    def _check_finite(self) -> None:
        """Raise if any rank saw a non-finite loss since the last check. Called at log steps and
        before every checkpoint, never per step: reading the flag is a host sync that would
        stall the GPU's queue each step. A bad stretch is caught before it is ever saved."""
        bad = torch.zeros(self.rt.world_size, device=self.device)
        bad[self.rt.rank] = self._nonfinite
        all_reduce(bad)
        if bad.any():
            ranks = [i for i, b in enumerate(bad.tolist()) if b]
            raise NonFiniteLoss(
                f"non-finite loss at step {self._finite_step + 1}..{self.step} "
                f"(epoch {self.epoch}) "
                f"on rank(s) {ranks}. Lower optim.lr or check the data; the last committed "
                f"checkpoint is intact."
            )
        self._finite_step = self.step

    def _watch_syncs(self, on: bool) -> None:
        """ORCH_CUDA_SYNC_DEBUG=1: warn at every host sync between fetching a batch and the
        optimizer step, the path that must never wait for the GPU (bench/gpu_check.py lists
        the places that do)."""
        if self.device.type == "cuda" and os.environ.get("ORCH_CUDA_SYNC_DEBUG") == "1":
            torch.cuda.set_sync_debug_mode("warn" if on else 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation under spec.eval.protocol (orchestrator.evaluation): each sample once
        across ranks, sums all-reduced. With eval.bn_recalibrate, a copy of the net with BN
        statistics averaged over that many training batches is evaluated (training state is
        untouched)."""
        from orchestrator.evaluation import evaluate_as, recalibrate_bn_on_data

        cfg, ev = self.spec.data, self.spec.eval
        if cfg.synthetic:
            return {}
        model = self.strategy.model
        if ev.bn_recalibrate:
            model = copy.deepcopy(unwrap(model))
            recalibrate_bn_on_data(
                model,
                cfg,
                ev.bn_recalibrate,
                batch_size=self.spec.micro_batch(),
                rank=self.rt.rank,
                world_size=self.rt.world_size,
                device=self.device,
                seed=self.spec.seed + 1,
            )
        result = evaluate_as(
            model,
            cfg,
            ev,
            rank=self.rt.rank,
            world_size=self.rt.world_size,
            device=self.device,
            mean=self.loader.mean,
            std=self.loader.std,
            mean_image=self.loader.mean_image,
            bf16=self.bf16,
        )
        return result.metrics()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train to schedule.max_iters; returns the newest value of every metric."""
        spec = self.spec
        resumed = self.resume()
        startup_clock.mark("trainer and resume")
        if spec.data.ledger and not spec.data.synthetic:
            self.ledger = open_ledger(spec, self.rt, self.loader)
        self._start_tracking()
        startup_clock.mark("mlflow run start")
        weights = sum(
            float(p.detach().double().sum()) for p in unwrap(self.strategy.model).parameters()
        )
        log.info(
            "rank %d: %s from step %d (resumed: %s, weight checksum %.10g)",
            self.rt.rank,
            spec.name,
            self.step,
            resumed,
            weights,
        )
        self.strategy.model.train()
        self.window.reset()
        while self.step < spec.schedule.max_iters:
            self._watch_syncs(True)
            self._lr = self.schedule.lr(self.step)
            self.strategy.set_lr(self._lr)
            self._train_step()
            startup_clock.first_step(say=self.rt.rank == 0)
            self._watch_syncs(False)  # below: log steps, evaluation, checkpoints may sync
            if self.schedule.checks_warmup(self.step):
                self._warmup_check()
            self._publish(self._scheduled_work())
            if self.step_in_epoch >= self.loader.batches_per_epoch:
                self._end_epoch()
        return self._finish()

    def _train_step(self) -> None:
        """One optimizer step on this rank's share, in micro-batches of at most micro_cap."""
        images, labels = self._next_step()
        total = self.loader.step_sizes[self.step_in_epoch]  # the global batch of this step
        parts = -(-len(labels) // self.micro_cap)
        sizes = [spread(len(labels), parts, i) for i in range(parts)]
        for i, (x, y) in enumerate(split_batch(images, labels, sizes)):
            weight = len(y) * self.rt.world_size / total
            self._micro_step(x, y, last=i == parts - 1, weight=weight, micro=i)
        self.strategy.step()
        self.step += 1
        if self.ledger is not None:
            ids = self.loader.ids.pop((self.epoch, self.step_in_epoch))
            self.ledger.record(self.epoch, self.step, ids)
        self.step_in_epoch += 1
        self.window.steps += 1
        self.samples_seen += total

    def _warmup_check(self) -> None:
        """schedule.warmup_until_train_err: decide on the window of steps since the last check,
        then start the next window. The window is not checkpointed (the decision is, in the
        schedule's state): after a resume the first window is the steps since the resume."""
        samples, self._warmup_samples = self._warmup_samples, 0
        if warmup_decision(self.schedule, self._warmup_hits, samples, self.step):
            log.info("step %d: training error below the warm-up's threshold: full lr", self.step)
        self._warmup_hits.zero_()

    def _scheduled_work(self) -> dict[str, float]:
        """Log, evaluate and checkpoint where this step falls on their schedules; checkpoint
        and stop on a preemption notice (orchestrator.preemption)."""
        spec, metrics = self.spec, {}
        if self.step % spec.tracking.log_every == 0 or self.step in (1, spec.schedule.max_iters):
            metrics = self._train_metrics()
        if self._evaluated_this_step():
            metrics.update(self._validate())
        decision = self.boundary.poll(self.step, self.checkpointer.saved_step)
        if decision.save:
            metrics["system/checkpoint_stall_s"] = self.save_checkpoint(metrics)
        if decision.commit:  # a Ray preemption notice: the node may go before the next save
            self.checkpointer.commit()
        if decision.stop_signal:  # committed and published first: a resubmission resumes here
            self._publish(metrics)
            self.checkpointer.commit()
            raise Terminated(
                f"{decision.reason}: stopped at step {self.step}", decision.stop_signal
            )
        if decision.resize:  # every rank's files and the marker are written: Ray may go on
            resize_committed()
        if decision.wait_s:  # the last commit before a deadline: no step after it is lost
            self._publish(metrics)
            time.sleep(decision.wait_s)  # the reclaim ends this process; a cancelled one not
            return {}
        return metrics

    def _evaluated_this_step(self) -> bool:
        every = self.spec.eval.every_iters
        return bool(every) and self.step % every == 0

    def _end_epoch(self) -> None:
        """The epoch ran out at an optimizer step's end: the next step starts the next one."""
        self.epoch, self.step_in_epoch, self._batches = self.epoch + 1, 0, None
        if self.spec.checkpoint.at_epoch_end and self.step < self.spec.schedule.max_iters:
            self._publish({"system/checkpoint_stall_s": self.save_checkpoint({})})

    def _finish(self) -> dict[str, float]:
        """The end-of-run evaluation and checkpoint, then close the tracking run."""
        final: dict[str, float] = {}
        if self.spec.eval.at_end and not self._evaluated_this_step():
            final.update(self._validate())
        if self.checkpointer.saved_step != self.step:  # decided locally: saving is collective
            final["system/checkpoint_stall_s"] = self.save_checkpoint(final)
        self.checkpointer.commit()
        self._publish(final, report=True)
        if self.rt.rank == 0:  # registering models is the driver's, after the workers are gone
            found = self.checkpointer.store.committed()
            url = found[-1].url if found else None
            self.tracker.finish("FINISHED", checkpoint_url=url)
            log.info("%s", self._final_line(found))
        return self.latest

    def _final_line(self, found: list[Any]) -> str:
        """The run's last line: its best checkpoint.best_metric among the committed `found`
        (the alias `best`'s), and its MLflow run's page (else its checkpoint folder)."""
        metric = self.spec.checkpoint.best_metric
        best = best_checkpoint(found, metric)
        figure = (best.metrics[metric], best.step) if best else None
        page = job_run_url(self.spec) if self.tracker.run_id else None
        address = page or spec_checkpoints_url(self.spec)
        return final_line(self.spec.name, self.step, metric, figure, address)

    def _train_metrics(self) -> dict[str, float]:
        self._check_finite()
        metrics = self.window.read(self.rt.world_size)  # the host sync of a log interval
        metrics["train/lr"] = self._lr  # the lr the last step ran at
        metrics["train/epoch"] = float(self.epoch)
        metrics["train/samples_seen"] = float(self.samples_seen)
        if self.spec.data.decode == "split":
            metrics["system/cpu_decode_share"] = self.loader.cpu_share
        if self.augment is not None:  # images nvJPEG refused, decoded on the host instead
            metrics["system/nvjpeg_fallback_images"] = float(nvjpeg_fallbacks())
        if self.device.type == "cuda":
            metrics["system/gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _validate(self) -> dict[str, float]:
        metrics = self.evaluate()
        if "val/top1_err" in metrics and self.schedule.observe(metrics["val/top1_err"]):
            log.info("validation plateau at step %d: lr divided by 10", self.step)
        return metrics

    def _start_tracking(self) -> None:
        """Rank 0 opens (or, after a resume, continues) the job's MLflow run."""
        if self.rt.rank != 0:
            return
        spec = self.spec
        tags = {
            MODEL_TAG: spec.model.name,
            STRATEGY_TAG: spec.scaling.strategy,
            WORLD_SIZE_TAG: str(self.rt.world_size),
            DEVICE_TAG: self.device.type,
            DATASET_TAG: spec.data.url or "synthetic",
            MANIFEST_TAG: self.manifest_sha256,
            NUM_CLASSES_TAG: str(self.num_classes),
            **self.rt.tags,
            **spec.tracking.tags,
        }
        if spec.tracking.parent_run_id:  # MLflow's own tag: the UI nests the run under it
            tags[PARENT_TAG] = spec.tracking.parent_run_id
        self.tracker = start_tracker(
            spec,
            tags,
            run_id=self.tracking_run_id,  # from the checkpoint resume() loaded: continue that run
            manifest=self.loader.manifest,
        )
        self.tracking_run_id = self.tracker.run_id or self.tracking_run_id

    def _publish(self, metrics: dict[str, float], report: bool = False) -> None:
        """Log `metrics` (rank 0: to MLflow and the job log). `report` (the run's end, reached
        by every rank): report every newest value to the runtime, once. Ray Train's report is
        a barrier of all workers that waits for its 2 s health check to fetch the report
        before: one per logged step held fast steps that long."""
        self.latest.update(metrics)
        self._measured_at.update(dict.fromkeys(metrics, self.step))
        if metrics and self.rt.rank == 0:
            self.tracker.log_metrics({**metrics, "train/step": float(self.step)}, self.step)
            total = self.spec.schedule.max_iters
            line = progress_line(self.step, total, metrics, self.window.eta_s(total - self.step))
            if line:  # the one line a user reads; every figure at DEBUG (and in MLflow)
                log.info("%s", line)
            log.debug("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if report:
            self.rt.report({**self.latest, "train/step": float(self.step)})


def step_forward(
    model: torch.nn.Module, compile: bool, device: torch.device
) -> Callable[..., torch.Tensor]:
    """The step's forward. Shapes are fixed: on CUDA cuDNN times its algorithms once and keeps
    the fastest; model.compile makes static graphs (an epoch's short last batch gets its own,
    not an automatic-dynamic recompile whose graph would then serve every later step)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.compile(model, dynamic=False) if compile else model


def run_worker(spec_dict: dict[str, Any], rt: Runtime) -> dict[str, float]:
    """Build a Trainer and run it; marks the tracking run FAILED/KILLED on the way out."""
    from orchestrator.spec import JobSpec, from_dict

    spec = from_dict(JobSpec, spec_dict)
    setup_logging()
    trainer = Trainer(spec, rt)
    trainer.boundary.install()  # SIGTERM, checkpoint.preempt_signal: stop at a step boundary
    try:
        return trainer.fit()
    except (KeyboardInterrupt, Terminated):
        trainer.tracker.finish("KILLED")
        raise
    except BaseException as err:
        where = f"rank {rt.rank} at step {trainer.step} (epoch {trainer.epoch})"
        trainer.tracker.finish("FAILED", error=f"{where}: {type(err).__name__}: {err}")
        log.error("%s failed: %s: %s", where, type(err).__name__, scrub(str(err)))
        raise
    finally:
        trainer.boundary.uninstall()
