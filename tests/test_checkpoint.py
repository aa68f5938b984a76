"""Committed checkpoints, on a local folder and on the real S3: markers, truncation, retention."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bench.checkpoint_latest import count_requests
from orchestrator import s3
from orchestrator.checkpoint import (
    CheckpointStore,
    Committed,
    best_checkpoint,
    split_checkpoint_url,
)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "local":
        return CheckpointStore(str(tmp_path / "ckpts"))
    prefix = request.getfixturevalue("s3_prefix")
    return CheckpointStore(f"{prefix}/ckpts")


def _save(store: CheckpointStore, step: int, metric: float, commit: bool = True) -> None:
    store.write(step, "trainer.pt", {"step": step, "payload": list(range(1000))})
    store.write(step, "rank-00000.pt", {"rng": step})
    if commit:
        store.commit(step, {"val/top1_err": metric})


def _truncate(store: CheckpointStore, step: int, name: str) -> None:
    data = store.storage.get(f"step-{step:08d}/{name}")
    store.storage.put(f"step-{step:08d}/{name}", data[: len(data) // 2])


def test_only_complete_committed_checkpoints_count(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    assert store.latest() is None
    _save(store, 4, 0.5)
    _save(store, 8, 0.4, commit=False)  # a save interrupted before its marker
    _save(store, 12, 0.3)
    _truncate(store, 12, "trainer.pt")  # a marker, but a file cut short
    with caplog.at_level(logging.WARNING):
        latest = store.latest()
    assert latest is not None and latest.step == 4
    assert store.read(4, "trainer.pt")["step"] == 4
    assert "step-00000012" in caplog.text and "truncated" in caplog.text
    assert "step-00000008" in caplog.text and "no commit marker" in caplog.text
    assert [c.step for c in store.committed()] == [4]

    _save(store, 16, 0.2)  # the broken ones are now older than the newest commit: debris
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert store.latest().step == 16 and [c.step for c in store.committed()] == [4, 16]
    assert "skipping" not in caplog.text


def test_the_latest_checkpoint_costs_a_few_requests_however_many_are_kept(
    store: CheckpointStore,
) -> None:
    """Every rank reads it to resume, test and chaos harnesses poll it: the newest step folder
    first, not every folder (10 kept cost 21 S3 requests one after another before)."""
    for step in range(1, 11):
        _save(store, step, 0.5)
    calls = count_requests(store)
    assert store.latest().step == 10
    assert sorted(calls) == ["get", "list_dirs", "sizes"], calls
    calls.clear()
    assert [c.step for c in store.committed()] == list(range(1, 11))
    assert calls.count("list_dirs") == 1 and calls.count("sizes") == 1, calls  # one listing each


def test_retention_keeps_latest_and_best(store: CheckpointStore) -> None:
    for step, metric in [(1, 0.9), (2, 0.2), (3, 0.5), (4, 0.6), (5, 0.7)]:
        _save(store, step, metric)
    store.retain(keep_last=2, best_metric="val/top1_err")
    assert [c.step for c in store.committed()] == [2, 4, 5]


def test_best_checkpoint_lowest_metric_tie_to_older() -> None:
    found = [
        Committed(1, "u1", {"e": 0.3}),
        Committed(2, "u2", {}),
        Committed(3, "u3", {"e": 0.2}),
        Committed(4, "u4", {"e": 0.2}),
        Committed(5, "u5", {"e": 0.4}),
    ]
    best = best_checkpoint(found, "e")
    assert best is not None and best.step == 3  # the one validated; 4 may only repeat it
    assert best_checkpoint(found[:2], "e").step == 1
    assert best_checkpoint(found, "missing") is None and best_checkpoint([], "e") is None


def test_retention_keeps_the_older_of_tied_best(store: CheckpointStore) -> None:
    for step, metric in [(1, 0.2), (2, 0.2), (3, 0.5), (4, 0.6)]:
        _save(store, step, metric)
    store.retain(keep_last=1, best_metric="val/top1_err")
    assert [c.step for c in store.committed()] == [1, 4]


def test_fetch_dir_round_trip(store: CheckpointStore, tmp_path: Path) -> None:
    local = tmp_path / "shards"
    (local / "deepspeed" / "state").mkdir(parents=True)
    (local / "deepspeed" / "state" / "zero_rank1.pt").write_bytes(b"x" * 100)
    store.write_dir(3, local, "shards")
    store.commit(3, {})
    back = store.fetch_dir(3, "shards")
    assert (back / "deepspeed" / "state" / "zero_rank1.pt").read_bytes() == b"x" * 100


def test_resume_from_url_parsing() -> None:
    assert split_checkpoint_url("s3://b/runs/job/checkpoints/step-00000040") == (
        "s3://b/runs/job/checkpoints",
        40,
    )
    with pytest.raises(ValueError, match="step-NNNNNNNN"):
        split_checkpoint_url("s3://b/runs/job")


def test_s3_helpers_name_bad_urls() -> None:
    with pytest.raises(ValueError, match="not an s3:// URL"):
        s3.split_url("/local/path")
