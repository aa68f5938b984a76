"""Job specs: validation, overrides, dry-run, and every job file resolving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.spec import JobSpec, ScalingConfig, SpecError, apply_overrides, from_dict, to_yaml
from tests.conftest import ROOT, load_job_spec, run_main

JOB_FILES = sorted(p.name for p in (ROOT / "jobs").glob("*.py"))


def test_overrides_are_typed() -> None:
    spec = apply_overrides(
        JobSpec(name="x"),
        [
            "optim.lr=0.2",
            "scaling.num_workers=4",
            "schedule.milestones=[10,20]",
            "model.shortcut=A",
            "model.num_classes=null",
        ],
    )
    assert spec.optim.lr == 0.2 and spec.scaling.num_workers == 4
    assert spec.schedule.milestones == [10, 20] and spec.model.shortcut == "A"
    assert apply_overrides(JobSpec(name="x"), ["optim.weight_decay=0"]).optim.weight_decay == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.bogus=1", r"optim.bogus: unknown key in 'optim'; valid keys: name, lr"),
        ("nosuch.key=1", r"nosuch.key: 'nosuch' is not a section; sections: model, data"),
        ("optim.lr=fast", r"optim.lr: expected float, got str 'fast'"),
        ("scaling.num_workers=2.5", r"scaling.num_workers: expected int"),
        (
            "scaling.strategy=horovod",
            r"'horovod' is not allowed; choose one of \['ddp', 'deepspeed'\]",
        ),
        ("model.shortcut=D", r"model.shortcut: .*'D'"),
        (
            "scaling.num_workers=300",
            r"global_batch: 256 is smaller than num_workers 300",
        ),
        ("scaling.num_workers=[1,2,3]", r"a range of two counts \[min, max\]"),
        ("scaling.num_workers=[4,2]", r"min_workers=4 is above num_workers=2"),
        ("scaling.zero_stage=2", r"zero_stage: set only with scaling.strategy=deepspeed"),
        ("data.scale_range=[480,256]", r"data.scale_range \(480, 256\): low > high"),
        ("optim.lr", r"expected section.key=value"),
        (
            "data.normalize=per_image",
            r"data.normalize: 'per_image' is not allowed; choose one of \['per_channel', ",
        ),
        ("optim.momentum_form=torch", r"optim.momentum_form: 'torch' is not allowed"),
        ("schedule.warmup_check_every=0", r"schedule.warmup_check_every=0 is out of range"),
        (  # the old, underscored spelling: no checkpoint records it, so none would be the best
            "checkpoint.best_metric=val_top1_err",
            r"checkpoint.best_metric: 'val_top1_err' is not a figure a checkpoint records",
        ),
    ],
)
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        apply_overrides(JobSpec(name="x"), [override])


def test_global_batch_and_lr_follow_the_workers() -> None:
    spec = apply_overrides(JobSpec(name="x"), ["scaling.num_workers=4", "scaling.micro_batch=32"])
    assert spec.accumulation() == 2  # 4 workers x 32 x 2 = 256
    assert spec.lr() == pytest.approx(0.1)
    spec = apply_overrides(JobSpec(name="x"), ["scaling.global_batch=512"])
    assert spec.lr() == pytest.approx(0.2)  # linear scaling from the paper's 0.1 at 256


def test_from_dict_rejects_unknown_top_level_key() -> None:
    with pytest.raises(SpecError, match="unknown key"):
        from_dict(JobSpec, {"name": "x", "colour": "red"})
    assert from_dict(ScalingConfig, {"num_workers": 2}).num_workers == 2


def test_yaml_dump_round_trips_values() -> None:
    text = to_yaml(apply_overrides(JobSpec(name="x"), ["optim.lr=0.3"]))
    assert "optim:\n" in text and "  lr: 0.3\n" in text


def offline(storage: Path) -> list[str]:
    """What lets a dry run's pre-flight pass without the job's dataset and bucket: synthetic
    data, a local checkpoint folder, no tracking server (the model, ranges and resume are
    still checked)."""
    return ["data.source=synthetic", f"checkpoint.storage={storage}", "tracking.enabled=false"]


@pytest.mark.parametrize("job", JOB_FILES)
def test_every_job_file_resolves(
    job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python jobs/FILE --dry-run`, run in this process (run_main)."""
    overrides = offline(tmp_path) if job != "ensemble_eval.py" else []  # its own flags
    code, stdout, stderr = run_main([f"jobs/{job}", "--dry-run", *overrides], capsys)
    assert code == 0, stderr
    if "STUDY = Study(" in (ROOT / "jobs" / job).read_text():  # a grid of jobs: its own dry run
        assert f"study {Path(job).stem} (" in stdout and "GPU-hours" in stdout
        assert "pre-flight ok for every cell" in stdout
        assert list(tmp_path.iterdir()) == []
        return
    assert f'name: "{Path(job).stem}"' in stdout
    if overrides:
        assert "# pre-flight ok: model: " in stdout
        assert list(tmp_path.iterdir()) == []  # the storage probe left nothing behind


def test_job_file_reports_bad_override_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["jobs/imagenet_r152.py", "--dry-run", "optim.momentun=0.8"], capsys)
    assert code == 2 and "optim.momentun: unknown key" in err


def test_paper_recipes() -> None:
    r152 = load_job_spec("imagenet_r152")
    assert (r152.scaling.global_batch, r152.optim.momentum, r152.optim.weight_decay) == (
        256,
        0.9,
        1e-4,
    )
    assert r152.lr() == pytest.approx(0.1) and r152.schedule.kind == "plateau"
    assert r152.schedule.max_iters == 600_000 and r152.data.scale_range == (256, 480)
    cifar = load_job_spec("cifar10_resnet")
    assert cifar.scaling.global_batch == 128 and cifar.lr() == pytest.approx(0.1)
    assert cifar.schedule.milestones == [32_000, 48_000] and cifar.schedule.max_iters == 64_000


# the single-job recipes (the studies, jobs/*_table*.py, run them)
RECIPES = ["cifar10_resnet", "cifar10_plain"] + sorted(
    p.stem for p in (ROOT / "jobs").glob("imagenet_*.py") if "_table" not in p.stem
)


@pytest.mark.parametrize("job", RECIPES)
def test_the_papers_recipes_subtract_the_mean_image_and_use_caffes_momentum(job: str) -> None:
    spec = load_job_spec(job)
    assert spec.data.normalize == "per_pixel_mean" and spec.optim.momentum_form == "caffe"
    defaults = JobSpec(name="x")  # what other jobs get: the per-channel form, torch's SGD
    assert defaults.data.normalize == "per_channel" and defaults.optim.momentum_form == "pytorch"


def test_resnet110_gets_the_papers_warmup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dry = ["jobs/cifar10_resnet.py", "--dry-run", *offline(tmp_path)]
    code, out, err = run_main([*dry, "model.name=cifar_resnet110"], capsys)
    assert code == 0, err
    assert "warmup_until_train_err: 0.8" in out and "warmup_iters: 0" in out
    code, out, err = run_main([*dry, "model.name=cifar_resnet56"], capsys)
    assert code == 0, err
    assert "warmup_until_train_err: null" in out


def test_three_workers_share_a_global_batch_of_256_unevenly_but_exactly() -> None:
    """256 over 3 workers: shares of 86 and 85 (the loss is weighted by share, so the step is
    the global batch's mean), and the elastic form sets the range."""
    spec = apply_overrides(JobSpec(name="x"), ["scaling.num_workers=3"])
    assert spec.micro_batch() == 86 and spec.accumulation() == 1
    capped = apply_overrides(spec, ["scaling.micro_batch=32"])
    assert capped.micro_batch() == 32 and capped.accumulation() == 3
    elastic = apply_overrides(spec, ["scaling.num_workers=[2,8]"])
    assert elastic.scaling.worker_range() == (2, 8) and elastic.scaling.elastic
    assert elastic.micro_batch(2) == 128 and elastic.micro_batch() == 32
    fixed = apply_overrides(elastic, ["scaling.num_workers=4"])  # one count: fixed again
    assert fixed.scaling.worker_range() == (4, 4) and not fixed.scaling.elastic


@pytest.mark.parametrize("name", ["x?y", "x#1", "a b", "a/b", "..", ".hidden", "-x", "", "é"])
def test_names_hold_letters_digits_dots_underscores_and_dashes_only(name: str) -> None:
    """A job's or study's name becomes a storage prefix and an MLflow tag: `x?y` and `x#1`
    would reach S3 as other keys than the name says, `..` would climb out of the folder."""
    from orchestrator.study.grid import Study

    allowed = r"only letters, digits and \. _ - \(alphanumeric first\)"
    quoted = re.escape(repr(name))
    with pytest.raises(SpecError, match=rf"^name={quoted}: {allowed}$"):
        apply_overrides(JobSpec(name="x"), [f"name={name}"])
    with pytest.raises(SpecError, match=rf"^study\.name={quoted}: {allowed}$"):
        Study(name, JobSpec(name="x"), [{"seed": 1}])
    for good in ("r50", "cifar10_table6-resnet20-s0", "v1.2"):
        assert apply_overrides(JobSpec(name="x"), [f"name={good}"]).name == good
