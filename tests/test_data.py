"""The input pipeline (the orchestrator.data package) on tiny shards.

Datasets are written here with webdataset.TarWriter and a hand-made manifest, independently of
datasets/*.py. Every sample's class is its global id (num_classes = N), so the labels of a
batch say exactly which samples it holds. Images are small and transforms shrunk (32 px crops)
to keep the file fast on a 2-core machine; S3 tests use the real local object store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator import data as D
from orchestrator.data import (
    IMAGENET_MEAN,
    DataConfig,
    DataError,
    DeviceNormalize,
    TrainLoader,
    eval_loader,
    train_loader,
)
from orchestrator.data import transforms as T
from orchestrator.data.tar import tar_files

# ---------------------------------------------------------------------------- test datasets


def jpeg(seed: int, size: tuple[int, int] = (48, 40), quality: int = 90) -> bytes:
    """A small smooth-plus-noise RGB JPEG, different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 200, w)[None, :, None] + rng.integers(0, 55, (1, 1, 3))
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_dataset(
    root: Path,
    splits: dict[str, Sequence[int]],
    *,
    corrupt: Sequence[int] = (),
    truncate: dict[tuple[str, int], float] | None = None,
    pad_bytes: int = 0,
    size: tuple[int, int] | Callable[[int], tuple[int, int]] = (48, 40),
) -> Path:
    """Shards `{split}-NNNNNN.tar` with the given sample counts and a manifest.

    Class = global sample id within the split. `corrupt`: global ids whose JPEG is garbage.
    `truncate`: {(split, shard): fraction of bytes kept}. `pad_bytes`: an extra random member
    per sample (makes shards big without making decoding slow). `size`: (w, h), or a function
    of the global id giving each image its own.
    """
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "name": root.name,
        "format": "webdataset",
        "version": 1,
        "splits": {},
        "skipped": [],
    }
    total_classes = 0
    for split, counts in splits.items():
        shards, gid = [], 0
        for s, n in enumerate(counts):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(root / name), encoder=False) as tw:
                for _ in range(n):
                    sample = {"__key__": f"{split}_{gid:05d}", "cls": str(gid).encode()}
                    sample["jpg"] = (
                        b"this is not a jpeg"
                        if gid in corrupt
                        else jpeg(gid, size(gid) if callable(size) else size)
                    )
                    if pad_bytes:
                        sample["pad"] = np.random.default_rng(gid).bytes(pad_bytes)
                    tw.write(sample)
                    gid += 1
            full = (root / name).read_bytes()
            keep = (truncate or {}).get((split, s))
            if keep is not None:  # cut after the manifest's record: damage in storage
                (root / name).write_bytes(full[: int(len(full) * keep)])
            digest = hashlib.sha256(full).hexdigest()
            shards.append({"name": name, "samples": n, "bytes": len(full), "sha256": digest})
        manifest["splits"][split] = {"samples": gid, "shards": shards}
        total_classes = max(total_classes, gid)
    manifest["num_classes"] = total_classes
    manifest["classes"] = [str(i) for i in range(total_classes)]
    manifest["mean"], manifest["std"] = [120.0, 110.0, 100.0], [60.0, 55.0, 50.0]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def small_cfg(url: str | Path, **kw) -> DataConfig:
    base = {
        "url": str(url),
        "image_size": 32,
        "scale_range": (32, 48),
        "eval_resize": 36,
        "num_workers": 2,
        "shuffle_buffer": 8,
        "bad_check_after": 20,
        "timeout_s": 60,
    }
    return DataConfig(**{**base, **kw})


def epoch_batches(
    cfg: DataConfig, *, world: int, batch: int, epoch: int = 0, seed: int = 0, start: int = 0
):
    """[rank] -> list of (images, labels) for one epoch, ranks simulated in one process."""
    out = []
    for rank in range(world):
        loader = TrainLoader(cfg, rank=rank, world_size=world, batch_size=batch, seed=seed)
        loader.set_epoch(epoch, start_batch=start)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def all_labels(per_rank) -> list[int]:
    return sorted(int(v) for batches in per_rank for _, y in batches for v in y)


# ---------------------------------------------------------------------------- epoch planning


def plan_sequence(
    counts, *, world: int, workers: int, streams: int, global_batch: int, start: int = 0
) -> dict[int, list[tuple[int, int]]]:
    """step -> its samples as (shard, index), ranks and loader workers joined in order: what
    the planning maths alone says each step holds."""
    steps: dict[int, list[tuple[int, int]]] = {}
    for rank in range(world):
        for owned in D.worker_streams(streams, world, rank, workers):
            plan = D.plan_pieces(
                counts,
                mode="exact",
                seed=3,
                epoch=1,
                owned=owned,
                streams=streams,
                global_batch=global_batch,
                start_step=start,
                shuffle_buffer=4,
            )
            flat = [
                [(s.shard, i) for s in p.segments for i in range(s.start, s.stop)]
                for p in plan.streams
            ]
            for p, stream in zip(plan.streams, flat):
                assert sorted(p.order.tolist()) == list(range(len(stream)))
            picks = iter(zip(plan.pick_stream.tolist(), plan.pick_pos.tolist()))
            for step, size in enumerate(plan.sizes, start):
                steps.setdefault(step, []).extend(flat[j][pos] for j, pos in islice(picks, size))
    return steps


@pytest.mark.parametrize(
    "counts,world,global_batch,workers,streams",
    [
        ([7, 5, 9, 3, 11], 2, 8, 2, 4),
        ([13, 6], 2, 6, 3, 6),
        ([40], 3, 15, 4, 12),
        ([1, 2, 3, 50, 1], 4, 8, 3, 12),
        ([97], 2, 64, 1, 2),
        ([10, 7, 13, 9, 11], 3, 12, 2, 4),  # W does not divide C: shares differ by more
    ],
)
def test_plan_covers_every_sample_once_with_equal_step_counts(
    counts, world, global_batch, workers, streams
):
    """Pure planning maths, many shapes: fewer shards than streams, N not divisible by G."""
    total = sum(counts)
    sizes = D.step_sizes(total, global_batch)
    steps = plan_sequence(
        counts, world=world, workers=workers, streams=streams, global_batch=global_batch
    )
    assert [len(steps[s]) for s in range(len(sizes))] == sizes
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    seen = sorted(x for step in steps.values() for x in step)
    assert seen == [(s, i) for s, n in enumerate(counts) for i in range(n)]
    if streams % world == 0:
        shares = D.rank_shares(global_batch, streams, world)
        assert max(shares) - min(shares) <= 1


def test_the_sequence_is_the_same_at_every_world_size_and_worker_count():
    """The plan alone: (step, samples) does not move with W or K, and a mid-epoch start at
    another W continues it."""
    counts, g, c = [10, 7, 13, 9, 11], 12, 6
    reference = plan_sequence(counts, world=1, workers=1, streams=c, global_batch=g)
    for world in (1, 2, 3, 6):
        for workers in (0, 1, 2, 4):
            got = plan_sequence(counts, world=world, workers=workers, streams=c, global_batch=g)
            assert got == reference, (world, workers)
    tail = plan_sequence(counts, world=3, workers=2, streams=c, global_batch=g, start=2)
    assert tail == {s: reference[s] for s in range(2, len(reference))}


def loader_sequence(
    cfg: DataConfig, *, world: int, global_batch: int, start: int = 0, epoch: int = 0
) -> dict[int, tuple[list[int], torch.Tensor]]:
    """step -> (sample ids, images) of the whole global batch, ranks joined in rank order,
    through real TrainLoaders (ranks simulated in one process)."""
    steps: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for rank in range(world):
        loader = TrainLoader(cfg, rank=rank, world_size=world, global_batch=global_batch, seed=5)
        loader.set_epoch(epoch, start_batch=start)
        for step, (images, labels) in enumerate(loader, start):
            ids = loader.ids.pop((epoch, step)).tolist()
            assert labels.tolist() == ids  # the dataset's label is its sample's id
            got = steps.setdefault(step, ([], []))
            got[0].extend(ids)
            got[1].append(images.clone())
    return {s: (ids, torch.cat(images)) for s, (ids, images) in steps.items()}


def test_an_epoch_is_the_same_at_world_sizes_1_2_3_and_loader_workers_1_2(tmp_path):
    """Issue 28's test: one epoch's (step, sample ids), and the pixels too, are identical for
    world sizes 1, 2 and 3 and loader workers 1 and 2; a resume at a mid-epoch step under
    world size 3 continues world size 2's sequence."""
    ds = write_dataset(tmp_path / "ds", {"train": [10, 7, 13, 9, 11]})
    base = small_cfg(ds, streams=6, ledger=True)
    reference = loader_sequence(dataclasses.replace(base, num_workers=1), world=1, global_batch=12)
    assert len(reference) == 5 and sorted(i for ids, _ in reference.values() for i in ids) == list(
        range(50)
    )
    for world in (1, 2, 3):
        for workers in (1, 2):
            cfg = dataclasses.replace(base, num_workers=workers)
            got = loader_sequence(cfg, world=world, global_batch=12)
            assert [got[s][0] for s in got] == [reference[s][0] for s in reference]
            for s in reference:
                assert torch.equal(got[s][1], reference[s][1]), (world, workers, s)
    # world size 2 trained steps 0..1; the job resumes at step 2 on 3 workers
    two = loader_sequence(dataclasses.replace(base, num_workers=2), world=2, global_batch=12)
    tail = loader_sequence(base, world=3, global_batch=12, start=2)
    assert [two[s][0] for s in range(2)] + [tail[s][0] for s in tail] == [
        reference[s][0] for s in reference
    ]


def test_batch_sizes_and_too_small_split():
    assert D.batch_sizes(10, 3, 4) == [4, 3, 3]
    assert D.batch_sizes(12, 3, 4) == [4, 4, 4]
    assert D.batch_sizes(5, 3, 4) == [2, 2, 1]
    with pytest.raises(DataError, match="too small"):
        D.batch_sizes(2, 3, 4)


def test_shuffle_order_is_a_bounded_permutation():
    order = D.shuffle_order(200, 10, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(200))
    assert not np.array_equal(order, np.arange(200))
    # output t is among the first t + 11 arrivals: a reader holds at most 10 samples unsent
    assert all(order[t] <= t + 10 for t in range(200))


# ---------------------------------------------------------------------------- train loader


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    return write_dataset(
        tmp_path_factory.mktemp("ds"), {"train": [7, 5, 9, 3, 11], "val": [9, 8, 6]}
    )


def test_exact_epoch_every_sample_once_2_ranks_2_workers(ds):
    cfg = small_cfg(ds)
    per_rank = epoch_batches(cfg, world=2, batch=4)
    assert [len(b) for b in per_rank] == [5, 5]  # M = ceil(35 / 8)
    assert all_labels(per_rank) == list(range(35))
    for batches in per_rank:
        for x, y in batches:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and x.is_contiguous()
            assert y.dtype == torch.int64 and len(y) == len(x)


def test_equal_batch_counts_fewer_shards_than_ranks_x_workers(tmp_path):
    root = write_dataset(tmp_path / "two", {"train": [13, 6]})  # 2 shards, 2 ranks x 2 workers
    per_rank = epoch_batches(small_cfg(root, num_workers=2), world=2, batch=3)
    assert [len(b) for b in per_rank] == [4, 4]  # ceil(19 / 6) on both ranks
    assert all_labels(per_rank) == list(range(19))
    sizes = [len(y) for batches in per_rank for _, y in batches]
    assert max(sizes) - min(sizes) <= 1


def test_determinism_and_new_order_each_epoch(ds):
    cfg = small_cfg(ds)
    a = epoch_batches(cfg, world=1, batch=5, epoch=0)[0]
    b = epoch_batches(cfg, world=1, batch=5, epoch=0)[0]
    c = epoch_batches(cfg, world=1, batch=5, epoch=1)[0]
    assert all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )
    order_a = [int(v) for _, y in a for v in y]
    order_c = [int(v) for _, y in c for v in y]
    assert sorted(order_a) == sorted(order_c) and order_a != order_c


def test_kept_batches_keep_their_pixels_while_workers_reuse_buffers(ds, monkeypatch):
    """Workers write batches into a ring of reused shared buffers (data/batch_ring.py): batches
    the loop drops come back to be reused; one it keeps, whole or as a view, is never written
    over (once every slot is held, the rest travel in fresh shared memory)."""
    cfg = small_cfg(ds, num_workers=2, prefetch_factor=1)  # rings of 3 slots, 18 batches
    with monkeypatch.context() as m:
        # torch's way: a fresh segment per batch
        m.setattr(train_loader, "BatchRing", lambda *args: None)
        reference = epoch_batches(cfg, world=1, batch=2)[0]
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=2, seed=0)
    dropped = []
    for x, y in loader:
        dropped.append((x.clone(), y.clone(), x.is_shared()))  # is_shared: a fresh segment
    assert not any(fresh for _, _, fresh in dropped)  # every batch came through a ring slot
    for epoch_pass in ("whole", "view"):
        loader.set_epoch(0)
        kept = [(x, y) if epoch_pass == "whole" else (x[1:], y[1:]) for x, y in loader]
        assert len(kept) == len(reference) == 18
        for (x, y), (x_ref, y_ref) in zip(kept, reference, strict=True):
            sl = slice(None) if epoch_pass == "whole" else slice(1, None)
            assert torch.equal(x, x_ref[sl]) and torch.equal(y, y_ref[sl])
    for (x, y, _), (x_ref, y_ref) in zip(dropped, reference, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_a_ring_slot_frees_only_when_every_view_of_it_is_gone(monkeypatch):
    from orchestrator.data import batch_ring
    from orchestrator.data.batch_ring import BatchRing

    naps, sleep = [], time.sleep  # the writer's waits, counted (they still sleep)
    monkeypatch.setattr(batch_ring.time, "sleep", lambda s: naps.append(s) or sleep(s))
    shape = (4, 3, 8, 8)
    ring = BatchRing(workers=1, slots=2, pixels_shape=shape)
    try:
        writer = ring.writer(0, wait_s=0.3)
        taken = [writer.take(shape) for _ in range(2)]
        assert [ref.slot for _, _, ref in taken] == [0, 1]
        assert all(ref.buffer is not None for _, _, ref in taken)  # a slot's buffer: sent once
        pixels, labels, ref = taken[0]
        pixels[:] = 7
        labels[:] = [3, 1, 4, 1]
        images, targets = ring._view(ref)  # as the training process unpickles it
        assert images.shape == shape and int(images.sum()) == 7 * images.numel()
        assert targets.tolist() == [3, 1, 4, 1]
        ring._view(taken[1][2])  # slot 1 is sent and dropped at once: free again
        t0 = time.monotonic()
        again = writer.take(shape)[2]
        assert again.slot == 1 and again.buffer is None
        assert writer.take(shape) is None  # both held: waited wait_s, then "send it fresh"
        assert time.monotonic() - t0 >= 0.3 and naps
        naps.clear()
        assert writer.take(shape) is None and not naps  # still held: no second wait
        corner = images[0, 0]
        del images, targets
        assert writer.take(shape) is None  # a view still holds slot 0
        assert int(corner.sum()) == 7 * corner.numel()
        del corner
        assert writer.take(shape)[2].slot == 0
        with pytest.raises(ValueError, match="larger than the ring"):
            writer.take((5, 3, 8, 8))
    finally:
        ring.close()


def test_next_pass_moves_to_next_epoch(ds):
    loader = TrainLoader(small_cfg(ds, num_workers=0), rank=0, world_size=1, batch_size=8, seed=0)
    first = [int(v) for _, y in loader for v in y]
    assert loader.epoch == 1
    second = [int(v) for _, y in loader for v in y]
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("start", [1, 3])
def test_resume_mid_epoch_is_the_tail_of_the_epoch(ds, start):
    cfg = small_cfg(ds, num_workers=2)
    full = epoch_batches(cfg, world=2, batch=3, epoch=2, seed=7)
    tail = epoch_batches(cfg, world=2, batch=3, epoch=2, seed=7, start=start)
    for rank in range(2):
        assert len(tail[rank]) == len(full[rank]) - start
        for (x1, y1), (x2, y2) in zip(full[rank][start:], tail[rank], strict=True):
            assert torch.equal(y1, y2) and torch.equal(x1, x2)  # same samples, same pixels


def test_resampled_mode_fixed_length_and_resume(ds):
    cfg = small_cfg(ds, epoch_mode="resampled", samples_per_epoch=40)
    full = epoch_batches(cfg, world=2, batch=4, epoch=0)
    assert [len(b) for b in full] == [5, 5] and all(len(y) == 4 for b in full for _, y in b)
    assert set(all_labels(full)) <= set(range(35))
    tail = epoch_batches(cfg, world=2, batch=4, epoch=0, start=2)
    assert all(
        torch.equal(a[0], b[0]) for r in range(2) for a, b in zip(full[r][2:], tail[r], strict=True)
    )


def test_bad_samples_are_skipped_counted_and_replaced(tmp_path, caplog):
    # sample 3 is not a JPEG; shard 1 (samples 10..19) keeps only its first ~half of bytes
    root = write_dataset(
        tmp_path / "bad", {"train": [10, 10, 10]}, corrupt=[3], truncate={("train", 1): 0.5}
    )
    cfg = small_cfg(root, num_workers=0, max_bad_fraction=0.5)
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data"):
        batches = [(x, y) for x, y in loader]
    labels = [int(v) for _, y in batches for v in y]
    assert len(batches) == 8 and sum(len(y) for _, y in batches) == 30  # counts unchanged
    assert 3 not in labels
    missing = set(range(30)) - set(labels)
    assert 3 in missing and missing - {3} and missing - {3} <= set(range(10, 20))
    stats = loader.stats()
    assert stats["bad_samples"] == len(missing) and stats["samples"] == 30
    assert "train_00003" in caplog.text and "train-000000.tar" in caplog.text
    assert "train-000001.tar" in caplog.text  # the truncated shard is named


def test_too_many_bad_samples_raise_naming_the_shards(tmp_path):
    root = write_dataset(tmp_path / "worse", {"train": [20, 20]}, corrupt=range(20, 30))
    cfg = small_cfg(root, num_workers=2, max_bad_fraction=0.05, bad_check_after=10)
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    with pytest.raises(DataError, match=r"train-000001\.tar") as err:
        for _ in loader:
            pass
    assert "max_bad_fraction" in str(err.value) and "train-000000.tar" not in str(err.value)


def _relabel(shard: Path, member: str, label: bytes) -> None:
    """Overwrite a member's bytes in place (same length): the same size, a valid tar, other
    bytes, as a shard replaced after its manifest was written."""
    import tarfile

    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    assert info.size == len(label)
    raw = bytearray(shard.read_bytes())
    raw[info.offset_data : info.offset_data + info.size] = label
    shard.write_bytes(bytes(raw))


def _one_epoch(root: Path, **kw) -> list[int]:
    cfg = small_cfg(root, **{"num_workers": 0, **kw})
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=4, seed=0, streams=2)
    return sorted(int(v) for _, y in loader for v in y)


def test_a_replaced_shard_is_refused_naming_it_unless_verification_is_off(tmp_path, caplog):
    """Shard 0 (ids 0..5) gets another label for sample 1, same size. Epoch 0 orders the
    shards 2, 0, 1 and stream 0 takes 8 of the 18 samples, so shard 0 is split over both
    streams: stream 1, which reads its end, refuses it."""
    root = write_dataset(tmp_path / "r", {"train": [6, 6, 6]})
    order = D.shard_order(3, 0, 0).tolist()
    split = [{s.shard for s in D.segments_for([6] * 3, order, a, b)} for a, b in ((0, 8), (8, 18))]
    assert order == [2, 0, 1] and split == [{2, 0}, {0, 1}]
    assert _one_epoch(root) == list(range(18))  # verified, the normal path
    size = (root / "train-000000.tar").stat().st_size
    _relabel(root / "train-000000.tar", "train_00001.cls", b"9")
    assert (root / "train-000000.tar").stat().st_size == size
    with pytest.raises(D.BadShard, match=r"train-000000\.tar: its \d+ bytes have sha256") as err:
        _one_epoch(root, num_workers=1)  # raised in a loader worker, re-raised here
    with pytest.raises(D.BadShard, match=r"train-000000\.tar"):  # evaluation reads alike
        list(eval_loader(small_cfg(root, val_split="train"), rank=0, world_size=1, batch_size=4))
    recorded = json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    assert recorded["sha256"] in str(err.value) and "datasets/index_shards.py" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data"):
        labels = _one_epoch(root, verify_shards=False)
    assert labels.count(9) == 2 and 1 not in labels  # read as it is now, and said so:
    assert "data.verify_shards=false" in caplog.text


def test_a_manifest_count_below_the_shards_is_refused(tmp_path):
    """Shard 0 holds 6 samples, its manifest entry says 5: the sixth would be dropped."""
    root = write_dataset(tmp_path / "c", {"train": [6, 6]})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = 5
    (root / "manifest.json").write_text(json.dumps(manifest))
    for verify in (True, False):  # the count costs nothing: checked either way
        with pytest.raises(D.BadShard, match=r"train-000000\.tar holds more samples than its "):
            _one_epoch(root, verify_shards=verify)


def test_a_shard_without_end_blocks_is_refused_by_the_strict_reader(tmp_path):
    root = write_dataset(tmp_path / "e", {"train": [3]})
    raw = (root / "train-000000.tar").read_bytes()
    body = raw[: len(raw.rstrip(b"\0")) + 511 & ~511]  # the members, no end blocks, no padding
    assert len(list(tar_files(io.BytesIO(body)))) == 6  # the lenient reader stops quietly
    for cut in (body, body + bytes(512)):  # none, or one of the two zero blocks
        with pytest.raises(EOFError, match="end-of-archive blocks"):
            list(tar_files(io.BytesIO(cut), require_end=True))
    assert len(list(tar_files(io.BytesIO(raw), require_end=True))) == 6


def test_missing_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match=r"half.*manifest\.json"):
        D.load_manifest(str(tmp_path / "half"))


def test_synthetic_source(ds):
    loader = TrainLoader(
        DataConfig(url="", synthetic_samples=64, image_size=16),
        rank=0,
        world_size=2,
        batch_size=4,
        seed=0,
    )
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 8
    assert batches[0][0].shape == (4, 3, 16, 16) and batches[0][0].dtype == torch.uint8
    assert batches[0][0].data_ptr() == batches[-1][0].data_ptr()  # made once, reused


# ---------------------------------------------------------------------------- eval loader


def test_eval_loader_each_sample_once_across_ranks(ds):
    cfg = small_cfg(ds, num_workers=2)
    per_rank = [list(eval_loader(cfg, rank=r, world_size=2, batch_size=4)) for r in range(2)]
    counts = [sum(len(y) for _, y in batches) for batches in per_rank]
    assert sorted(counts) == [11, 12]  # 23 samples, no padding
    assert counts == [D.eval_samples(cfg, rank=r, world_size=2) for r in range(2)]
    assert all_labels(per_rank) == list(range(23))
    assert all(x.shape[1:] == (3, 32, 32) for batches in per_rank for x, _ in batches)
    # with_index: each sample's position in the split (here equal to its class id)
    for r in range(2):
        for _, y, where in eval_loader(cfg, rank=r, world_size=2, batch_size=4, with_index=True):
            assert torch.equal(y, where)


def test_eval_views_ten_crop_and_full(ds):
    cfg = small_cfg(ds, num_workers=0)
    x, y = next(eval_loader(cfg, rank=0, world_size=1, batch_size=3, views="ten_crop"))
    assert x.shape == (3, 10, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (3,)
    full = list(eval_loader(cfg, rank=0, world_size=1, batch_size=4, views="full", scale=40))
    assert sum(len(y) for _, y in full) == 23
    assert all(x.shape[2:] == (40, 48) for x, _ in full)  # 48x40 images, shorter side 40


def test_batches_by_shape_groups_and_bounds_what_it_holds():
    # three common shapes interleaved, and a rare one every fourth item
    shapes = ["a", "b", "c"] * 10
    for i in range(0, 30, 4):
        shapes.insert(i, f"rare{i}")
    items = list(enumerate(shapes))

    def run(max_held: float, weight=lambda item: 1) -> list[list]:
        consumed, emitted, out = 0, 0, []

        def feed():
            nonlocal consumed
            for item in items:
                consumed += 1
                yield item

        for batch in D.batches_by_shape(feed(), lambda it: it[1], 4, max_held, weight):
            emitted += len(batch)
            held = consumed - emitted
            assert held * weight(batch[0]) <= max_held  # never more waiting than allowed
            assert 1 <= len(batch) <= 4 and len({shape for _, shape in batch}) == 1
            out.append(batch)
        assert sorted(i for batch in out for i, _ in batch) == list(range(len(items)))
        return out

    # room for three part-filled common buckets: they fill whole batches (10 each: 4, 4, 2),
    # the rare shapes are the ones pushed out early, alone
    roomy = run(max_held=12)
    assert sum(len(b) == 4 for b in roomy) == 6
    assert all(b[0][1].startswith("rare") for b in roomy if len(b) == 1)
    # tight: still every item once and the bound kept, in smaller batches; weights count
    assert sum(len(b) == 4 for b in run(max_held=4)) < 6
    assert len(run(max_held=20, weight=lambda item: 5)) == len(run(max_held=4))
    # unbounded: exactly one batch per shape and batch_size
    assert len(run(max_held=len(items))) == 3 * 3 + 8  # 4+4+2 per common shape; 8 rare ones


def test_full_views_batch_same_shaped_images_that_are_not_adjacent(tmp_path):
    """Multiscale evaluation: images of a few shapes, interleaved in the shards (as in shuffled
    ImageNet), still fill whole batches; every sample comes out once, at its position."""
    shapes = [(48, 40), (40, 48), (56, 40)]
    root = write_dataset(tmp_path / "mixed", {"val": [14, 13]}, size=lambda g: shapes[g % 3])
    cfg = small_cfg(root, num_workers=0)
    batches = list(
        eval_loader(
            cfg, rank=0, world_size=1, batch_size=4, views="full", scale=40, with_index=True
        )
    )
    got = sorted(int(i) for _, _, where in batches for i in where)
    assert got == list(range(27))
    for x, y, where in batches:
        assert torch.equal(y, where)  # labels travel with their samples
        w, h = shapes[int(y[0]) % 3]
        assert x.shape[2:] == ((40, 40 * w // h) if w >= h else (40 * h // w, 40))
        assert all(shapes[int(label) % 3] == (w, h) for label in y)
    assert len(batches) == 3 * 3  # 9 of each shape: 4 + 4 + 1; adjacent-only batching: 27


# ---------------------------------------------------------------------------- transforms


def grid_image(w: int, h: int) -> np.ndarray:
    """uint8 [3, h, w] with distinct values: channel 0 = column, 1 = row, 2 = 7."""
    arr = np.zeros((3, h, w), np.uint8)
    arr[0] = np.arange(w)[None, :]
    arr[1] = np.arange(h)[:, None]
    arr[2] = 7
    return arr


def test_ten_crop_gives_corners_centre_and_flips():
    arr = grid_image(12, 10)
    views = T.ten_crop(arr, 4)
    assert views.shape == (10, 3, 4, 4)
    corners = [(0, 0), (0, 8), (6, 0), (6, 8), (3, 4)]  # (top, left); centre = round((10-4)/2)...
    for i, (top, left) in enumerate(corners):
        assert views[i][0, 0, 0] == left and views[i][1, 0, 0] == top
        assert np.array_equal(views[i], arr[:, top : top + 4, left : left + 4])
        assert np.array_equal(views[i + 5], views[i][:, :, ::-1])


def test_paper_plan_scale_and_crop_maths():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(100, 900)), int(rng.integers(100, 900))
        plan = T.plan_paper(w, h, rng, size=224, scale_range=(256, 480))
        assert plan.size == (224, 224)
        left, top, right, bottom = plan.box
        sx, sy = 224 / (right - left), 224 / (bottom - top)  # resized pixels per original pixel
        shorter = w * sx if w <= h else h * sy
        assert abs(shorter - round(shorter)) < 1e-6 and 256 <= round(shorter) <= 480
        assert abs(sx / sy - 1) < 0.01  # aspect ratio kept (the longer side is truncated)
        assert -1e-6 <= left and right <= w + 1e-6 and -1e-6 <= top and bottom <= h + 1e-6


def encoded(arr: np.ndarray, **save: object) -> bytes:
    """`arr` (HxWx3 or HxW uint8) as JPEG bytes, saved by Pillow with `save` options."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **save)
    return buf.getvalue()


def wave_jpeg(w: int, h: int, period: float = 200) -> bytes:
    """A JPEG of slow waves (red along columns, green along rows, blue diagonal): smooth
    enough that half a pixel moves a value by at most ~2 levels, steep enough that a whole
    pixel of misplacement shows (mean error 1.3+, max 6+, measured)."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    wave = [np.sin(2 * np.pi * x / period), np.sin(2 * np.pi * y / period)]
    wave.append(np.sin(2 * np.pi * (x + y) / (1.5 * period)))
    return encoded((127 + 120 * np.stack(wave, axis=-1)).astype(np.uint8), quality=95)


REGION_MISSING = (
    "orchestrator._jpeg_region is not built: install libjpeg's headers (apt install libjpeg-dev)"
    " and reinstall (make install, or pip install -e .)"
)


@pytest.fixture(params=["region", "simplejpeg", "pillow"])
def decoder(request, monkeypatch) -> str:
    """Run a test with each JPEG decoder: our partial decoder (the default where it is built),
    simplejpeg's whole-image decode, and Pillow (the last fallback)."""
    if request.param == "region":
        assert T._jpeg_region is not None, REGION_MISSING
    else:
        monkeypatch.setattr(T, "_jpeg_region", None)
    if request.param == "pillow":
        monkeypatch.setattr(T, "simplejpeg", None)
    else:
        assert T.simplejpeg is not None, "simplejpeg is a core dependency: pip install -e ."
    return request.param


@pytest.mark.parametrize(
    "kind,save",
    [
        ("4:2:0", {"quality": 90, "subsampling": 2}),
        ("4:2:2", {"quality": 90, "subsampling": 1}),
        ("4:4:4", {"quality": 95, "subsampling": 0}),
        ("progressive", {"quality": 90, "progressive": True}),
        ("grey", {"quality": 90}),
    ],
)
def test_region_decode_gives_the_full_decodes_pixels(monkeypatch, kind: str, save: dict):
    """The partial decoder is only an accelerator: for every kind of JPEG and every plan
    (paper, RandomResizedCrop, small outputs that allow a 1/2-1/8 DCT decode, the whole image)
    its box is pixel-identical to cutting the box out of simplejpeg's whole-image decode."""
    assert T._jpeg_region is not None, REGION_MISSING
    rng = np.random.default_rng(7)
    x, y = np.meshgrid(np.arange(517), np.arange(389))  # odd sizes: partial blocks at the edges
    arr = (127 + 120 * np.sin(np.stack([x / 9.0, y / 7.0, (x + y) / 13.0], -1))).astype(np.uint8)
    arr = arr[:, :, 0] if kind == "grey" else arr
    data = encoded(arr, **save)
    w, h = T.image_size(data)
    plans = [T.Plan((0.0, 0.0, float(w), float(h)), T.resized_shape(w, h, 256))]
    for _ in range(12):
        plans += [T.plan_paper(w, h, rng), T.plan_rrc(w, h, rng), T.plan_rrc(w, h, rng, size=40)]
        plans.append(T.plan_paper(w, h, rng, size=56, scale_range=(64, 96)))
    reductions = set()
    for plan in plans:
        region = T.decode_box(data, plan, w, h)
        reductions.add(T._dct_reduction(w, h, T._min_full_size(w, h, plan)))
        with monkeypatch.context() as m:
            m.setattr(T, "_jpeg_region", None)
            whole = T.decode_box(data, plan, w, h)
        assert region.shape == whole.shape and region.dtype == np.uint8, (kind, plan)
        assert np.array_equal(region, whole), (kind, plan, np.abs(region - whole.astype(int)).max())
    assert reductions >= {1, 2, 4}, reductions  # the DCT-scaled region decodes were exercised


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's header read
def test_decompression_bombs_are_refused_before_decoding(decoder, monkeypatch):
    """A header claiming more pixels than the limit is a bad sample (ValueError) on every
    path, before a byte of pixels is allocated."""
    data = jpeg(4, size=(48, 40))
    monkeypatch.setattr(T.Image, "MAX_IMAGE_PIXELS", 48 * 40 - 1)
    with pytest.raises(ValueError, match="48x40 image: over 1919 pixels"):
        T.paper_train(data, np.random.default_rng(0), size=16, scale_range=(20, 24))
    with pytest.raises(ValueError, match="48x40 image: over 1919 pixels"):
        T.decode(data)
    monkeypatch.setattr(T.Image, "MAX_IMAGE_PIXELS", 48 * 40)
    pixels = T.paper_train(data, np.random.default_rng(0), size=16, scale_range=(20, 24))
    assert pixels.shape == (3, 16, 16)


def test_region_decoder_refuses_damage_and_bad_boxes():
    """A truncated or corrupt JPEG is a ValueError (never half-grey pixels), CMYK is left to
    the fallback, and a box outside the image is refused, not read out of bounds."""
    assert T._jpeg_region is not None, REGION_MISSING
    decode_region = T._jpeg_region.decode_region
    good = jpeg(3, size=(160, 120))
    buf, x0, width = decode_region(good, 1, 40, 30, 120, 90)
    assert x0 <= 40 and x0 + width >= 120 and len(buf) == 60 * width * 3
    with pytest.raises(ValueError, match="decode_region"):
        decode_region(good[: len(good) // 2], 1, 0, 0, 160, 120)  # truncated
    # rows below the box are never read: damage there is not seen, and the box is intact
    top_rows, _, full_width = decode_region(good[: len(good) // 2], 1, 0, 0, 160, 16)
    assert top_rows == decode_region(good, 1, 0, 0, 160, 16)[0] and full_width == 160
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\xff\xd9" * 32  # EOI markers inside
    with pytest.raises(ValueError, match="decode_region"):
        decode_region(bytes(corrupt), 1, 0, 0, 160, 120)
    with pytest.raises(ValueError, match="decode_region"):
        decode_region(b"not a jpeg at all", 1, 0, 0, 10, 10)
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 48), (10, 20, 30, 40)).save(cmyk, "JPEG")
    with pytest.raises(ValueError, match="CMYK"):
        decode_region(cmyk.getvalue(), 1, 0, 0, 64, 48)
    for box in [(0, 0, 161, 120), (0, 0, 160, 121), (10, 10, 10, 20), (-1, 0, 5, 5)]:
        with pytest.raises(ValueError, match="decode_region"):
            decode_region(good, 1, *box)
    with pytest.raises(ValueError, match="decode_region"):
        decode_region(good, 3, 0, 0, 10, 10)  # only 1/1, 1/2, 1/4, 1/8
    with pytest.raises(ValueError, match="decode_region"):
        decode_region(good, 2, 0, 0, 81, 60)  # beyond the 80x60 image at 1/2


def test_paper_transform_output_and_draft_decode(decoder):
    data = jpeg(1, size=(1200, 900))
    out = T.paper_train(data, np.random.default_rng(0), size=224, scale_range=(256, 300))
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8
    # a 1200x900 image needs a shorter side >= 256: libjpeg may decode at 1/2 (600x450) but
    # no smaller (1/4 would give 225 < 256)
    pixels, factor = T.decode(data, (341, 256))
    assert factor == 0.5 and pixels.shape == (450, 600, 3)
    full, factor = T.decode(data)
    assert factor == 1.0 and full.shape == (900, 1200, 3)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(full.astype(int) - reference).max() <= 1  # both are libjpeg-turbo


def test_paper_transform_matches_resize_then_crop(decoder):
    """The snapped-box resample against the paper's recipe done literally with Pillow: resize
    the whole image to the drawn shorter side, crop, flip."""
    data = wave_jpeg(500, 375)
    for seed in range(6):
        out = T.paper_train(data, np.random.default_rng(seed)).astype(int)
        rng = np.random.default_rng(seed)  # replays plan_paper's draws
        s = int(rng.integers(256, 481))
        rw, rh = T.resized_shape(500, 375, s)
        x0, y0 = int(rng.integers(0, rw - 223)), int(rng.integers(0, rh - 223))
        flip = rng.random() < 0.5
        ref = Image.open(io.BytesIO(data)).convert("RGB").resize((rw, rh), Image.BILINEAR)
        ref_arr = np.asarray(ref.crop((x0, y0, x0 + 224, y0 + 224))).transpose(2, 0, 1)
        ref_arr = ref_arr[:, :, ::-1] if flip else ref_arr
        diff = np.abs(out - ref_arr.astype(int))
        # snapping moves each edge <= half a pixel: mean <= 0.96, max 4 measured over seeds
        assert diff.mean() < 1.1 and diff.max() <= 5, (seed, diff.mean(), diff.max())


@pytest.mark.parametrize(
    "mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")]
)
def test_odd_image_kinds_decode_to_rgb(decoder, mode: str, fmt: str):
    """ImageNet holds CMYK and greyscale JPEGs and one PNG named .JPEG: all come out RGB, with
    colours close to the source's (a ramp: red = column, blue = its inverse)."""
    x, y = np.meshgrid(np.linspace(0, 255, 120), np.linspace(0, 255, 90))
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    pixels, factor = T.decode(buf.getvalue())
    expect = np.asarray(Image.fromarray(rgb).convert(mode).convert("RGB")).astype(int)
    assert pixels.shape == (90, 120, 3) and factor == 1.0
    assert np.abs(pixels.astype(int) - expect).mean() < 3
    crop = T.paper_train(buf.getvalue(), np.random.default_rng(0), size=32, scale_range=(36, 48))
    assert crop.shape == (3, 32, 32)


def test_center_view_matches_resize_then_crop(decoder):
    data = jpeg(2, size=(300, 200))  # resized to 384x256, crop at (80, 16)
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((384, 256), Image.Resampling.BILINEAR)
    ref_arr = np.asarray(ref.crop((80, 16, 304, 240))).transpose(2, 0, 1).astype(int)
    out = T.center_view(data, size=224, resize=256).astype(int)
    assert out.shape == (3, 224, 224)
    assert np.abs(out - ref_arr).mean() < 0.5 and np.abs(out - ref_arr).max() <= 2
    full = T.full_view(data, resize=256)
    assert full.shape == (3, 256, 384)


def test_rrc_plan_and_cifar_pad_crop_flip():
    rng = np.random.default_rng(1)
    for _ in range(100):
        left, top, right, bottom = T.plan_rrc(200, 150, rng, size=64).box
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 150
        area = (right - left) * (bottom - top) / (200 * 150)
        assert 0.07 <= area <= 1.0
    arr = grid_image(32, 32)
    padded = np.pad(arr, ((0, 0), (4, 4), (4, 4)))
    found = set()
    for seed in range(30):
        out = T.pad_crop_flip(arr, np.random.default_rng(seed), size=32, pad=4)
        assert out.shape == (3, 32, 32)
        matches = [
            (y, x, flip)
            for y in range(9)
            for x in range(9)
            for flip in (False, True)
            if np.array_equal(out, padded[:, y : y + 32, x : x + 32][:, :, :: -1 if flip else 1])
        ]
        assert len(matches) == 1  # a crop of the zero-padded image, maybe mirrored
        found.add(matches[0])
    assert len(found) > 10 and {f for _, _, f in found} == {False, True}


# ---------------------------------------------------------------------------- device side


def test_device_normalize_maths():
    mean, std = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    norm = DeviceNormalize(mean, std, pca_lighting=0.0, device="cpu")
    out = norm(x, train=True)
    expected = (x.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)

    lit = DeviceNormalize(mean, std, pca_lighting=0.1, device="cpu")
    a = lit(x, train=True, generator=torch.Generator().manual_seed(5))
    b = lit(x, train=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.allclose(lit(x, train=False), expected, atol=1e-5)
    # the offset is eigvec @ (alpha * eigval) * 255 per image, constant over pixels
    alpha = torch.randn(2, 3, generator=torch.Generator().manual_seed(5)) * 0.1
    eigvec, eigval = torch.tensor(DeviceNormalize.EIGVEC), torch.tensor(DeviceNormalize.EIGVAL)
    rgb = (alpha * eigval) @ eigvec.T * 255
    assert torch.allclose(
        (a - expected) * torch.tensor(std).view(1, 3, 1, 1),
        rgb.view(2, 3, 1, 1).expand_as(a),
        atol=1e-3,
    )


def test_device_normalize_per_pixel_mean_by_hand():
    """data.normalize=per_pixel_mean: x minus the mean image, over one scalar (the RMS of the
    per-channel stds), written out here pixel by pixel; other sizes get the mean image
    resized; per-channel statistics play no part but through that scalar."""
    rng = np.random.default_rng(0)
    image = rng.uniform(40, 200, (3, 3, 2)).astype(np.float32)
    std = (60.0, 55.0, 50.0)
    scale = ((60.0**2 + 55.0**2 + 50.0**2) / 3) ** 0.5
    x = torch.randint(0, 256, (2, 3, 3, 2), dtype=torch.uint8)
    norm = DeviceNormalize((1.0, 2.0, 3.0), std, pca_lighting=0.0, mean_image=image)
    out = norm(x, train=True).numpy()
    pixels = x.numpy()
    for b, c, i, j in np.ndindex(*pixels.shape):
        want = (float(pixels[b, c, i, j]) - float(image[c, i, j])) / scale
        assert out[b, c, i, j] == pytest.approx(want, abs=1e-5), (b, c, i, j)
    # ten-crop batches [B, 10, 3, H, W]: every view the same way
    views = torch.randint(0, 256, (2, 10, 3, 3, 2), dtype=torch.uint8)
    got = norm(views, train=False).numpy()
    np.testing.assert_allclose(got, (views.numpy() - image) / scale, atol=1e-5)
    # another size (multiscale, or a crop other than the mean's): a flat mean image stays flat
    flat = np.broadcast_to(np.array([90.0, 100.0, 110.0], np.float32)[:, None, None], (3, 4, 4))
    norm = DeviceNormalize(IMAGENET_MEAN, std, pca_lighting=0.0, mean_image=flat)
    big = torch.randint(0, 256, (1, 3, 7, 5), dtype=torch.uint8)
    want = (big.numpy() - np.array([90.0, 100.0, 110.0])[:, None, None]) / scale
    np.testing.assert_allclose(norm(big, train=False).numpy(), want, atol=1e-4)
    # and a resized mean image is the mean image, bilinearly resampled (a 2x2 -> 4x4 ramp)
    ramp = np.stack([np.array([[0.0, 8.0], [16.0, 24.0]], np.float32)] * 3)
    norm = DeviceNormalize(IMAGENET_MEAN, (1.0, 1.0, 1.0), pca_lighting=0.0, mean_image=ramp)
    zeros = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    # align_corners=False: output pixel k samples input position (k + 0.5) / 2 - 0.5
    row = np.array([0.0, 2.0, 6.0, 8.0])  # along a row, 0..8 (edges clamp)
    want = -(row[None, :] + 2 * row[:, None])  # down a column, 0..16
    np.testing.assert_allclose(norm(zeros, train=False).numpy()[0, 0], want, atol=1e-4)
    with pytest.raises(ValueError, match=r"mean_image: expected \[3, H, W\]"):
        DeviceNormalize(mean_image=np.zeros((4, 4), np.float32))


# ---------------------------------------------------------------------------- streams


class FlakyBody:
    """A body that dies after `fail_after` bytes, as a dropped connection does."""

    def __init__(self, data: bytes, fail_after: int | None):
        self.data, self.pos, self.fail_after = data, 0, fail_after

    def read(self, n: int) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        stop = len(self.data) if self.fail_after is None else self.fail_after
        chunk = self.data[self.pos : min(self.pos + n, stop)]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        pass


@pytest.mark.parametrize("fmt", ["USTAR", "GNU", "PAX"])
def test_tar_reader_reads_what_tarfile_reads(fmt):
    """The loader's own tar reader against tarfile's, over each format: long names (GNU
    headers, pax records, the ustar prefix), non-ASCII names, empty files, and members that
    are not files (skipped); damage is an error, never a wrong sample."""
    import tarfile

    buf = io.BytesIO()
    members = [
        ("a/0001.jpg", b"x" * 1000),
        ("a/0001.cls", b"7"),
        ("a/empty.txt", b""),
        ("d" * 60 + "/" + "n" * 80 + ".jpg", b"long" * 300),
        ("caf\u00e9/01.jpg", b"accent"),
    ]
    with tarfile.open(fileobj=buf, mode="w", format=getattr(tarfile, f"{fmt}_FORMAT")) as tar:
        folder = tarfile.TarInfo("a")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            if fmt == "USTAR" and len(name) > 100 and "/" not in name[-100:]:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "0001.jpg"
        tar.addfile(link)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(tar_files(io.BytesIO(raw))) == expected and len(expected) == len(members)
    damaged = bytearray(raw)
    damaged[600] ^= 0xFF  # inside the first file's header (after the folder's)
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_files(io.BytesIO(bytes(damaged))))
    with pytest.raises(EOFError):
        list(tar_files(io.BytesIO(raw[:1500])))  # cut inside the first file


def test_reopening_stream_resumes_from_the_byte_reached():
    payload = np.random.default_rng(0).bytes(100_000)
    offsets = []

    def open_at(offset: int):
        offsets.append(offset)
        body = FlakyBody(payload[offset:], fail_after=30_000 if len(offsets) < 3 else None)
        return body, len(payload) - offset

    stream = D.ReopeningStream("test://x", open_at, retry_s=10)
    stream_delay = time.monotonic()
    assert io.BufferedReader(stream, 8192).read() == payload
    assert offsets == [0, 30_000, 60_000] and time.monotonic() - stream_delay < 5


def test_reads_over_http_same_as_local(ds):
    """http(s):// shards through urllib (a throwaway local server; it ignores Range requests,
    which the reader then handles by skipping)."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(ds))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        local = epoch_batches(small_cfg(ds), world=1, batch=8)[0]
        remote = epoch_batches(small_cfg(url), world=1, batch=8)[0]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(local, remote, strict=True))
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------- real S3


def upload_dir(local: Path, url: str) -> None:
    from orchestrator.storage import open_storage

    store = open_storage(url)
    for path in sorted(local.iterdir()):
        if path.name != "manifest.json":
            store.put(path.name, path.read_bytes())
    store.put("manifest.json", (local / "manifest.json").read_bytes())  # the commit marker last


def test_reads_from_s3_same_as_local(ds, s3_prefix):
    url = f"{s3_prefix}/ds"
    with pytest.raises(DataError, match="manifest"):
        D.load_manifest(url)
    upload_dir(ds, url)
    local = epoch_batches(small_cfg(ds), world=2, batch=4)
    remote = epoch_batches(small_cfg(url), world=2, batch=4)
    for r in range(2):
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(local[r], remote[r], strict=True)
        )
    loader = TrainLoader(small_cfg(url), rank=0, world_size=1, batch_size=8, seed=0)
    list(loader)
    assert loader.stats()["bytes"] >= sum((ds / f).stat().st_size for f in ("train-000000.tar",))

    import webdataset as wds  # the registered gopen handler: no `aws` CLI needed

    keys = [s["__key__"] for s in wds.WebDataset(f"{url}/val-000000.tar", shardshuffle=False)]
    assert keys == [f"val_{i:05d}" for i in range(9)]


@pytest.fixture
def private_s3(tmp_path, monkeypatch):
    """An object store of this test's own (SeaweedFS only, on free ports): the restart test
    stops it mid-epoch, which must not pull the shared test stack from under other tests."""
    import boto3

    from orchestrator import s3
    from orchestrator.stack import Stack
    from tests.conftest import free_weed_ports, test_stack_config

    ports = free_weed_ports()
    st = Stack(test_stack_config(state_dir=tmp_path / "private-stack", **ports))
    st.up(services=("s3",))
    for key, value in st.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    # this process's cached client, and boto3's default session (which keeps the credentials
    # it first resolved), belong to the shared store: start afresh for this one
    monkeypatch.setattr(s3, "_clients", {})
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    try:
        yield st
    finally:
        if st._running_pid("s3"):
            kill_s3(st)  # ours alone: no need to wait out a graceful stop
        st.down(services=("s3",))


def kill_s3(st) -> None:
    """SIGKILL the store's whole process tree: a crash, not a graceful stop (a graceful stop
    lets the response in flight finish, so nothing would break mid-stream)."""
    import psutil

    root = psutil.Process(st._running_pid("s3"))
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


def socket_buffer_bytes() -> int:
    """The most a loopback connection can hold in flight: max receive + max send buffer."""
    try:
        rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        return rmem + wmem
    except (OSError, ValueError, IndexError):
        return 64 << 20


@pytest.mark.services  # an object store of its own, stopped mid-epoch
def test_s3_restart_mid_epoch_resumes_the_stream(tmp_path, private_s3, caplog):
    # one shard of 2 MB samples (a random member each), large enough that after the first
    # batch more of it is unsent than kernel socket buffers can hold: the store dies mid-shard
    samples = (socket_buffer_bytes() + (24 << 20)) // 2_000_000 + 1
    root = write_dataset(tmp_path / "big", {"train": [samples]}, pad_bytes=2_000_000)
    url = "s3://resnet/restart/big"
    upload_dir(root, url)
    cfg = small_cfg(url, num_workers=0, shuffle_buffer=0, io_retry_s=120)
    reference = epoch_batches(small_cfg(root, num_workers=0, shuffle_buffer=0), world=1, batch=4)[0]

    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    got = []
    restarter = None
    with caplog.at_level(logging.WARNING, logger="orchestrator.data"):
        for i, (x, y) in enumerate(loader):
            got.append((x.clone(), y.clone()))
            if i == 0:  # 4 samples (+1 read ahead) consumed: kill the store, restart it in 2 s
                kill_s3(private_s3)
                restarter = threading.Thread(
                    target=lambda: (time.sleep(2), private_s3.up(services=("s3",)))
                )
                restarter.start()
    restarter.join()
    assert len(got) == len(reference) == -(-samples // 4)
    for (x1, y1), (x2, y2) in zip(reference, got, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    assert loader.stats()["bad_samples"] == 0
    resumed = [int(b) for b in re.findall(r"read failed at byte (\d+)", caplog.text)]
    assert any(b > 0 for b in resumed), caplog.text[-2000:]  # a Range request picked up mid-shard


def test_mixed_batches_join_and_split_keep_each_sample_with_its_label():
    """decode=gpu/split: a step's pieces joined (pixels first, then JPEGs) and cut into
    micro-batches keep every sample's bytes beside its label."""
    from orchestrator.data import MixedBatch, join_batches, split_batch

    def piece(first: int, decoded: int, files: int) -> tuple[MixedBatch, torch.Tensor]:
        pixels = torch.full((decoded, 3, 2, 2), first, dtype=torch.uint8)
        pixels += torch.arange(decoded, dtype=torch.uint8)[:, None, None, None]
        blobs = [bytes([first + decoded + i]) * (i + 1) for i in range(files)]
        ends = torch.tensor(np.cumsum([len(b) for b in blobs]), dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        labels = torch.arange(first, first + decoded + files)
        return MixedBatch(pixels, data, ends.reshape(-1)), labels

    joined, labels = join_batches([piece(10, 2, 3), piece(20, 1, 2)])
    assert len(joined) == len(labels) == 8

    def sample_value(batch: MixedBatch, i: int) -> int:
        k = len(batch.pixels)
        return int(batch.pixels[i, 0, 0, 0]) if i < k else int(batch.jpegs()[i - k][0])

    pairs = [(sample_value(joined, i), int(labels[i])) for i in range(8)]
    assert all(value == label for value, label in pairs), pairs
    parts = split_batch(joined, labels, [3, 3, 2])
    again = [(sample_value(b, i), int(y[i])) for b, y in parts for i in range(len(y))]
    assert again == pairs and [len(b) for b, _ in parts] == [3, 3, 2]
