"""Learning-rate schedules: the warm-up by the paper's rule (ResNet-110: lr 0.01 until the
training error is below 80%), decided alike on every rank and carried through checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.schedule import LRSchedule
from orchestrator.spec import JobSpec, ScheduleConfig, SpecError, apply_overrides
from orchestrator.train import warmup_decision
from tests.conftest import odd_shards_data, run_script

RULE = ScheduleConfig(
    kind="step",
    max_iters=1000,
    milestones=[500],
    warmup_until_train_err=0.8,
    warmup_factor=0.1,
    warmup_check_every=20,
)


def test_the_rule_warms_up_until_the_error_is_below_the_threshold() -> None:
    s = LRSchedule(RULE, base_lr=0.1)
    assert s.warming and s.lr(0) == pytest.approx(0.01) and s.lr(700) == pytest.approx(0.001)
    assert [step for step in range(1, 101) if s.checks_warmup(step)] == [20, 40, 60, 80, 100]
    assert not s.observe_train_error(0.85, 20) and s.lr(20) == pytest.approx(0.01)
    assert not s.observe_train_error(0.80, 40)  # "below 80%": 80% itself is not below
    assert s.observe_train_error(0.79, 60)
    assert not s.warming and s.warmup_ended_at == 60 and not s.checks_warmup(80)
    assert s.lr(60) == pytest.approx(0.1) and s.lr(500) == pytest.approx(0.01)
    assert not s.observe_train_error(0.9, 80) and s.lr(80) == pytest.approx(0.1)  # once only


@pytest.mark.parametrize("switched", [False, True], ids=["resumed-warming", "resumed-after"])
def test_the_decision_survives_a_checkpoint(switched: bool) -> None:
    s = LRSchedule(RULE, base_lr=0.1)
    s.observe_train_error(0.9, 20)
    if switched:
        s.observe_train_error(0.5, 40)
    state = json.loads(json.dumps(s.state_dict()))  # what a checkpoint keeps, as plain data
    resumed = LRSchedule(RULE, base_lr=0.1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == s.state_dict()
    assert resumed.warming is not switched
    assert resumed.lr(41) == pytest.approx(0.1 if switched else 0.01)
    assert resumed.checks_warmup(60) is not switched
    assert resumed.warmup_ended_at == (40 if switched else None)


def test_fixed_warmups_work_as_before_and_exclude_the_rule() -> None:
    fixed = LRSchedule(ScheduleConfig(max_iters=1000, warmup_iters=400), base_lr=0.1)
    assert not fixed.warming and not fixed.checks_warmup(20)
    assert fixed.lr(399) == pytest.approx(0.01) and fixed.lr(400) == pytest.approx(0.1)
    old = {"best": 1.0, "bad_evals": 0, "drops": 0}  # a checkpoint from before the rule
    fixed.load_state_dict(old)
    assert not fixed.warming and fixed.lr(0) == pytest.approx(0.01)
    with pytest.raises(SpecError, match=r"schedule.warmup_until_train_err: set either it or"):
        apply_overrides(
            JobSpec(name="x"), ["schedule.warmup_iters=400", "schedule.warmup_until_train_err=0.8"]
        )
    with pytest.raises(SpecError, match=r"warmup_until_train_err=1.5 is out of range"):
        apply_overrides(JobSpec(name="x"), ["schedule.warmup_until_train_err=1.5"])


# ------------------------------------------------------------------------ across ranks


def _decide(rank: int, world: int, init: str, out: str) -> None:
    """Rank 0 sees 10% error, rank 1 95%: alone, rank 0 would switch at once and rank 1 never;
    over both (52.5%, then 85%) they must switch together."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        s = LRSchedule(RULE, base_lr=0.1)
        errors = [[0.95, 0.75, 0.10], [0.95, 0.95, 0.95]][rank]  # per window, this rank
        ended = []
        for window, err in enumerate(errors, start=1):
            step = window * RULE.warmup_check_every
            samples = 100 if rank == 0 else 300  # rank 1's numbers weigh 3x
            hits = torch.tensor(float(round((1 - err) * samples)))
            if warmup_decision(s, hits, samples, step):
                ended.append(step)
        torch.save({"ended": ended, "state": s.state_dict()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_the_warmup_at_the_same_step(tmp_path: Path) -> None:
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_decide, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # windows: (0.95*100 + 0.95*300)/400 = 0.95; (0.75*100 + 0.95*300)/400 = 0.9;
    # (0.10*100 + 0.95*300)/400 = 0.7375 < 0.8: both switch after step 60, not before
    assert ranks[0]["ended"] == ranks[1]["ended"] == [60]
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state"]["warmup_ended_at"] == 60


def test_the_training_loop_decides_alike_on_two_ranks(
    tmp_path: Path, odd_local_shards: Path
) -> None:
    """2 ranks train on different shards (per-pixel mean, Caffe momentum: the paper's
    recipe): the warm-up ends at the same step on both (each rank's copy of the schedule is in
    its checkpoint file), at a decision step; the step before it ran at the warm-up's lr, the
    steps after it at the full one, and a checkpoint taken there resumes without warming up."""
    run_script(
        "jobs/smoke.py",
        "--local",
        "name=warm",
        f"checkpoint.storage={tmp_path}",
        *odd_shards_data(odd_local_shards),
        "data.pca_lighting=0",
        "data.normalize=per_pixel_mean",
        "optim.momentum_form=caffe",
        "optim.lr=0.05",
        "tracking.enabled=false",
        "eval.every_iters=0",
        "eval.at_end=false",
        "checkpoint.at_epoch_end=false",
        "checkpoint.every_iters=4",
        "scaling.num_workers=2",
        "scaling.global_batch=8",
        "schedule.max_iters=8",
        "schedule.milestones=[]",
        # 3 classes: chance is 67% error, so a 99% threshold ends the warm-up at the first check
        "schedule.warmup_until_train_err=0.99",
        "schedule.warmup_check_every=4",
        env={"OMP_NUM_THREADS": "1"},
    )
    step = tmp_path / "warm" / "checkpoints" / "step-00000008"
    ranks = [torch.load(step / f"rank-{r:05d}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["schedule"] == ranks[1]["schedule"]
    assert ranks[0]["schedule"]["warming"] is False
    assert ranks[0]["schedule"]["warmup_ended_at"] == 4
    trainer = torch.load(step / "trainer.pt", weights_only=True)
    assert trainer["schedule"] == ranks[0]["schedule"]
    assert trainer["strategy"]["last_lr"] == pytest.approx(0.05)  # the full lr after step 4
    marker = json.loads((step / "COMMITTED").read_text())
    assert marker["metrics"]["train/lr"] == pytest.approx(0.05)
    # saved right after the decision: step 4 ran warm, a resume from here would not
    at_switch = torch.load(step.parent / "step-00000004" / "trainer.pt", weights_only=True)
    assert at_switch["strategy"]["last_lr"] == pytest.approx(0.005)
    assert at_switch["schedule"]["warming"] is False
