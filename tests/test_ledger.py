"""The per-sample ledger (orchestrator/data/ledger.py): ids, the newest-attempt rule, duplicate
and drop counting, and the command against a checkpoint folder in the test stack's SeaweedFS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.checkpoint import CheckpointStore
from orchestrator.checkpoint_refs import job_checkpoints_url
from orchestrator.data.ledger import (
    Ledger,
    LedgerError,
    attempt_cuts,
    list_files,
    read_ledger,
    sample_ids,
    shard_offsets,
)
from orchestrator.storage import open_storage
from tests.conftest import ROOT

N, G = 10, 4  # split size and global batch: an epoch is steps of 4, 4 and 2 samples


def epoch_steps(epoch: int, n: int = N, g: int = G) -> list[np.ndarray]:
    """One exact epoch: a permutation of range(n) cut into steps of at most g samples."""
    order = np.random.default_rng(epoch).permutation(n)
    return [order[i : i + g] for i in range(0, n, g)]


def train(
    root: str,
    attempt: int,
    steps: range,
    world: int = 2,
    flush_every: int = 3,
    plant: dict[int, tuple[int, int]] | None = None,
    **meta: object,
) -> None:
    """What the trainer does: every rank records its share of each step, all flush together
    every `flush_every` steps and at the end. `plant`: step -> (position, id) written over."""
    per_epoch = len(epoch_steps(0))
    meta = {"world_size": world, "steps_per_epoch": per_epoch, **meta}
    ledgers = [Ledger(root, r, attempt, **meta) for r in range(world)]  # type: ignore[arg-type]
    for step in steps:
        epoch, j = divmod(step - 1, per_epoch)
        ids = epoch_steps(epoch)[j].copy()
        if plant and step in plant:
            pos, value = plant[step]
            ids[pos] = value
        for r, ledger in enumerate(ledgers):
            ledger.record(epoch, step, np.array_split(ids, world)[r])
        if step % flush_every == 0:
            for ledger in ledgers:
                ledger.flush()
    for ledger in ledgers:
        ledger.flush()


def test_sample_ids_are_split_positions() -> None:
    offsets = shard_offsets([3, 0, 5, 2])
    assert offsets.tolist() == [0, 3, 3, 8]
    ids = sample_ids(offsets, np.array([0, 2, 2, 3]), np.array([2, 0, 4, 1]))
    assert ids.dtype == np.int64 and ids.tolist() == [2, 3, 7, 9]


def test_a_clean_run_sees_every_sample_once(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    train(root, attempt=100, steps=range(1, 7), split_size=N)  # 2 epochs of 3 steps
    names = [f.name for f in list_files(open_storage(root))]
    assert len(names) == 4 and "steps-0000000001-0000000003.attempt-100.rank-00001.npz" in names
    report = read_ledger(root)
    assert [(e.epoch, e.steps, e.samples, e.duplicates, e.drops) for e in report.epochs] == [
        (0, [1, 2, 3], 10, 0, 0),
        (1, [4, 5, 6], 10, 0, 0),
    ]
    assert report.ok and report.gaps == []
    assert report.summary() == (
        "ledger: every sample once per epoch in 2/2 epochs (0 duplicates, 0 drops)"
    )


def test_a_duplicate_and_the_drop_it_causes_are_counted(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    seen = int(epoch_steps(1)[0][0])
    train(root, 100, range(1, 7), plant={5: (0, seen)}, split_size=N)  # step 5 repeats it
    report = read_ledger(root)
    assert [(e.duplicates, e.drops) for e in report.epochs] == [(0, 0), (1, 1)]
    assert not report.ok
    assert report.summary() == (
        "ledger: every sample once per epoch in 1/2 epochs (1 duplicates, 1 drops)"
    )


def test_newest_attempt_wins_and_its_resume_point_cuts_older_steps(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    # attempt 100 trains steps 1-9 with a bad step 5, but its commit at 3 is the last that
    # counted: attempt 200 resumed there and trained 4-6 again (correctly), then died
    train(root, 100, range(1, 10), plant={5: (0, int(epoch_steps(1)[0][0]))}, split_size=N)
    train(root, 200, range(4, 7), split_size=N)
    assert attempt_cuts(list_files(open_storage(root))) == {100: 4, 200: None}
    report = read_ledger(root)
    assert report.attempts == {100: (1, 3), 200: (4, 6)}
    assert [(e.epoch, e.duplicates, e.drops) for e in report.epochs] == [(0, 0, 0), (1, 0, 0)]
    assert report.ok
    # 7-9 were trained on weights thrown away: not counted, even though nothing rewrote them
    assert all(e.epoch < 2 for e in report.epochs)
    # a third attempt resuming at 6 keeps 200's 4-6 and counts its own from 7 on
    train(root, 300, range(7, 10), split_size=N)
    report = read_ledger(root)
    assert report.attempts == {100: (1, 3), 200: (4, 6), 300: (7, 9)}
    assert report.ok and len(report.complete_epochs) == 3


def test_a_stale_attempt_alone_past_a_resume_shows_as_a_gap(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    train(root, 100, range(1, 10), split_size=N, steps_per_epoch=0)
    train(root, 200, range(4, 6), split_size=N, steps_per_epoch=0)  # resumed at 3, died at 5
    store = CheckpointStore(root)
    store.commit(8, {})  # a newer commit than the ledger reaches (a file deleted, say)
    report = read_ledger(root)
    assert report.gaps == [(6, 8)]
    assert [(e.epoch, e.complete, e.drops) for e in report.epochs] == [
        (0, True, 0),
        (1, False, None),
    ]
    assert "in progress" in report.epochs[1].no_drops
    assert any(line == "gap: steps 6-8 have no ledger entry" for line in report.lines())


def test_split_size_and_mode(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    train(root, 100, range(1, 4))  # no split size in the files, no checkpoint
    report = read_ledger(root)
    assert report.epochs[0].drops is None and "split size unknown" in report.epochs[0].no_drops
    assert report.ok  # nothing to count drops against, and no duplicate
    report = read_ledger(root, split_size=12)  # two ids were never seen, or so it is told
    assert report.epochs[0].drops == 2 and not report.ok
    report = read_ledger(root, split_size=8)
    assert report.epochs[0].out_of_range == 2 and not report.ok


def test_resampled_mode_repeats_do_not_fail(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    train(root, 100, range(1, 4), plant={2: (0, 0)}, split_size=N, epoch_mode="resampled")
    report = read_ledger(root)
    assert report.epochs[0].duplicates == 1 and report.epochs[0].drops is None
    assert "not applicable" in report.epochs[0].no_drops
    assert report.ok and "duplicates and drops not applicable" in report.summary()


def test_record_checks_the_step_order(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path), 0, 1)
    ledger.record(0, 1, [1, 2])
    ledger.record(0, 1, [3])  # a second micro-batch of the same step adds up
    with pytest.raises(ValueError, match="step 0 recorded after step 1"):
        ledger.record(0, 0, [4])
    ledger.flush()
    ledger.flush()  # nothing recorded since: no second file
    assert [f.name for f in list_files(open_storage(str(tmp_path)))] == [
        "steps-0000000001-0000000001.attempt-1.rank-00000.npz"
    ]
    assert read_ledger(str(tmp_path)).epochs[0].samples == 3
    with pytest.raises(LedgerError, match="data.ledger=true"):
        read_ledger(str(tmp_path / "none"))


def ledger_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.data.ledger", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_on_seaweedfs_passes_then_catches_a_planted_duplicate(
    s3_prefix: str,
) -> None:
    root = job_checkpoints_url(s3_prefix, "ledger-job")
    train(root, 100, range(1, 10), split_size=N)  # 3 epochs, then a restart at step 6
    train(root, 200, range(7, 10), split_size=N)
    CheckpointStore(root).commit(9, {}, {"epoch": 2, "step_in_epoch": 3, "steps_per_epoch": 3})
    proc = ledger_command("ledger-job", "--storage", s3_prefix)
    out = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out[-1] == "ledger: every sample once per epoch in 3/3 epochs (0 duplicates, 0 drops)"
    assert any(line.startswith("epoch 2: steps 7-9 (3 steps), 10 samples") for line in out)

    # the newest attempt's rank 1 writes step 8 with a sample step 7 already had
    dup = Ledger(root, 1, 200, split_size=N, world_size=2)
    dup.record(2, 8, [int(epoch_steps(2)[0][0])])
    dup.flush()
    proc = ledger_command(root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "ledger: every sample once per epoch in 2/3 epochs (1 duplicates, 0 drops)"
    )


def test_split_size_from_the_newest_checkpoints_spec(tmp_path: Path) -> None:
    import json

    data = tmp_path / "data"
    data.mkdir()
    shards = [{"name": f"train-{i:06d}.tar", "samples": n} for i, n in enumerate([4, 6])]
    manifest = {"format": "webdataset", "version": 1, "num_classes": 2,
                "splits": {"train": {"shards": shards}}}  # fmt: skip
    (data / "manifest.json").write_text(json.dumps(manifest))
    root = str(tmp_path / "ck")
    train(root, 100, range(1, 4), plant={3: (0, 0)})  # no split size in the files
    store = CheckpointStore(root)
    spec = {"data": {"url": str(data), "train_split": "train", "epoch_mode": "exact"}}
    store.write(3, "trainer.pt", {"spec": spec})
    store.commit(3, {}, {"epoch": 0, "step_in_epoch": 3, "steps_per_epoch": 3})
    report = read_ledger(root)
    assert report.split_size == 10 and report.mode == "exact"
    assert any("split size 10 and mode exact from the spec" in n for n in report.notes)
    assert (report.epochs[0].duplicates, report.epochs[0].drops) == (1, 1) and not report.ok
