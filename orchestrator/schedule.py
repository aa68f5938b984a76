"""Learning-rate schedules in iterations: step, plateau (the paper's ImageNet rule), cosine.

Plateau decisions are made from validation metrics that every rank has all-reduced, so every
rank takes the same decision; its state (best, bad evaluations, drops) travels in checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.spec import ScheduleConfig


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, base_lr: float) -> None:
        self.cfg = cfg
        self.base_lr = base_lr
        self.best = math.inf
        self.bad_evals = 0
        self.drops = 0  # plateau: how many times lr was divided

    def lr(self, step: int) -> float:
        """The lr for optimizer step `step` (0-based)."""
        c = self.cfg
        if c.kind == "step":
            lr = self.base_lr * c.gamma ** sum(step >= m for m in c.milestones)
        elif c.kind == "plateau":
            lr = self.base_lr * c.gamma**self.drops
        else:
            span = max(1, c.max_iters - c.warmup_iters)
            progress = min(1.0, max(0, step - c.warmup_iters) / span)
            lr = c.min_lr + (self.base_lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < c.warmup_iters:
            factor = c.warmup_factor
            if c.warmup_linear:
                factor += (1 - c.warmup_factor) * step / c.warmup_iters
            lr *= factor
        return max(lr, c.min_lr) if c.kind != "cosine" else lr

    def observe(self, metric: float) -> bool:
        """Feed a validation metric (lower is better); True if the lr was just divided."""
        if self.cfg.kind != "plateau":
            return False
        if metric < self.best - self.cfg.plateau_threshold:
            self.best, self.bad_evals = metric, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.plateau_patience:
            self.drops, self.bad_evals = self.drops + 1, 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "drops": self.drops}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals, self.drops = state["best"], state["bad_evals"], state["drops"]
