"""The training loop's figures between two log steps (orchestrator/train.py logs them), the
lines rank 0 prints from them (one progress line per log interval, one at the run's end), a
commit marker's figures, and the warm-up rule's decision on the training error of its window.

    step 1200 of 64000 (1.9%): loss 1.2346, lr 0.1, 5310 img/s, data wait 2%, ETA 3h12m
    step 2000 of 64000 (3.1%): val top-1 err 52.40%, top-5 err 18.20%
    job cifar10_resnet finished at step 64000: best val/top1_err 6.43% (step 60000); run: URL
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from orchestrator.runtime import all_reduce
from orchestrator.tracking.metrics import CHECKPOINT_METRICS

if TYPE_CHECKING:
    from orchestrator.schedule import LRSchedule

# the log windows the ETA's rate is taken over: recent enough to follow a change of pace (an
# lr drop does not change it, a new neighbour on the node does), long enough to be steady
RATE_WINDOWS = 5


class MetricsWindow:
    """The loop's figures between two log steps. Loss and hits are summed on the device, so
    a step never waits for the host; `read()` is the one host sync of a log interval."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, device=device)  # loss sum, top-1 hits, top-5 hits
        # (steps, seconds) of the newest windows, for the ETA; the first window after a start
        # or a resume times the start-up too (loader workers, cuDNN's search, compiling): it
        # counts only until a second window exists
        self.recent: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOWS)
        self._startup = True
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.samples, self.steps, self.wait_s = 0, 0, 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, hits: torch.Tensor, samples: int) -> None:
        self.sums += torch.cat([loss.view(1) * samples, hits.float()])
        self.samples += samples

    def read(self, world_size: int) -> dict[str, float]:
        """The window's train/ and system/ figures; starts the next window."""
        loss_sum, top1, top5 = self.sums.tolist()
        elapsed, n = time.perf_counter() - self.t0, self.samples
        figures = {
            "train/loss": loss_sum / n,
            "train/top1_err": 1 - top1 / n,
            "train/top5_err": 1 - top5 / n,
            "system/images_per_s": n * world_size / elapsed,
            "system/data_wait_frac": self.wait_s / elapsed,
            "system/step_time_s": elapsed / self.steps,
        }
        if self._startup and self.recent:
            self.recent.clear()
            self._startup = False
        self.recent.append((self.steps, elapsed))
        self.reset()
        return figures

    def eta_s(self, steps_left: int) -> float | None:
        """Seconds until `steps_left` more steps are done at the recent windows' pace (their
        evaluations and checkpoints included); None before any window was read."""
        steps = sum(n for n, _ in self.recent)
        return steps_left * sum(s for _, s in self.recent) / steps if steps else None


def duration(seconds: float) -> str:
    """42s, 12m05s, 3h12m, 2d03h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def progress_line(
    step: int, total: int, metrics: dict[str, float], eta_s: float | None
) -> str | None:
    """The line a user reads for a logged step: step of total, the loss, lr, images/s, the
    share of time waiting for data, GPU memory (on CUDA), the ETA; the validation errors
    where the step was validated. None where `metrics` hold neither (a checkpoint's stall)."""
    parts = []
    if "train/loss" in metrics:
        rate = metrics["system/images_per_s"]
        train = [
            f"loss {metrics['train/loss']:.4f}",
            f"lr {metrics['train/lr']:.4g}",
            f"{rate:.0f} img/s" if rate >= 100 else f"{rate:.3g} img/s",
            f"data wait {metrics['system/data_wait_frac']:.0%}",
        ]
        if "system/gpu_mem_gib" in metrics:
            train.append(f"GPU mem {metrics['system/gpu_mem_gib']:.1f} GiB")
        if step < total:
            train.append(f"ETA {'--' if eta_s is None else duration(eta_s)}")
        parts.append(", ".join(train))
    if "val/top1_err" in metrics:
        parts.append(
            f"val top-1 err {metrics['val/top1_err']:.2%}, top-5 err {metrics['val/top5_err']:.2%}"
        )
    if not parts:
        return None
    return f"step {step} of {total} ({step / total:.1%}): " + "; ".join(parts)


def final_line(
    job: str, step: int, metric: str, best: tuple[float, int] | None, address: str
) -> str:
    """The run's last line: where it ended, its best `metric` as (value, step) (an error in
    %), and its address (the MLflow run's page, or the checkpoint folder)."""
    if best is None:
        result = f"no {metric} was measured (eval off, or synthetic data)"
    else:
        value, at = best
        shown = f"{value:.2%}" if metric.endswith("_err") else f"{value:.4g}"
        result = f"best {metric} {shown} (step {at})"
    return f"job {job} finished at step {step}: {result}; run: {address}"


def marker_metrics(
    latest: dict[str, float],
    measured_at: dict[str, int],
    step: int,
    measured: dict[str, float],
) -> dict[str, float]:
    """A commit marker's metrics at `step`: those `measured` or published (`measured_at`) there,
    and the newest others but val/* and CHECKPOINT_METRICS, so `@best` is a validated step."""
    kept = {
        k: v
        for k, v in latest.items()
        if not (k in CHECKPOINT_METRICS or k.startswith("val/")) or measured_at.get(k) == step
    }
    return {**kept, **measured}


def warmup_decision(schedule: LRSchedule, hits: torch.Tensor, samples: int, step: int) -> bool:
    """The warm-up rule's decision after `step` steps (schedule.warmup_until_train_err), from
    this rank's top-1 `hits` and `samples` since the last decision. Summed over every rank (a
    collective: every rank calls it at the same steps), the training error is the same number
    everywhere, so every rank ends the warm-up at the same step. True if it ended here."""
    sums = torch.stack([hits.double(), hits.new_tensor(samples, dtype=torch.float64)])
    total_hits, total = all_reduce(sums).tolist()
    return bool(total) and schedule.observe_train_error(1 - total_hits / total, step)
