"""The per-worker loop: build, resume, step, evaluate, checkpoint, report.

It needs only torch (and the data pipeline): Ray, MLflow and DeepSpeed are reached through
`Runtime.report`, the tracker and the strategy, so `--local` runs the same code where Ray is
absent. One code path for precision: bf16 autocast where the device is a GPU, fp32 on CPU.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator.checkpoint import CheckpointStore, best_checkpoint, to_bytes
from orchestrator.data import DeviceNormalize, MixedBatch, SplitBalancer, TrainLoader
from orchestrator.data.gpu_augment import DeviceAugment, decode_jpegs
from orchestrator.models import create_model
from orchestrator.schedule import LRSchedule
from orchestrator.spec import JobSpec, to_yaml
from orchestrator.strategy import build_strategy
from orchestrator.tracking import NullTracker, Tracker, manifest_sha256, scrub, start_tracker

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class Runtime:
    """Where this worker runs and how it talks to the launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, float]], None] = lambda metrics: None
    tags: dict[str, str] = field(default_factory=dict)  # e.g. the Ray job id
    node: str = ""  # the Ray node id where this worker runs


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        self.loader = TrainLoader(
            spec.data, rank=rt.rank, world_size=rt.world_size, batch_size=spec.micro_batch(),
            seed=spec.seed, device=self.device,
        )  # fmt: skip
        self.num_classes = spec.model.num_classes or self.loader.num_classes
        model = create_model(spec.model.name, self.num_classes, **spec.model.options()).to(self.device)
        if spec.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.strategy = build_strategy(
            spec.scaling, spec.optim, model, lr=spec.lr(), micro_batch=spec.micro_batch(),
            accumulation=spec.accumulation(), device=self.device, bf16=self.bf16,
        )  # fmt: skip
        self.forward = torch.compile(self.strategy.model) if spec.model.compile else self.strategy.model
        self.normalize = DeviceNormalize(
            self.loader.mean, self.loader.std, spec.data.pca_lighting, self.device
        )
        self.augment = None
        self.balancer = None
        if spec.data.decode != "cpu" and not spec.data.synthetic:
            self.augment = DeviceAugment(
                spec.data.train_transform, spec.data.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                scale_range=spec.data.scale_range, device=self.device,
            )  # fmt: skip  (crops stay 0-255; self.normalize adds lighting and mean/std)
            if spec.data.decode == "split" and spec.data.split_adapt:
                self.balancer = SplitBalancer(self.loader)
        self.schedule = LRSchedule(spec.schedule, spec.lr())
        self.store = CheckpointStore(f"{spec.checkpoint.storage.rstrip('/')}/{spec.name}/checkpoints")
        self.manifest_sha256 = manifest_sha256(self.loader.manifest)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch already consumed
        self.samples_seen = 0
        self.saved_step = -1
        self._nonfinite = torch.zeros((), device=self.device)  # set on device, read at checks
        self._finite_step = 0  # steps up to here were checked finite
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: tuple[int, dict[str, float], Future] | None = None
        self.tracker: Tracker = NullTracker()
        self.tracking_run_id: str | None = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The replicated state (rank 0 writes it)."""
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen, "schedule": self.schedule.state_dict(),
            "strategy": self.strategy.state_dict(), "spec": self.spec.to_dict(),
            "manifest_sha256": self.manifest_sha256, "cpu_decode_share": self.loader.cpu_share,
            # the tracker opens its run late when MLflow was down at the start
            "tracking_run_id": self.tracker.run_id or self.tracking_run_id,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["manifest_sha256"] != self.manifest_sha256:
            log.warning("the dataset manifest changed since this checkpoint was written")
        self.strategy.load_state_dict(state["strategy"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.samples_seen = state["batch_in_epoch"], state["samples_seen"]
        self.tracking_run_id = state.get("tracking_run_id")
        if self.spec.data.decode == "split":  # resume at the balance found, not at the start
            self.loader.cpu_share = state.get("cpu_decode_share", self.loader.cpu_share)

    def rank_state(self) -> dict[str, Any]:
        """What differs per rank: RNG streams (the data position is in the replicated state)."""
        # the schedule is replicated; a copy per rank lets tests prove every rank decided alike
        return {"rng": rng_state(), "rank": self.rt.rank, "world_size": self.rt.world_size,
                "schedule": self.schedule.state_dict(), "step": self.step, "pid": os.getpid(),
                "node": self.rt.node}  # fmt: skip

    def save_checkpoint(self, metrics: dict[str, float]) -> float:
        """Snapshot this step's state on every rank and upload it in the background; returns
        the stall (s) training paid. The step is committed at the next save (or at the end),
        once every rank's upload has finished: until then it does not count."""
        self._check_finite()  # never save weights a non-finite loss has touched
        t0 = time.perf_counter()
        self.commit_pending()
        step, files = self.step, {f"rank-{self.rt.rank:05d}.pt": to_bytes(self.rank_state())}
        if self.rt.rank == 0:
            files["trainer.pt"] = to_bytes(self.state_dict())  # serialised now: a consistent copy
        shards = Path(tempfile.mkdtemp(prefix="shards-"))
        self.strategy.save_shards(shards)  # collective for DeepSpeed; local files
        self._pending = (step, dict(metrics), self._uploader.submit(self._upload, step, files, shards))
        self.saved_step = step
        return time.perf_counter() - t0

    def _upload(self, step: int, files: dict[str, bytes], shards: Path) -> None:
        try:
            for name, data in files.items():
                self.store.put(step, name, data)
            self.store.write_dir(step, shards, "shards")
        finally:
            shutil.rmtree(shards, ignore_errors=True)

    def commit_pending(self) -> None:
        """Wait for this rank's upload, then rank 0 writes the marker once all ranks are done."""
        if self._pending is None:
            return
        step, metrics, upload = self._pending
        self._pending = None
        upload.result()  # an upload that failed for good raises here, before any marker
        barrier()  # every rank's files exist before the marker says so
        if self.rt.rank == 0:
            self.store.commit(step, metrics)
            self.store.retain(self.spec.checkpoint.keep_last, self.spec.checkpoint.best_metric)
        barrier()

    def resume(self) -> bool:
        """Load the latest committed checkpoint of this job (or --resume-from's); True if any."""
        store, step = self.store, None
        if self.spec.checkpoint.resume_from:
            from orchestrator.checkpoint import split_checkpoint_url

            root, step = split_checkpoint_url(self.spec.checkpoint.resume_from)
            if self.store.latest() is None:  # a fork: only until this job has its own
                store = CheckpointStore(root)
        if step is None or store is self.store:
            latest = self.store.latest()
            if latest is None:
                return False
            step = latest.step
        self.load_state_dict(store.read(step, "trainer.pt"))
        self.saved_step = self._finite_step = self.step
        shards = store.fetch_dir(step, "shards")
        self.strategy.load_shards(shards)
        shutil.rmtree(shards, ignore_errors=True)
        rank_file = f"rank-{self.rt.rank:05d}.pt"
        try:
            set_rng_state(store.read(step, rank_file)["rng"])
        except Exception:  # noqa: BLE001 - a different world size: the data position still resumes exactly
            log.warning("no RNG state for rank %d at step %d; reseeding", self.rt.rank, step)
        log.info("rank %d resumed from %s step %d", self.rt.rank, store.root, step)
        return True

    # ------------------------------------------------------------------ steps

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(
            hash((self.spec.seed, self.step, self.batch_in_epoch, self.rt.rank)) & (2**63 - 1)
        )
        if isinstance(images, MixedBatch):  # decode=gpu/split: the device decodes the JPEGs
            parts = [images.pixels.to(self.device, non_blocking=True).float()]
            if len(images.jpeg_ends):  # nvJPEG, then batched crops (0-255, like the pixels)
                parts.append(self.augment(decode_jpegs(images.jpegs(), self.device), gen))
            images = torch.cat(parts)
        x = self.normalize(images, train=True, generator=gen)
        y = labels.to(self.device, non_blocking=True)
        with self.strategy.no_sync(last):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.spec.optim.label_smoothing)
            self._nonfinite += (~torch.isfinite(loss.detach())).any()  # no sync: see _check_finite
            self.strategy.backward(loss / self.spec.accumulation())
        top5 = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == y[:, None]
        return loss.detach(), torch.stack([hits[:, 0].sum(), hits.any(1).sum()])

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
                f"non-finite loss at step {self._finite_step + 1}..{self.step} (epoch {self.epoch}) "
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

    def _ahead_to_device(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """On a GPU, start copying batch k+1 (pinned memory, non_blocking) before batch k runs
        (a MixedBatch's JPEG bytes stay on the host: nvJPEG reads them there)."""
        if self.device.type != "cuda":
            yield from batches
            return
        ahead = None
        for images, labels in batches:
            current = (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
            if ahead is not None:
                yield ahead
            ahead = current
        if ahead is not None:
            yield ahead

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation under spec.eval.protocol (orchestrator.evaluation): each sample once
        across ranks, sums all-reduced. With eval.bn_recalibrate, a copy of the net with BN
        statistics averaged over that many training batches is evaluated (training state is
        untouched)."""
        from orchestrator.evaluation import evaluate, recalibrate_bn_on_data, unwrap

        cfg, ev = self.spec.data, self.spec.eval
        if cfg.synthetic:
            return {}
        model = self.strategy.model
        if ev.bn_recalibrate:
            model = copy.deepcopy(unwrap(model))
            recalibrate_bn_on_data(
                model, cfg, ev.bn_recalibrate, batch_size=self.spec.micro_batch(),
                rank=self.rt.rank, world_size=self.rt.world_size, device=self.device,
                seed=self.spec.seed + 1,
            )  # fmt: skip
        result = evaluate(
            model, cfg, protocol=ev.protocol, scales=ev.scales, flips=ev.flips,
            batch_size=ev.batch_size, max_batches=ev.max_batches, rank=self.rt.rank,
            world_size=self.rt.world_size, device=self.device, mean=self.loader.mean,
            std=self.loader.std, bf16=self.bf16,
        )  # fmt: skip
        return result.metrics()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        spec, accum = self.spec, self.spec.accumulation()
        resumed = self.resume()
        if self.rt.rank == 0:
            tags = {"model": spec.model.name, "strategy": spec.scaling.strategy,
                    "world_size": str(self.rt.world_size), "device": self.device.type,
                    "dataset": spec.data.url or "synthetic", "manifest_sha256": self.manifest_sha256,
                    "num_classes": str(self.num_classes), **self.rt.tags}  # fmt: skip
            self.tracker = start_tracker(
                spec.tracking.enabled, spec.tracking.experiment, spec.name, spec.flat(), tags, to_yaml(spec),
                run_id=self.tracking_run_id,  # from the checkpoint resume() loaded: continue that run
                manifest=self.loader.manifest,
            )
            self.tracking_run_id = self.tracker.run_id or self.tracking_run_id
        weights = sum(float(p.double().sum()) for p in self.strategy.unwrapped().parameters())
        log.info("rank %d: %s from step %d (resumed: %s, weight checksum %.10g)", self.rt.rank, spec.name, self.step, resumed, weights)
        self.strategy.model.train()
        sums = torch.zeros(3, device=self.device)  # loss sum, top1 hits, top5 hits
        window_samples, window_wait, window_t0, window_steps = 0, 0.0, time.perf_counter(), 0
        last: dict[str, float] = {}
        micro = 0
        while self.step < spec.schedule.max_iters:
            self.loader.set_epoch(self.epoch, self.batch_in_epoch)
            batches = self._ahead_to_device(iter(self.loader))
            if self.balancer is not None:
                self.balancer.new_epoch()
            while self.step < spec.schedule.max_iters:
                self._watch_syncs(True)
                t_wait = time.perf_counter()
                try:
                    images, labels = next(batches)
                except StopIteration:
                    break
                window_wait += (waited := time.perf_counter() - t_wait)
                if self.balancer is not None:
                    self.balancer.observe(waited)
                self.batch_in_epoch += 1
                if micro == 0:
                    self.strategy.set_lr(self.schedule.lr(self.step))
                loss, hits = self._micro_step(images, labels, last=micro == accum - 1)
                sums += torch.cat([loss.view(1) * len(labels), hits.float()])
                window_samples += len(labels)
                micro += 1
                if micro < accum:
                    continue
                micro = 0
                self.strategy.step()
                self.step += 1
                window_steps += 1
                self.samples_seen += spec.scaling.global_batch
                self._watch_syncs(False)  # below: log steps, evaluation, checkpoints may sync
                metrics: dict[str, float] = {}
                if self.step % spec.tracking.log_every == 0 or self.step in (1, spec.schedule.max_iters):
                    self._check_finite()
                    loss_sum, top1, top5 = sums.tolist()  # the host syncs of a log interval
                    elapsed = time.perf_counter() - window_t0
                    metrics = {
                        "train/loss": loss_sum / window_samples, "train/top1_err": 1 - top1 / window_samples,
                        "train/top5_err": 1 - top5 / window_samples, "lr": self.schedule.lr(self.step - 1),
                        "images_per_s": window_samples * self.rt.world_size / elapsed,
                        "data_wait_frac": window_wait / elapsed, "step_time_s": elapsed / window_steps,
                        "epoch": float(self.epoch), "samples_seen": float(self.samples_seen),
                    }  # fmt: skip
                    if spec.data.decode == "split":
                        metrics["cpu_decode_share"] = self.loader.cpu_share
                    if self.device.type == "cuda":
                        metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    sums.zero_()
                    window_samples, window_wait, window_t0 = 0, 0.0, time.perf_counter()
                    window_steps = 0
                if spec.eval.every_iters and self.step % spec.eval.every_iters == 0:
                    metrics.update(self._validate())
                if spec.checkpoint.every_iters and self.step % spec.checkpoint.every_iters == 0:
                    metrics["checkpoint_stall_s"] = self.save_checkpoint({**last, **metrics})
                if metrics:
                    last.update(metrics)
                    self._publish(metrics)
            self._watch_syncs(False)
            if self.batch_in_epoch >= self.loader.batches_per_epoch:  # the epoch ran out
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if spec.checkpoint.at_epoch_end and micro == 0 and self.step < spec.schedule.max_iters:
                    self._publish({"checkpoint_stall_s": self.save_checkpoint(last)})
        final: dict[str, float] = {}
        if spec.eval.at_end and not (spec.eval.every_iters and self.step % spec.eval.every_iters == 0):
            final.update(self._validate())
        if self.saved_step != self.step:  # decided from local state: saving is collective
            final["checkpoint_stall_s"] = self.save_checkpoint({**last, **final})
        self.commit_pending()
        if final:
            last.update(final)
            self._publish(final)
        if self.rt.rank == 0:
            committed = self.store.committed()
            best = best_checkpoint(committed, spec.checkpoint.best_metric)
            self.tracker.finish(
                "FINISHED",
                checkpoint_url=committed[-1].url if committed else None,
                best_checkpoint_url=best.url if best else None,
            )
        return last

    def _validate(self) -> dict[str, float]:
        metrics = self.evaluate()
        if "val_top1_err" in metrics and self.schedule.observe(metrics["val_top1_err"]):
            log.info("validation plateau at step %d: lr divided by 10", self.step)
        return metrics

    def _publish(self, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "step": float(self.step)}
        if self.rt.rank == 0:
            self.tracker.log_metrics(metrics, self.step)
            log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self.rt.report(metrics)


class Terminated(BaseException):
    """SIGTERM arrived (a cancelled job, a preempted node): stop and mark the run KILLED."""


def raise_on_sigterm(
    error: type[BaseException] = Terminated, first: Callable[[], object] | None = None
) -> None:
    """Turn SIGTERM into `error`, raised in the main thread, so `finally`/`except` run.
    `first` runs before the raise: what must happen even if the unwinding is cut short."""

    def handler(signum: int, frame: Any) -> None:
        if first is not None:
            first()
        raise error(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (Ray runs the loop in a thread): Ray handles it
        pass


def run_worker(spec_dict: dict[str, Any], rt: Runtime) -> dict[str, float]:
    """Build a Trainer and run it; marks the tracking run FAILED/KILLED on the way out."""
    from orchestrator.spec import JobSpec, from_dict

    spec = from_dict(JobSpec, spec_dict)
    logging.basicConfig(level=os.environ.get("ORCH_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(spec, rt)
    raise_on_sigterm()
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
