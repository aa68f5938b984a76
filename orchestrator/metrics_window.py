"""The training loop's figures between two log steps (orchestrator/train.py logs them)."""

from __future__ import annotations

import time

import torch


class MetricsWindow:
    """The loop's figures between two log steps. Loss and hits are summed on the device, so
    a step never waits for the host; `read()` is the one host sync of a log interval."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, device=device)  # loss sum, top-1 hits, top-5 hits
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
        self.reset()
        return figures
