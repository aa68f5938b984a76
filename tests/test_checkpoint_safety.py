"""Stored state loaded as data (issue 29, items 2, 6 and 10): a committed step whose files
would run code when unpickled is refused on resume, by publish and by the readers of
orchestrator.checkpoint_refs, naming the file, and the code never runs; DeepSpeed's shards
(unpickled in full by DeepSpeed) are checked against the sha256 recorded at commit; readers
hold a lease that retention honours; `@best` is a step that was validated.

On local folders (fast); the lease test also on the real S3 of the test stack."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import (
    LEASE_STALE_S,
    Checkpointer,
    CheckpointStore,
    UnsafeCheckpointError,
    best_checkpoint,
    load_state,
    rng_state,
    set_rng_state,
    to_bytes,
)
from orchestrator.checkpoint_refs import CheckpointRefError, holding, read_trainer_state
from orchestrator.spec import CheckpointConfig, JobSpec, ModelConfig
from orchestrator.train import marker_metrics


class _RunsCode:
    """Unpickled in full, writes `path`: what a replaced checkpoint file could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _evil(path: Path) -> bytes:
    return to_bytes({"step": 2, "strategy": {"model": {}}, "spec": {}, "x": _RunsCode(path)})


def test_the_payload_would_run_code_if_unpickled(tmp_path: Path) -> None:
    """The refusals below are worth something: loaded in full, the payload runs."""
    ran = tmp_path / "ran"
    torch.load(io.BytesIO(_evil(ran)), weights_only=False)
    assert ran.read_text() == "ran"


def _tamper(store: CheckpointStore, step: int, name: str, data: bytes) -> None:
    """Replace a committed file and update its marker's size, as the issue's attacker did."""
    store.put(step, name, data)
    marker_path = f"step-{step:08d}/COMMITTED"
    marker = json.loads(store.storage.get(marker_path))
    marker["files"][name] = len(data)
    store.storage.put(marker_path, json.dumps(marker).encode())


def _checkpointer(tmp_path: Path, root: Path, **cfg: Any) -> Checkpointer:
    return Checkpointer(CheckpointConfig(storage=str(tmp_path), **cfg), str(root), rank=0)


def _save(ck: Checkpointer, step: int, shards: dict[str, bytes] | None = None) -> None:
    def write_shards(folder: Path) -> None:
        for rel, data in (shards or {}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)

    states = {"trainer.pt": {"step": step}, "rank-00000.pt": {"rng": rng_state()}}
    ck.save(step, states, write_shards, {"val/top1_err": 0.5})
    ck.commit()


@pytest.mark.parametrize("name", ["trainer.pt", "rank-00000.pt"])
def test_a_file_that_would_run_code_is_refused_on_resume(tmp_path: Path, name: str) -> None:
    root, ran = tmp_path / "ckpts", tmp_path / "ran"
    _save(_checkpointer(tmp_path, root), 2)
    _tamper(CheckpointStore(str(root)), 2, name, _evil(ran))
    loaded: list[Any] = []
    with pytest.raises(UnsafeCheckpointError, match=rf"step-00000002/{name}: refused to load"):
        _checkpointer(tmp_path, root).restore(loaded.append, loaded.append)
    assert not ran.exists() and not loaded, "nothing of the step was loaded, no code ran"


def test_deepspeed_shards_are_checked_against_the_commit_digests(tmp_path: Path) -> None:
    """DeepSpeed unpickles its shards in full: a shard that changed since its commit, or one
    the marker has no digest for, is refused before the strategy sees the folder."""
    root, ran = tmp_path / "ckpts", tmp_path / "ran"
    shard = "deepspeed/state/mp_rank_00_model_states.pt"
    _save(_checkpointer(tmp_path, root), 2, {shard: to_bytes({"module": torch.ones(3)})})
    store = CheckpointStore(str(root))
    marker = json.loads(store.storage.get("step-00000002/COMMITTED"))
    stored = store.read_bytes(2, f"shards/{shard}")
    assert marker["sha256"][f"shards/{shard}"] == hashlib.sha256(stored).hexdigest()
    assert set(marker["sha256"]) == {f"shards/{shard}"}  # what is unpickled in full
    got: list[Path] = []

    def load_shards(folder: Path) -> None:
        got.append(folder)
        assert (folder / shard).read_bytes() == stored

    _checkpointer(tmp_path, root).restore(lambda state: None, load_shards)
    assert got, "untouched shards load"
    _tamper(store, 2, f"shards/{shard}", _evil(ran))  # sizes updated, digest not
    with pytest.raises(UnsafeCheckpointError, match=rf"shards/{shard}: refused.*recorded at"):
        _checkpointer(tmp_path, root).restore(lambda state: None, got.append)
    marker = json.loads(store.storage.get("step-00000002/COMMITTED"))
    del marker["sha256"][f"shards/{shard}"]  # as a marker of an older release
    store.storage.put("step-00000002/COMMITTED", json.dumps(marker).encode())
    with pytest.raises(UnsafeCheckpointError, match="records no sha256"):
        _checkpointer(tmp_path, root).restore(lambda state: None, got.append)
    assert len(got) == 1 and not ran.exists()


def test_readers_of_checkpoint_refs_refuse_code(tmp_path: Path) -> None:
    """Ensembles, Fig. 7 and the ledger read trainer.pt through read_trainer_state."""
    root, ran = tmp_path / "ckpts", tmp_path / "ran"
    store = CheckpointStore(str(root))
    store.put(2, "trainer.pt", _evil(ran))
    store.commit(2, {})
    with pytest.raises(CheckpointRefError, match=r"member a: cannot read .*trainer.pt.*refused"):
        read_trainer_state(f"{root}/step-00000002", "member a")
    assert not ran.exists()
    assert store.find(2) is not None and not store.find(2).readers, "its lease released"


def test_publish_refuses_code_and_leaves_no_pin(tmp_path: Path) -> None:
    from orchestrator.publish.classifier import load_net
    from orchestrator.publish.register import PublishError, read_checkpoint

    root, ran = tmp_path / "ckpts", tmp_path / "ran"
    store = CheckpointStore(str(root))
    store.put(2, "trainer.pt", _evil(ran))
    store.commit(2, {})
    url = f"{root}/step-00000002"
    with pytest.raises(PublishError, match=r"step-00000002/trainer.pt: refused to load"):
        read_checkpoint(url, pin={"model": "m"})
    found = store.find(2)
    assert found is not None and not found.pinned and not found.readers
    digest = hashlib.sha256(store.read_bytes(2, "trainer.pt")).hexdigest()
    ref = {"model": {"name": "cifar_resnet20", "num_classes": 3}, "checkpoint_url": url}
    with pytest.raises(UnsafeCheckpointError, match="trainer.pt: refused to load"):
        load_net({**ref, "trainer_sha256": digest})  # the registered digest matches: still no
    assert not ran.exists()


def _trained_checkpoint(root: Path, step: int = 2) -> CheckpointStore:
    from orchestrator.models import create_model

    spec = JobSpec(name="t", model=ModelConfig(name="cifar_resnet20")).to_dict()
    weights = create_model("cifar_resnet20", 3).state_dict()
    store = CheckpointStore(str(root))
    store.write(step, "trainer.pt", {"spec": spec, "strategy": {"model": weights}})
    store.commit(step, {"val/top1_err": 0.5})
    return store


def test_publish_pins_before_it_reads_and_holds_a_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.publish import register

    store = _trained_checkpoint(tmp_path / "ckpts")
    seen: list[tuple[bool, int]] = []
    real = register.trainer_weights

    def observed(raw: bytes, what: str) -> Any:
        found = store.find(2)
        assert found is not None
        seen.append((found.pinned, len(found.readers)))
        return real(raw, what)

    monkeypatch.setattr(register, "trainer_weights", observed)
    ck = register.read_checkpoint(f"{tmp_path}/ckpts/step-00000002", pin={"model": "m"})
    register.read_checkpoint(f"{tmp_path}/ckpts/step-00000002")  # --copy-weights: no pin
    assert seen == [(True, 1), (True, 1)]
    after = store.find(2)
    assert after is not None and after.pinned and not after.readers
    assert json.loads(store.storage.get("step-00000002/PINNED"))["sha256"] == ck.sha256


def test_the_served_model_loads_as_data(tmp_path: Path) -> None:
    """data/model.pth: a call to build_net (or load_net) with tensors loads with weights_only;
    a pickled module (an older --copy-weights model) or code is refused."""
    import mlflow.pytorch.pickle_module as mlflow_pickle

    from orchestrator.models import create_model
    from orchestrator.publish.classifier import NetCopy, load_torch_net

    net = create_model("cifar_resnet20", 3).eval()
    model = {"name": "cifar_resnet20", "num_classes": 3}
    for i, obj in enumerate([NetCopy(model, net.state_dict()), net, _RunsCode(tmp_path / "ran")]):
        (tmp_path / str(i)).mkdir()
        torch.save(obj, tmp_path / str(i) / "model.pth", pickle_module=mlflow_pickle)
    loaded = load_torch_net(tmp_path / "0")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), net(x))
    for i in (1, 2):
        with pytest.raises(UnsafeCheckpointError, match=rf"{i}/model.pth: refused to load"):
            load_torch_net(tmp_path / str(i))
    assert not (tmp_path / "ran").exists()


def test_rng_state_is_plain_data_and_round_trips() -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian in python's state
    state = load_state(to_bytes(rng_state()), "rank-00000.pt")  # weights_only=True
    want = (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1)) == want


# ------------------------------------------------------------------------ leases (item 6)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "local":
        return CheckpointStore(str(tmp_path / "ckpts"))
    return CheckpointStore(f"{request.getfixturevalue('s3_prefix')}/ckpts")


def _commit(store: CheckpointStore, step: int, err: float) -> None:
    store.write(step, "trainer.pt", {"step": step})
    store.commit(step, {"val/top1_err": err})


def test_retention_keeps_a_step_a_reader_holds(store: CheckpointStore) -> None:
    _commit(store, 1, 0.9)
    _commit(store, 2, 0.8)
    with store.reading(1, "test reader"):
        _commit(store, 3, 0.7)
        store.retain(keep_last=1, best_metric="val/top1_err")
        assert [c.step for c in store.committed()] == [1, 3], "held: kept"
        assert store.read(1, "trainer.pt") == {"step": 1}
    store.retain(keep_last=1, best_metric="val/top1_err")
    assert [c.step for c in store.committed()] == [3], "released: gone"
    with pytest.raises(FileNotFoundError, match="not a committed checkpoint"):
        store.lease(1, "too late")


def test_a_reader_arriving_during_retention_keeps_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention lists, then deletes: a lease written in between is seen before the delete."""
    store = CheckpointStore(str(tmp_path / "ckpts"))
    for step, err in ((1, 0.9), (2, 0.8), (3, 0.7)):
        _commit(store, step, err)
    listed = store.committed()
    monkeypatch.setattr(store, "committed", lambda: listed)
    lease = store.lease(1, "late reader")
    store.retain(keep_last=1, best_metric="val/top1_err")
    monkeypatch.undo()
    assert [c.step for c in store.committed()] == [1, 3]
    store.release(1, lease)


def test_a_stale_lease_is_ignored_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path / "ckpts"))
    _commit(store, 1, 0.9)
    _commit(store, 2, 0.8)
    old = int(time.time() - LEASE_STALE_S - 60)
    store.put(1, f"READERS/{old}-0123456789ab.json", b"{}")
    with caplog.at_level(logging.WARNING):
        store.retain(keep_last=1, best_metric="val/top1_err")
    assert [c.step for c in store.committed()] == [2]
    assert "ignoring reader lease" in caplog.text


def test_resume_from_and_ensembles_hold_the_step_they_read(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _save(_checkpointer(tmp_path, source), 2)
    src = CheckpointStore(str(source))
    readers: list[int] = []

    def load(state: dict[str, Any]) -> None:
        readers.append(len(src.find(2).readers))  # type: ignore[union-attr]

    fork = _checkpointer(tmp_path, tmp_path / "fork", resume_from=f"{source}/step-00000002")
    restored = fork.restore(load, lambda folder: None)
    assert restored is not None and restored.step == 2 and restored.rank is not None
    assert readers == [1] and not src.find(2).readers  # type: ignore[union-attr]
    with holding(f"{source}/step-00000002", "ensemble member a"):
        assert len(src.find(2).readers) == 1  # type: ignore[union-attr]
    assert not src.find(2).readers  # type: ignore[union-attr]
    with (
        pytest.raises(CheckpointRefError, match="member b: cannot hold"),
        holding(f"{source}/step-00000009", "member b"),
    ):
        pass


# ------------------------------------------------------------------------ @best (item 10)


def test_best_is_a_validated_step() -> None:
    """Validated at step 10 (err 0.3), saved at 10, 15 and 20: only step 10's marker has the
    validation error, so it is the best; a tie between two validated steps goes to the older."""
    latest = {"val/top1_err": 0.3, "val/samples": 50.0, "train/loss": 1.0, "train/lr": 0.1}
    measured_at = dict.fromkeys(latest, 10)
    at_10 = marker_metrics(latest, measured_at, 10, {})
    at_15 = marker_metrics(latest, measured_at, 15, {"train/loss": 0.9})
    at_20 = marker_metrics(latest, measured_at, 20, {})
    assert at_10 == latest
    assert at_15 == {"train/loss": 0.9, "train/lr": 0.1} and at_20 == {"train/lr": 0.1}
    from orchestrator.checkpoint import Committed

    found = [Committed(s, f"u{s}", m) for s, m in ((10, at_10), (15, at_15), (20, at_20))]
    assert best_checkpoint(found, "val/top1_err").step == 10  # type: ignore[union-attr]
    found.append(Committed(30, "u30", {"val/top1_err": 0.3}))  # validated again, same error
    assert best_checkpoint(found, "val/top1_err").step == 10  # type: ignore[union-attr]


def test_a_reader_that_may_not_write_reads_unheld_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(str(tmp_path / "ckpts"))
    _commit(store, 1, 0.9)

    def refused(self: CheckpointStore, step: int, who: str) -> str:
        raise PermissionError("read-only credentials")

    monkeypatch.setattr(CheckpointStore, "lease", refused)
    with caplog.at_level(logging.WARNING):
        state = read_trainer_state(f"{tmp_path}/ckpts/step-00000001", "fig7 of run x")
    assert state == {"step": 1}
    assert "fig7 of run x: no reader's lease" in caplog.text and "read-only" in caplog.text


def test_a_deepspeed_resume_refuses_a_replaced_shard(
    tmp_path: Path,
) -> None:
    """The path end to end (--local, DeepSpeed ZeRO-1, 1 worker): the marker records the
    shards' sha256; a shard replaced since (its marker size updated) stops the resume, naming
    the file, and its code does not run. (Resumes from untouched DeepSpeed shards:
    tests/test_fault_tolerance.py's ZeRO tests.)"""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_train import TINY

    def job(max_iters: int, *more: str) -> subprocess.CompletedProcess[str]:
        args = ["jobs/smoke.py", "--local", "name=ds", f"checkpoint.storage={tmp_path}", *TINY]
        args += ["scaling.strategy=deepspeed", "scaling.zero_stage=1", "scaling.num_workers=1"]
        args += ["scaling.global_batch=8", "checkpoint.every_iters=2", *more]
        return subprocess.run(
            [sys.executable, *args, f"schedule.max_iters={max_iters}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    first = job(4)
    assert first.returncode == 0, first.stderr[-3000:]
    store, ran = CheckpointStore(str(tmp_path / "ds" / "checkpoints")), tmp_path / "ran"
    latest = store.latest()
    assert latest is not None and latest.step == 4
    [shard] = [f for f in latest.sha256 if f.endswith("model_states.pt")]
    _tamper(store, 4, shard, _evil(ran))
    refused = job(6, "--allow-change", "schedule.max_iters")  # a longer run: its recipe changed
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and f"{shard}: refused to load" in out, out[-3000:]
    assert not ran.exists()
