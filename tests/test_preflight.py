"""The driver's pre-flight: every bad spec of the audit is refused before a worker starts, with
a message naming the field and the fix, and nothing written; a worker error no restart can fix
is not retried by Ray (orchestrator.ray_callbacks.fail_fast)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator import launch, ray_callbacks
from orchestrator.checkpoint import CheckpointStore
from orchestrator.data.epochs import resume_problem
from orchestrator.spec import JobSpec
from tests.conftest import ROOT, load_job_spec, odd_shards_data, run_script
from tests.test_layout import HEAVY_THIRD_PARTY


def run_job(job: str, *args: str) -> tuple[int, str, str, list[str]]:
    """Run a job file as `python jobs/JOB ARGS` would, in a child process: (exit code, stdout,
    stderr, the heavy modules it had loaded when main returned). Without --dry-run a job
    that passed would go on to start Ray: the heavy list says whether it got that far."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = {[f'jobs/{job}', *args]!r}\n"
        "code = 0\n"
        f"try:\n    runpy.run_path('jobs/{job}', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code or 0\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_THIRD_PARTY!r})\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # should a job get past the pre-flight, run_ray imports ray and stops at once (a job
        # server address is refused) instead of starting a Ray cluster
        env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"},
    )
    heavy_line = [line for line in out.stderr.splitlines() if line.startswith("HEAVY ")]
    assert heavy_line, out.stderr[-2000:]
    return out.returncode, out.stdout, out.stderr, ast.literal_eval(heavy_line[-1][6:])


# ------------------------------------------------------------- the job files, as a user runs them


@pytest.mark.parametrize(
    ("override", "field", "fix"),
    [
        ("model.name=resnet999", "model.name=resnet999: unknown model", "valid names: resnet18"),
        (  # the R152 recipe's stride_in_1x1=True, which basic blocks refuse
            "model.name=resnet34",
            "model.stride_in_1x1=true: resnet34 does not take option stride_in_1x1",
            "set model.stride_in_1x1=null",
        ),
        ("tracking.log_every=0", "tracking.log_every=0 is out of range", "set it >= 1"),
        ("checkpoint.keep_last=-5", "checkpoint.keep_last=-5 is out of range", "set it >= 1"),
        ("optim.lr=NaN", "optim.lr=nan: not finite", "give a finite number"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_the_audits_bad_specs_are_refused_before_anything_starts(
    tmp_path: Path, override: str, field: str, fix: str, dry_run: bool
) -> None:
    storage = tmp_path / "runs"
    args = [override, "data.source=synthetic", f"checkpoint.storage={storage}"]
    code, _, err, heavy = run_job("imagenet_r152.py", *(["--dry-run"] if dry_run else []), *args)
    assert code == 2, err[-2000:]
    assert field in err and fix in err, err[-2000:]
    assert heavy == [], f"refused, yet it loaded {heavy}"  # no torch, no Ray: nothing started
    assert not storage.exists(), "a refused job wrote to its checkpoint storage"


def test_a_good_spec_passes_and_the_dry_run_says_what_it_checked(
    tmp_path: Path, odd_local_shards: Path
) -> None:
    storage = tmp_path / "runs"
    args = [*odd_shards_data(odd_local_shards), f"checkpoint.storage={storage}"]
    args.append("data.normalize=per_pixel_mean")  # its mean image is read numpy-free too
    args.append("tracking.enabled=false")  # no tracking server here
    code, out, err, heavy = run_job("smoke.py", "--dry-run", *args)
    assert code == 0, err[-2000:]
    checked = [line for line in out.splitlines() if line.startswith("# pre-flight ok: ")]
    kinds = [line.split(": ", 2)[1].split(":")[0] for line in checked]
    assert kinds == ["data", "world size", "model", "tracking", "checkpoint storage", "resume"]
    # smoke: 2 workers x global batch 32, one loader worker each: 2 streams of 16
    assert "world size: 2 (fixed), micro-batch 16 x 1 micro-batches, 16 each samples" in out
    assert "train 48 samples" in out and "3 classes" in out, (
        out
    )  # 3 classes x 16, from the manifest
    assert "cifar_resnet20" in out and "starts at step 0" in out
    assert "3 classes, mean image 3x224x224;" in out
    assert heavy == [], f"a dry run loaded {heavy}"  # the manifest and markers read torch-free
    assert not storage.exists(), "the probe left folders behind"


# --------------------------------------------------- through main() with a real small dataset


@pytest.fixture
def smoke() -> JobSpec:
    spec = load_job_spec("smoke")
    spec.tracking.enabled = False  # no tracking server in these tests
    return spec


@pytest.fixture
def no_workers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records a worker start: a refused job must never reach run_ray or run_local."""
    started: list[str] = []
    monkeypatch.setattr(launch, "run_ray", lambda spec: started.append("ray"))
    monkeypatch.setattr(launch, "run_local", lambda spec: started.append("local"))
    return started


def refused(
    smoke: JobSpec, capsys: pytest.CaptureFixture[str], *overrides: str, dry_run: bool = False
) -> str:
    code = launch.main(smoke, [*(["--dry-run"] if dry_run else []), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "pre-flight refused job" in err, err
    return err


def test_a_dataset_without_a_manifest_is_refused(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    unfinished = tmp_path / "unfinished"  # shards copied, the manifest (written last) not yet
    unfinished.mkdir()
    for shard in odd_local_shards.glob("*.tar"):
        (unfinished / shard.name).write_bytes(shard.read_bytes())
    storage = tmp_path / "runs"
    err = refused(smoke, capsys, *odd_shards_data(unfinished), f"checkpoint.storage={storage}")
    assert f"data.url={unfinished}: cannot read dataset" in err and "no manifest.json" in err
    assert "Fix: convert the dataset there" in err
    assert no_workers == [] and not storage.exists()


def test_per_pixel_mean_without_a_mean_image_is_refused(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    """A dataset converted before mean images were stored (or indexed): its manifest names no
    mean image. And one whose mean image changed after the conversion."""
    older = tmp_path / "older"
    older.mkdir()
    for shard in odd_local_shards.glob("*.tar"):
        (older / shard.name).write_bytes(shard.read_bytes())
    manifest = json.loads((odd_local_shards / "manifest.json").read_text())
    entry = manifest.pop("mean_image")
    (older / "manifest.json").write_text(json.dumps(manifest))
    storage = tmp_path / "runs"
    data = [*odd_shards_data(older), f"checkpoint.storage={storage}"]
    err = refused(smoke, capsys, *data, "data.normalize=per_pixel_mean")
    assert f"data.normalize=per_pixel_mean: dataset {older} has no mean image" in err
    assert "Fix: set data.normalize=per_channel" in err
    assert "reconvert the dataset with datasets/cifar10.py or datasets/imagenet.py" in err
    assert no_workers == [] and not storage.exists()
    # the same dataset passes with the per-channel statistics it has
    assert launch.main(smoke, ["--dry-run", *data]) == 0, capsys.readouterr().err
    # a mean image other than the one the manifest names
    (older / "manifest.json").write_text(json.dumps({**manifest, "mean_image": entry}))
    (older / entry["file"]).write_bytes(b"not the converter's")
    err = refused(smoke, capsys, *data, "data.normalize=per_pixel_mean")
    assert "not the manifest's" in err and "Fix: set data.normalize=per_channel" in err


def test_a_class_count_other_than_the_datasets_is_refused(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    storage = tmp_path / "runs"
    data = odd_shards_data(odd_local_shards)
    err = refused(smoke, capsys, *data, "model.num_classes=10", f"checkpoint.storage={storage}")
    assert "model.num_classes=10, but dataset" in err and "has 3 classes" in err
    assert "set model.num_classes=3, or null" in err
    assert no_workers == [] and not storage.exists()


def test_too_few_samples_for_the_world_size_is_refused(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    storage = tmp_path / "runs"
    data = odd_shards_data(odd_local_shards)  # 48 training samples
    too_many = ["scaling.num_workers=64", "scaling.global_batch=64"]  # 64 ranks, 1 sample each
    err = refused(smoke, capsys, *data, *too_many, f"checkpoint.storage={storage}")
    assert "scaling.num_workers=64: split 'train'" in err and "has 48 samples" in err
    assert "leaves a worker of 64 without a sample: lower the number of workers" in err
    assert no_workers == [] and not storage.exists()
    # the same rule the loader enforces: 48 ranks of one sample each do fit
    fits = ["scaling.num_workers=48", "scaling.global_batch=48", f"checkpoint.storage={storage}"]
    assert launch.main(smoke, ["--dry-run", *data, *fits]) == 0, capsys.readouterr().err


def test_problems_of_one_stage_are_reported_together(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    data = odd_shards_data(odd_local_shards)
    err = refused(smoke, capsys, *data, "model.name=resnet999", "model.num_classes=7", dry_run=True)
    assert "model.num_classes=7" in err and "model.name=resnet999" in err
    assert no_workers == []


def test_unwritable_checkpoint_storage_is_refused(
    tmp_path: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    blocked = tmp_path / "a-file"  # a file where the storage folder should be
    blocked.write_text("not a folder")
    err = refused(smoke, capsys, "data.source=synthetic", f"checkpoint.storage={blocked}")
    assert f"checkpoint.storage={blocked}: cannot write, read and delete a probe" in err
    assert "point checkpoint.storage at a writable place" in err
    assert no_workers == [] and blocked.read_text() == "not a folder"


def test_s3_storage_and_data_are_checked_on_s3(
    s3_prefix: str,
    smoke: JobSpec,
    capsys: Any,
    no_workers: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator import s3
    from orchestrator.storage import open_storage

    ok = launch.main(
        smoke, ["--dry-run", "data.source=synthetic", f"checkpoint.storage={s3_prefix}"]
    )
    assert ok == 0, capsys.readouterr().err
    assert "wrote, read and deleted a probe under s3://" in capsys.readouterr().out
    assert open_storage(s3_prefix).sizes() == {}, "the probe is gone"
    err = refused(smoke, capsys, f"data.url={s3_prefix}/no-such-dataset", dry_run=True)
    assert "no manifest.json" in err
    # credentials the store refuses (not a missing bucket: SeaweedFS creates one on a write)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setattr(s3, "_clients", {})  # clients are cached per process
    err = refused(smoke, capsys, "data.source=synthetic", f"checkpoint.storage={s3_prefix}")
    assert f"checkpoint.storage={s3_prefix}: cannot write, read and delete a probe" in err
    assert "fix the credentials or the permissions" in err


# ------------------------------------------------------------------------------- resuming


def commit_step(storage: Path, name: str, step: int, position: dict[str, Any] | None) -> None:
    """A committed checkpoint as the Checkpointer leaves it, minus the torch files' contents
    (the pre-flight reads only the marker)."""
    store = CheckpointStore(f"{storage}/{name}/checkpoints")
    store.put(step, "trainer.pt", b"state")
    store.commit(step, {}, position)


MID_EPOCH = {
    "epoch": 0,
    "step_in_epoch": 2,
    "steps_per_epoch": 3,
    "global_batch": 16,
    "streams": 2,
    "shuffle_buffer": 16,
    "seed": 0,
    "epoch_mode": "exact",
    "samples_per_epoch": 0,
    "source": "shards",
}


def test_resume_rule() -> None:
    same = {k: v for k, v in MID_EPOCH.items() if "epoch" not in k or k == "epoch_mode"}
    assert resume_problem(MID_EPOCH, same) is None
    # the data order no longer depends on the world size or the loader workers
    assert resume_problem(MID_EPOCH, {**same, "world_size": 4, "loader_workers": 3}) is None
    problem = resume_problem(MID_EPOCH, {**same, "global_batch": 32})
    assert problem and "scaling.global_batch was 16 and is now 32" in problem
    problem = resume_problem(MID_EPOCH, {**same, "streams": 4, "seed": 1})
    assert "data.streams was 2 and is now 4" in problem and "seed was 0 and is now 1" in problem
    for boundary in (0, 3):  # an epoch's start, or its end before the roll-over
        at = {**MID_EPOCH, "step_in_epoch": boundary}
        assert resume_problem(at, {**same, "global_batch": 32}) is None
    assert resume_problem({**MID_EPOCH, "source": "synthetic"}, {**same, "seed": 1}) is None
    older = {"epoch": 0, "batch_in_epoch": 2, "batches_per_epoch": 3, "world_size": 2}
    assert "earlier version" in (resume_problem(older, same) or "")


def test_a_resume_that_cannot_be_exact_is_refused_naming_both_values(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    storage = tmp_path / "runs"
    commit_step(storage, "smoke", 4, MID_EPOCH)  # 2 ranks x 1 loader worker, mid-epoch
    data = odd_shards_data(odd_local_shards)  # 1 loader worker; smoke runs 2 ranks
    common = [*data, f"checkpoint.storage={storage}", "scaling.global_batch=16"]
    for workers in ("2", "1", "[1,2]"):  # any world size resumes it exactly
        args = [*common, f"scaling.num_workers={workers}", "--dry-run"]
        assert launch.main(smoke, args) == 0, capsys.readouterr().err
        assert "exact at any world size" in capsys.readouterr().out
    # 1 worker: data.streams=0 would mean 1 stream now; the checkpoint's 2 are kept
    assert launch.main(smoke, [*common, "scaling.num_workers=1", "--dry-run"]) == 0
    assert "keeps the checkpoint's 2 streams" in capsys.readouterr().out
    err = refused(smoke, capsys, *common, "scaling.global_batch=32")
    assert "scaling.global_batch was 16 and is now 32" in err
    assert "stopped mid-epoch (epoch 0, step 2 of 3)" in err
    err = refused(smoke, capsys, *common, "data.streams=4")
    assert "data.streams was 2 and is now 4" in err
    assert no_workers == []

    at_end = tmp_path / "at-end"  # at an epoch boundary anything resumes exactly
    commit_step(at_end, "smoke", 6, {**MID_EPOCH, "step_in_epoch": 0, "epoch": 1})
    args = [*data, f"checkpoint.storage={at_end}", "scaling.global_batch=8", "--dry-run"]
    assert launch.main(smoke, args) == 0, capsys.readouterr().err


# ------------------------------------------------------------ elastic ranges (num_workers=[a,b])


def test_an_elastic_range_lists_every_world_size_with_its_batches(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    data = [*odd_shards_data(odd_local_shards), f"checkpoint.storage={tmp_path / 'runs'}"]
    args = [*data, "scaling.num_workers=[1,3]", "scaling.global_batch=12", "data.streams=6"]
    assert launch.main(smoke, [*args, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "world sizes 1..3 (elastic), global batch 12 at each over 6 streams: " in out
    assert "1: 12 x 1 micro-batches, 12 each samples per worker" in out
    assert "2: 6 x 1 micro-batches, 6 each samples per worker" in out
    assert "3: 4 x 1 micro-batches, 4 each samples per worker" in out
    # a micro-batch cap: accumulation makes up the global batch at every size
    assert launch.main(smoke, [*args, "scaling.micro_batch=4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1: 4 x 3 micro-batches" in out and "2: 4 x 2 micro-batches" in out
    # 4 streams over 3 workers: one worker reads two streams (said, not refused)
    assert launch.main(smoke, [*data, "scaling.num_workers=[2,3]", "scaling.global_batch=12",
                               "data.streams=4", "--dry-run"]) == 0  # fmt: skip
    assert "3: 4 x 1 micro-batches, 3 to 6 samples per worker (uneven" in capsys.readouterr().out


def test_an_elastic_range_above_the_streams_or_the_batch_is_refused(
    tmp_path: Path, odd_local_shards: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    data = [*odd_shards_data(odd_local_shards), f"checkpoint.storage={tmp_path / 'runs'}"]
    err = refused(smoke, capsys, *data, "scaling.num_workers=[2,4]", "data.streams=3")
    assert "scaling.num_workers=[2,4]: 4 workers is above the 3 canonical streams" in err
    assert "set data.streams to a multiple of every size in the range (e.g. 12)" in err
    # above the global batch the spec itself refuses it, before the pre-flight
    code = launch.main(smoke, [*data, "scaling.num_workers=[2,8]", "scaling.global_batch=4"])
    assert code == 2
    assert "scaling.global_batch: 4 is smaller than num_workers 8" in capsys.readouterr().err
    assert no_workers == []


def test_resume_from_a_checkpoint_that_is_not_committed_is_refused(
    tmp_path: Path, smoke: JobSpec, capsys: Any, no_workers: list[str]
) -> None:
    fork = tmp_path / "other" / "checkpoints" / "step-00000005"
    fork.mkdir(parents=True)
    (fork / "trainer.pt").write_bytes(b"half a save")  # no COMMITTED marker
    storage = tmp_path / "runs"
    err = refused(
        smoke,
        capsys,
        "data.source=synthetic",
        f"checkpoint.storage={storage}",
        f"--resume-from={fork}",
    )
    assert f"checkpoint.resume_from={fork}: no committed checkpoint there" in err
    assert no_workers == []


def test_the_worker_refuses_an_inexact_resume_of_an_older_checkpoint(
    tmp_path: Path, odd_local_shards: Path
) -> None:
    """A checkpoint whose marker predates data positions passes the pre-flight; the worker
    reads the position from its trainer state and refuses, before loading any weights."""
    storage = tmp_path / "runs"
    train = [
        "--local",
        "name=old",
        *odd_shards_data(odd_local_shards, num_workers=0),
        f"checkpoint.storage={storage}",
        "scaling.num_workers=1",
        "scaling.global_batch=8",
        "schedule.max_iters=2",
        "schedule.milestones=[]",
        "checkpoint.every_iters=1",
        "tracking.enabled=false",
        "eval.at_end=false",
    ]
    run_script("jobs/smoke.py", *train, env={"OMP_NUM_THREADS": "1"})  # 2 of 6 batches
    marker_path = storage / "old" / "checkpoints" / "step-00000002" / "COMMITTED"
    marker = json.loads(marker_path.read_text())
    assert marker["position"]["step_in_epoch"] == 2
    del marker["position"], marker["spec"]  # as a checkpoint written before markers held them
    marker_path.write_text(json.dumps(marker))
    more = [*train, "schedule.max_iters=4", "data.shuffle_buffer=8"]
    proc = subprocess.run(
        [sys.executable, "jobs/smoke.py", *more],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    assert "marker predates data positions" in proc.stdout
    assert "SpecError: step 2: cannot resume exactly" in proc.stderr, proc.stderr[-3000:]
    assert "data.shuffle_buffer was 16 and is now 8" in proc.stderr
    assert not (storage / "old" / "checkpoints" / "step-00000003").exists()


# -------------------------------------------------------------------------- Ray's restarts


def test_fail_fast_stops_ray_retrying_only_what_a_restart_cannot_fix() -> None:
    """The callback against the installed Ray's own wrapping of a worker's exception."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    from orchestrator.data.manifest import DataError, DataUnavailable
    from orchestrator.runtime import NotRetried
    from orchestrator.spec import SpecError
    from orchestrator.train import NonFiniteLoss

    def as_ray_reports(err: Exception) -> Exception:
        try:
            raise err
        except Exception as raised:  # noqa: BLE001 - wrapped as Ray's worker does
            return construct_user_exception_with_traceback(raised)

    callback = ray_callbacks.fail_fast()
    for err in (SpecError("bad"), DataError("no manifest"), NonFiniteLoss("nan at step 3")):
        with pytest.raises(NotRetried, match=f"rank 1: {type(err).__name__}: "):
            callback.after_exception(None, {0: RayActorError(), 1: as_ray_reports(err)})
    for err in (DataUnavailable("S3 down"), ConnectionError("reset"), RuntimeError("?")):
        callback.after_exception(None, {0: as_ray_reports(err)})  # left to max_failures
    callback.after_exception(None, {0: RayActorError()})  # a lost worker


def test_ray_trains_callbacks_that_only_start_an_unused_actor_are_left_out() -> None:
    """Against the installed Ray's own default callbacks: the one that starts a DatasetManager
    actor with every worker group is left out when a job passes no Ray Datasets (ours never
    do), kept when it does; the PlacementGroupCleaner's is left out in a job's driver, kept in
    a study's trial; the others stay (test_e2e_ray and test_fault_tolerance check real jobs)."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks import DatasetsCallback

    def names(trainer: Any) -> set[str]:
        return {type(cb).__name__ for cb in trainer._create_default_callbacks()}

    trial = ray_callbacks.torch_trainer()(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    driver = ray_callbacks.torch_trainer(from_job_driver=True)(
        lambda: None, scaling_config=ScalingConfig(num_workers=1)
    )
    assert "DatasetsCallback" not in names(trial) | names(driver)
    assert {"BackendSetupCallback", "PlacementGroupCleanerCallback"} <= names(trial)
    assert "PlacementGroupCleanerCallback" not in names(driver)
    assert names(trial) - names(driver) == {"PlacementGroupCleanerCallback"}
    trial.datasets = {"train": object()}  # a job that passes a Ray Dataset keeps it
    assert any(isinstance(cb, DatasetsCallback) for cb in trial._create_default_callbacks())


# --------------------------------------------- local checkpoint storage on a multi-node cluster


class _RayStandIn:
    """What check_shared_storage reads of a connected `ray`: its nodes, two of them alive."""

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def nodes() -> list[dict[str, Any]]:
        return [{"Alive": True}, {"Alive": True}, {"Alive": False}]


def test_local_checkpoint_storage_on_two_ray_nodes_is_refused_unless_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.preflight import PreflightError, check_cluster
    from orchestrator.spec import apply_overrides

    local = apply_overrides(JobSpec(name="x"), [f"checkpoint.storage={tmp_path}"])
    # not connected to Ray (a --local job, a dry run): nothing to count, nothing refused
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert "checked against Ray's nodes once connected" in check_cluster(local)[0]
    monkeypatch.setitem(sys.modules, "ray", _RayStandIn)
    with pytest.raises(PreflightError) as refused:
        check_cluster(local)
    (problem,) = refused.value.problems
    assert f"checkpoint.storage={tmp_path} is a local folder" in problem
    assert "has 2 alive nodes" in problem and "checkpoint.storage=s3://" in problem
    assert "checkpoint.shared_filesystem=true" in problem
    shared = apply_overrides(local, ["checkpoint.shared_filesystem=true"])
    assert "on 2 Ray node(s) (checkpoint.shared_filesystem=true)" in check_cluster(shared)[0]
    on_s3 = apply_overrides(JobSpec(name="x"), ["checkpoint.storage=s3://b/p"])
    assert "s3://" in check_cluster(on_s3)[0]
