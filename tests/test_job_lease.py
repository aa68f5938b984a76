"""One writer per job (orchestrator.job_lease): a second driver is refused naming the holder;
a lease expires by the store's clock, a dead holder's is taken at once, `--take-over` replaces
a live one and its holder finds out; conditional writes on a local folder and on SeaweedFS's
S3. The end to end: two `--local` submissions of one job at once, the second refused, the first
ending with the weights of a lone run."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator.errors import UsageError
from orchestrator.job_lease import LEASE, Lease, LeaseHeld
from orchestrator.stack import Stack
from orchestrator.storage import open_storage
from tests.conftest import ROOT, run_script
from tests.test_train import TINY, local_job


def _lease(folder: Path | str, **kwargs: object) -> Lease:
    return Lease(str(folder), "job twin", **kwargs)  # type: ignore[arg-type]


def _state(folder: Path | str) -> dict:
    return json.loads(open_storage(str(folder)).get(LEASE))


def test_a_second_driver_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = _lease(tmp_path).acquire()
    with pytest.raises(LeaseHeld) as refused:
        _lease(tmp_path).acquire()
    text = str(refused.value)
    assert isinstance(refused.value, UsageError) and refused.value.exit_code == 2
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in text, text
    assert f"since {first.since}" in text and "--take-over" in text and "expired" in text, text
    assert _state(tmp_path)["token"] == first.token  # the refused one wrote nothing


def test_a_lease_expires_by_the_stores_clock_not_the_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _lease(tmp_path, ttl_s=1.0).acquire()
    # a reader whose clock is an hour ahead still sees a fresh lease: the age is the folder's
    ahead = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: ahead)
    with pytest.raises(LeaseHeld):
        _lease(tmp_path).acquire()
    monkeypatch.undo()
    time.sleep(1.6)
    second = _lease(tmp_path).acquire()  # not renewed for longer than its 1 s: free
    assert _state(tmp_path)["token"] == second.token
    assert first.renew() is False, "the first holder finds its lease taken"


def test_take_over_replaces_a_live_lease_and_its_holder_stops(tmp_path: Path) -> None:
    lost: list[str] = []
    first = _lease(tmp_path, renew_s=0.2, on_lost=lost.append).acquire()
    with first:
        second = _lease(tmp_path).acquire(take_over=True)
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert lost and "was taken by another driver" in lost[0], lost
    assert _state(tmp_path)["token"] == second.token, "the old holder's exit released nothing"


def test_a_dead_holders_lease_is_taken_at_once_and_a_finished_one_released(
    tmp_path: Path,
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store = open_storage(str(tmp_path))
    holder = {"token": "x", "state": "held", "host": socket.gethostname(), "pid": gone.pid}
    store.put(LEASE, json.dumps({**holder, "ttl_s": 3600}).encode())
    with _lease(tmp_path).acquire() as lease:  # its process is gone: no need to wait an hour
        assert _state(tmp_path)["token"] == lease.token
    assert _state(tmp_path)["state"] == "released"
    _lease(tmp_path).acquire()  # a released lease is free


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.services)])
def test_of_many_drivers_at_once_exactly_one_gets_the_lease(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    folder = str(tmp_path) if where == "local" else request.getfixturevalue("s3_prefix")
    won: list[Lease] = []
    refused: list[str] = []
    start = threading.Barrier(8)

    def race() -> None:
        lease = _lease(folder)
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as err:
            refused.append(str(err))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and len(refused) == 7, (len(won), refused)
    assert _state(folder)["token"] == won[0].token


def test_s3_versions_and_ages_come_from_the_store(stack: Stack, s3_prefix: str) -> None:
    store = open_storage(s3_prefix)
    first = store.put_if("obj", b"a", None)
    assert first is not None and store.put_if("obj", b"b", None) is None  # If-None-Match
    assert store.put_if("obj", b"c", '"not-its-etag"') is None  # If-Match
    got = store.read_versioned("obj")
    assert got is not None and (got.data, got.version) == (b"a", first)
    assert 0 <= got.age_s < 30
    assert store.put_if("obj", b"d", first) is not None and store.get("obj") == b"d"


# ------------------------------------------------------------ two submissions of one job


STEPS = 20


def _job(storage: Path, name: str) -> list[str]:
    return local_job(
        storage,
        name,
        "scaling.num_workers=1",
        "scaling.global_batch=16",
        f"schedule.max_iters={STEPS}",
        "schedule.milestones=[]",
        "checkpoint.every_iters=10",
        "tracking.log_every=1",
    )


def _final_weights(storage: Path, name: str) -> dict[str, torch.Tensor]:
    final = storage / name / "checkpoints" / f"step-{STEPS:08d}"
    assert (final / "COMMITTED").exists(), sorted((storage / name / "checkpoints").iterdir())
    state = torch.load(io.BytesIO((final / "trainer.pt").read_bytes()), weights_only=True)
    return state["strategy"]["model"]


def test_two_submissions_at_once_the_second_refused_the_first_as_a_lone_run(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_script(*_job(tmp_path / "lone", "twin")[1:], env={"OMP_NUM_THREADS": "1"})
    lone = _final_weights(tmp_path / "lone", "twin")

    storage = tmp_path / "shared"
    first = subprocess.Popen(
        _job(storage, "twin"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert first.stdout is not None
    hung = threading.Timer(600, first.kill)  # a job that never ends fails the test, not CI
    hung.start()
    lines = []
    for line in first.stdout:  # training: the lease is held
        lines.append(line)
        if "orchestrator.train: step 5 " in line:
            break
    # frozen, so that it is surely still running while the second starts (its lease is fresh)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(
            _job(storage, "twin"),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        first.send_signal(signal.SIGCONT)
    out = "".join(lines) + first.communicate(timeout=600)[0]
    hung.cancel()
    assert first.returncode == 0, out[-4000:]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    err = second.stderr
    assert "job twin is already running" in err and f"pid {first.pid} on host" in err, err
    assert "--take-over" in err, err
    assert "orchestrator.train: step" not in second.stdout + err, "the refused job trained"
    assert _state(storage / "twin" / "checkpoints")["state"] == "released"
    final = _final_weights(storage, "twin")
    assert final.keys() == lone.keys()
    for key, value in lone.items():
        assert torch.equal(final[key], value), key


def test_on_ray_a_second_submission_is_refused_and_ray_job_stop_ends_the_first(
    stack: Stack, s3_prefix: str
) -> None:
    """Through the test stack's Ray: the second `ray job submit` of a running job fails (exit 2)
    naming the first's Ray job and cluster, before any worker of its own. `ray job stop` on the
    first (a SIGTERM to its driver) ends its one MLflow run KILLED and releases its lease. A
    lease left held by a job Ray says has ended is taken at once. (One running job serves the
    refusal and the stop: a Ray job's start costs some 25 CPU-seconds on the 2-core box.)"""
    import uuid

    from mlflow import MlflowClient

    from bench import chaos
    from orchestrator.checkpoint_refs import job_checkpoints_url

    name, experiment = "twin-ray", f"lease-stop-{uuid.uuid4().hex[:6]}"
    args = [
        f"name={name}",
        f"checkpoint.storage={s3_prefix}",
        *TINY,
        "schedule.max_iters=100000",  # runs until stopped
        "checkpoint.every_iters=0",
        "scaling.num_workers=1",  # the lease is the driver's: a second rank adds nothing
    ]
    tracked = ["tracking.enabled=true", f"tracking.experiment={experiment}"]
    first = chaos.submit([*args, *tracked, "tracking.log_every=1"])
    folder = job_checkpoints_url(s3_prefix, name)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if open_storage(folder).exists(LEASE):
            break
        assert chaos.client().get_job_status(first) in ("PENDING", "RUNNING"), chaos.logs(first)
        time.sleep(0.25)
    holder = _state(folder)
    client = MlflowClient()

    def job_runs() -> list:
        exp = client.get_experiment_by_name(experiment)  # the job creates it
        return client.search_runs([exp.experiment_id]) if exp else []

    try:
        second = chaos.submit([*args, *tracked])
        assert chaos.wait(second, 300, 0.25) == "FAILED", chaos.logs(second)[-3000:]
        text = chaos.logs(second)
        assert f"job {name} is already running" in text, text[-3000:]
        assert f"Ray job {holder['ray_job']} (cluster {holder['ray_cluster']})" in text
        assert "worker group" not in text.lower() and "step 1 " not in text
        # the first is training (a step in its run) when it is stopped
        while not (runs := job_runs()) or not (
            client.get_metric_history(runs[0].info.run_id, "train/loss")
        ):
            assert time.monotonic() < deadline, "the first job logged no step"
            assert chaos.client().get_job_status(first) == "RUNNING", chaos.logs(first)[-3000:]
            time.sleep(0.25)
    finally:
        chaos.client().stop_job(first)
    assert chaos.wait(first, 120, 0.25) == "STOPPED"
    assert len(runs) == 1, "one MLflow run per job: the refused one opened none"
    deadline = time.monotonic() + 60
    while (status := client.get_run(runs[0].info.run_id).info.status) == "RUNNING":
        assert time.monotonic() < deadline, "the run stayed RUNNING after the job was stopped"
        time.sleep(0.25)
    assert status == "KILLED"
    while _state(folder)["state"] != "released" and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _state(folder)["state"] == "released"
    # a holder that did not release (a SIGKILLed driver) and whose process looks alive: Ray's
    # word that its job ended on this cluster frees the lease at once, not its hour-long expiry
    stale = {**holder, "state": "held", "pid": os.getpid(), "ttl_s": 3600}
    open_storage(folder).put(LEASE, json.dumps(stale).encode())
    third = chaos.submit([*args, "schedule.max_iters=2"])
    assert chaos.wait(third, 300, 0.25) == "SUCCEEDED", chaos.logs(third)[-3000:]
    took = f"its Ray job {holder['ray_job']} ended STOPPED"
    assert took in chaos.logs(third), chaos.logs(third)[-3000:]
