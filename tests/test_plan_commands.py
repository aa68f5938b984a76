"""The plan's batch policy as commands a job takes: Goyal et al.'s warm-up above the paper's
batch, gradient accumulation to keep the job file's batch on fewer GPUs, and every printed
command accepted by the job's own --dry-run (run in this process, as the script would)."""

from __future__ import annotations

import runpy
import shlex
import sys
from pathlib import Path

import pytest

from orchestrator import plan
from orchestrator.plan import job
from orchestrator.schedule import LRSchedule
from orchestrator.spec import JobSpec, ScalingConfig, ScheduleConfig

ROOT = Path(__file__).resolve().parent.parent
R152 = str(ROOT / "jobs" / "imagenet_r152.py")
CIFAR = str(ROOT / "jobs" / "cifar10_resnet.py")


@pytest.fixture(scope="module")
def r152() -> JobSpec:
    return job.load_job_spec(R152)


def test_64_nodes_warm_up_linearly_over_5_epochs_from_the_lr_of_batch_256(r152: JobSpec) -> None:
    resolved = job.resolve_for_cluster(r152, [], num_gpus=512)
    spec = resolved.spec
    iters = -(-5 * 1_281_167 // 16_384)  # 5 epochs of ImageNet at 16,384: 391
    assert iters == 391
    assert resolved.added[-3:] == [
        f"schedule.warmup_iters={iters}",
        "schedule.warmup_factor=0.015625",  # 256 / 16,384
        "schedule.warmup_linear=true",
    ]
    # what the training loop's schedule makes of them: 0.1 at the start, 6.4 once warm
    lr = LRSchedule(spec.schedule, spec.lr())
    assert lr.lr(0) == pytest.approx(0.1)
    assert lr.lr(iters // 2) == pytest.approx(0.1 + (6.4 - 0.1) * (iters // 2) / iters)
    assert lr.lr(iters) == pytest.approx(6.4) and lr.lr(iters - 1) < 6.4
    assert any("Goyal et al. (2017)" in why and "5 epochs" in why for why in resolved.why)


def test_the_warm_up_follows_the_train_set_and_stays_off_at_the_papers_batch(
    r152: JobSpec,
) -> None:
    small = job.resolve_for_cluster(r152, [], num_gpus=16, train_images=100_000)
    assert "schedule.warmup_iters=977" in small.added  # ceil(5 x 100,000 / 512)
    assert "schedule.warmup_factor=0.5" in small.added
    for gpus in (8, 4):  # the job file's 256: no warm-up
        assert not [a for a in job.resolve_for_cluster(r152, [], gpus).added if "warmup" in a]


def test_a_warm_up_the_job_or_the_user_chose_is_kept_and_said(r152: JobSpec) -> None:
    mine = job.resolve_for_cluster(r152, ["schedule.warmup_iters=1000"], num_gpus=512)
    assert mine.spec.schedule.warmup_iters == 1000 and mine.spec.schedule.warmup_factor == 0.1
    assert any("yours (schedule.warmup_iters)" in why for why in mine.why)
    own = JobSpec(
        name="own",
        schedule=ScheduleConfig(max_iters=1000, warmup_iters=100),
        scaling=ScalingConfig(num_workers=1, global_batch=256),
    )
    resolved = job.resolve_for_cluster(own, [], num_gpus=4)
    assert resolved.spec.schedule.warmup_iters == 25  # the job's own, scaled with the batch
    assert any("the job file's (scaled)" in why for why in resolved.why)


def test_fewer_gpus_keep_the_papers_256_by_accumulation(r152: JobSpec) -> None:
    for gpus, steps in ((2, 4), (1, 8), (3, 3)):
        resolved = job.resolve_for_cluster(r152, [], num_gpus=gpus)
        spec = resolved.spec
        assert resolved.added == [f"scaling.num_workers={gpus}", "scaling.micro_batch=32"]
        assert (spec.scaling.global_batch, spec.micro_batch(), spec.accumulation()) == (
            256,
            32,
            steps,
        )
        assert spec.lr() == pytest.approx(0.1) and spec.schedule.max_iters == 600_000
        [why] = resolved.why
        assert f"accumulates {steps} micro-batches of 32" in why
        assert f"scaling.global_batch={32 * gpus}" in why  # the alternative, named
    # the user's own global batch wins: the schedule is rescaled instead
    small = job.resolve_for_cluster(r152, ["scaling.global_batch=64"], num_gpus=2)
    assert small.spec.accumulation() == 1 and small.spec.schedule.max_iters == 2_400_000


def test_a_fixed_lr_at_another_batch_is_said(r152: JobSpec) -> None:
    cifar = job.load_job_spec(CIFAR)  # optim.lr=0.1 at 2 GPUs x 64
    resolved = job.resolve_for_cluster(cifar, [], num_gpus=8)
    assert resolved.spec.lr() == 0.1 and not [a for a in resolved.added if "warmup" in a]
    assert any("optim.lr=0.1 is fixed" in w and "optim.lr=0.4" in w for w in resolved.why)


def _printed(out: str, prefix: str) -> list[str]:
    [line] = [line for line in out.splitlines() if line.startswith(prefix)]
    return shlex.split(line.removeprefix(prefix))


@pytest.mark.parametrize(
    ("script", "cluster", "overrides"),
    [
        (R152, ["--nodes", "64"], []),  # 16,384 with the warm-up
        (R152, ["--nodes", "1", "--gpus-per-node", "3"], []),  # 256 by accumulation
        (R152, ["--nodes", "2"], ["model.name=resnet50", "model.compile=true"]),
        (CIFAR, ["--nodes", "1", "--gpus-per-node", "1", "--img-per-s-per-gpu", "5000"], []),
        # ResNet-110's warm-up rule (the job's finalize) beside the plan's overrides
        (
            CIFAR,
            ["--nodes", "4", "--img-per-s-per-gpu", "5000"],
            ["model.name=cifar_resnet110", "optim.lr=null", "optim.base_lr=0.2"],
        ),
    ],
)
def test_every_printed_command_passes_the_jobs_dry_run(
    script: str,
    cluster: list[str],
    overrides: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan's `python JOB --dry-run ...` line, run as the job file's own __main__ here;
    synthetic data and a local folder stand in for ImageNet and S3 (as overrides the plan
    passes through, so they are part of the printed command)."""
    local = ["data.source=synthetic", f"checkpoint.storage={tmp_path}", "tracking.enabled=false"]
    assert plan.main([script, *cluster, *overrides, *local]) == 0
    out = capsys.readouterr().out
    dry = _printed(out, "note: check it first (the pre-flight, where the job will run): ")
    submit = _printed(out, "note: submit (needs a real cluster): ")
    assert dry[:3] == ["python", script, "--dry-run"]
    assert submit[:5] == ["ray", "job", "submit", "--", "python"]
    assert submit[5:] == [script, *dry[3:]]  # the same job, the same overrides
    monkeypatch.setattr(sys, "argv", dry[1:])
    monkeypatch.syspath_prepend(str(Path(script).parent))  # as `python jobs/X.py` has it
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err
    assert "# pre-flight ok: resume" in printed.out
    for override in dry[3:]:  # the plan's warm-up and accumulation reached the spec
        key, value = override.split("=", 1)
        if key in ("schedule.warmup_iters", "scaling.micro_batch"):
            assert f"{key.split('.')[1]}: {value}" in printed.out
