"""Learning-rate schedules in iterations: step, plateau (the paper's ImageNet rule), cosine,
with a warm-up either for a fixed number of iterations or until the training error is low
enough (ResNet-110's rule, `warmup_until_train_err`).

Plateau and warm-up decisions are made from metrics every rank has all-reduced (validation
error; the training error of a window of steps), so every rank takes the same decision; their
state (best, bad evaluations, drops, whether it still warms up) travels in checkpoints.
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
        self.warming = cfg.warmup_until_train_err is not None  # the error rule still holds
        self.warmup_ended_at: int | None = None  # the first step run at the full lr

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
        if self.warming:
            lr *= c.warmup_factor
        elif step < c.warmup_iters:
            factor = c.warmup_factor
            if c.warmup_linear:
                factor += (1 - c.warmup_factor) * step / c.warmup_iters
            lr *= factor
        return max(lr, c.min_lr) if c.kind != "cosine" else lr

    def checks_warmup(self, step: int) -> bool:
        """Whether the error rule decides after optimizer step `step` (1-based count of steps
        done): every warmup_check_every steps while it warms up."""
        return self.warming and step % self.cfg.warmup_check_every == 0

    def observe_train_error(self, error: float, step: int) -> bool:
        """Feed the training error (a fraction, all-reduced over ranks) of the window ending
        after `step` steps; True if the warm-up just ended (step `step` runs at the full lr)."""
        threshold = self.cfg.warmup_until_train_err
        if not self.warming or threshold is None or not error < threshold:
            return False
        self.warming, self.warmup_ended_at = False, step
        return True

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
        return {
            "best": self.best,
            "bad_evals": self.bad_evals,
            "drops": self.drops,
            "warming": self.warming,
            "warmup_ended_at": self.warmup_ended_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals, self.drops = state["best"], state["bad_evals"], state["drops"]
        # a checkpoint from before the error rule: the rule starts over, and a net that has
        # trained past it ends the warm-up at its first window
        self.warming = bool(state.get("warming", self.warming)) and (
            self.cfg.warmup_until_train_err is not None
        )
        self.warmup_ended_at = state.get("warmup_ended_at")
