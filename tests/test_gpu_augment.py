"""The GPU augmentation maths, on CPU tensors: boxes, batched crop-resize, flips, fallbacks."""

from __future__ import annotations

import pytest
import torch

from orchestrator.data.gpu_augment import (
    DeviceAugment,
    crop_resize,
    cut_to_boxes,
    decode_jpegs,
    pad_batch,
    paper_boxes,
    replace_undecodable,
    rrc_boxes,
    shrink_to,
)
from tests.conftest import odd_shards_config, odd_shards_data, run_script, write_tar


def _image(h: int, w: int) -> torch.Tensor:
    return torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w) % 251


def test_whole_image_box_is_identity() -> None:
    img = _image(16, 16)
    out = crop_resize(img[None], torch.tensor([[0.0, 0, 16, 16]]), 16, torch.tensor([False]))
    torch.testing.assert_close(out[0], img)


def test_aligned_box_equals_slicing_and_flip_mirrors() -> None:
    imgs = [_image(10, 12), _image(8, 9)]
    batch, sizes = pad_batch(imgs)
    assert batch.shape == (2, 3, 10, 12) and sizes.tolist() == [[10, 12], [8, 9]]
    boxes = torch.tensor([[2.0, 3, 4, 4], [1.0, 5, 4, 4]])
    out = crop_resize(batch, boxes, 4, torch.tensor([False, True]))
    torch.testing.assert_close(out[0], imgs[0][:, 2:6, 3:7])
    torch.testing.assert_close(out[1], imgs[1][:, 1:5, 5:9].flip(-1))


def test_paper_boxes_follow_scale_augmentation() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[375, 500], [500, 333], [256, 256]] * 50)
    boxes = paper_boxes(sizes, 224, (256, 480), gen)
    short = sizes.min(1).values.double()
    side = boxes[:, 2]
    assert torch.all(side >= 224 * short / 480 - 1e-6) and torch.all(
        side <= 224 * short / 256 + 1e-6
    )
    assert torch.all(boxes[:, 0] >= 0) and torch.all(boxes[:, 0] + side <= sizes[:, 0] + 1e-6)
    assert torch.all(boxes[:, 1] >= 0) and torch.all(boxes[:, 1] + side <= sizes[:, 1] + 1e-6)
    assert side.std() > 1  # the scale really varies


def test_rrc_boxes_respect_scale_and_ratio() -> None:
    gen = torch.Generator().manual_seed(1)
    sizes = torch.tensor([[375, 500]] * 200)
    b = rrc_boxes(sizes, gen)
    area = b[:, 2] * b[:, 3] / (375 * 500)
    ratio = b[:, 3] / b[:, 2]
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert torch.all(b[:, 0] + b[:, 2] <= 375) and torch.all(b[:, 1] + b[:, 3] <= 500)
    # a 1:10 strip cannot host any allowed ratio at large scale often; the fallback stays inside
    strip = rrc_boxes(torch.tensor([[10, 100]] * 20), gen, scale=(0.9, 1.0))
    assert torch.all(strip[:, 2] <= 10) and torch.all(strip[:, 3] <= 100)


def test_device_augment_batch() -> None:
    aug = DeviceAugment(
        "paper", out=32, mean=(128.0, 128.0, 128.0), std=(64.0, 64.0, 64.0), scale_range=(36, 48)
    )
    imgs = [
        torch.full((3, 40, 50), 192, dtype=torch.uint8),
        torch.full((3, 60, 44), 64, dtype=torch.uint8),
    ]
    x = aug(imgs, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0], torch.full_like(x[0], 1.0))  # (192-128)/64
    torch.testing.assert_close(x[1], torch.full_like(x[1], -1.0))
    with pytest.raises(ValueError, match="choose 'paper' or 'rrc'"):
        DeviceAugment("cifar", 32, (0, 0, 0), (1, 1, 1))


def _jpeg(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def test_cutting_to_boxes_changes_no_pixel_of_the_output() -> None:
    """Cut-then-pad gives what pad-whole-images gave, for boxes anywhere (edges included)."""
    gen = torch.Generator().manual_seed(2)
    imgs = [
        torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        for h, w in [(60, 80), (90, 50), (41, 41)]
    ]
    batch, sizes = pad_batch(imgs)
    for seed in range(5):
        boxes = paper_boxes(sizes, 24, (28, 40), torch.Generator().manual_seed(seed))
        flips = torch.tensor([False, True, seed % 2 == 0])
        cuts, moved = cut_to_boxes(imgs, boxes)
        for cut, img in zip(
            cuts, imgs, strict=True
        ):  # box side 24 * shorter / s, s >= 28; +margins
            assert max(cut.shape[-2:]) <= 24 * min(img.shape[-2:]) / 28 + 3
        whole = crop_resize(batch, boxes, 24, flips)
        cut = crop_resize(pad_batch(cuts)[0], moved, 24, flips)
        torch.testing.assert_close(cut, whole, atol=5e-3, rtol=0)  # float32 grid rounding on 0-255


def test_big_images_are_shrunk_and_cut_before_padding() -> None:
    """A 3000x2000 photo beside a small portrait one: the padded batch stays box-sized."""
    aug = DeviceAugment(
        "paper", out=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale_range=(36, 48)
    )
    big = torch.full((3, 2000, 3000), 200, dtype=torch.uint8)
    small = torch.full((3, 60, 40), 50, dtype=torch.uint8)
    assert shrink_to(big, 48).shape == (3, 48, 72) and shrink_to(small, 48) is small
    assert int(shrink_to(big, 48).float().mean().round()) == 200
    batch, _, _ = aug.prepare([big, small], torch.Generator().manual_seed(0))
    assert batch.shape[-2] <= 32 * 48 / 36 + 3 and batch.shape[-1] <= 32 * 48 / 36 + 3
    x = aug([big, small], torch.Generator().manual_seed(0))
    torch.testing.assert_close(x[0], torch.full_like(x[0], 200.0))
    torch.testing.assert_close(x[1], torch.full_like(x[1], 50.0))


def test_decode_on_cpu_device_and_without_torchvision_on_gpu() -> None:
    # a CPU device decodes on the host (the decode=gpu/split plumbing runs without a GPU)
    (img,) = decode_jpegs([_jpeg(20, 10)], "cpu")
    assert (
        img.shape == (3, 10, 20) and img.dtype == torch.uint8 and int(img[0].float().mean()) > 250
    )
    # damaged past the header: None and a warning (the loop replaces and counts it)
    assert decode_jpegs([_jpeg(20, 10)[:40]], "cpu") == [None]
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision does not import beside this CPU torch
        with pytest.raises(RuntimeError, match=r"pip install -e \.\[gpu\].*data.decode=cpu"):
            decode_jpegs([_jpeg(20, 10)], "cuda")


def _shard_labels(root) -> dict[bytes, int]:
    """JPEG file -> label, read straight from the tar shards (no loader involved)."""
    import tarfile

    files: dict[str, dict[str, bytes]] = {}
    for shard in sorted(root.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {f["jpg"]: int(f["cls"]) for f in files.values()}


def test_gpu_decode_batches_carry_every_jpeg_with_its_label(odd_local_shards) -> None:
    """decode=gpu: each batch is a MixedBatch of JPEG files only; every training sample comes
    through once per epoch, whole, next to its own label."""
    from orchestrator.data import DataConfig, MixedBatch, TrainLoader

    truth = _shard_labels(odd_local_shards)
    cfg = DataConfig(
        url=str(odd_local_shards),
        decode="gpu",
        train_transform="rrc",
        image_size=32,
        scale_range=(36, 48),
        num_workers=1,
        shuffle_buffer=8,
    )
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=8, seed=0)
    seen = []
    for batch, labels in loader:
        assert (
            isinstance(batch, MixedBatch) and len(batch.pixels) == 0 and len(batch) == len(labels)
        )
        for jpeg, label in zip(batch.jpegs(), labels.tolist(), strict=True):
            assert truth[jpeg.numpy().tobytes()] == label
            seen.append(jpeg.numpy().tobytes())
    assert len(seen) == len(set(seen)) == loader.num_samples == len(truth) == 48


def test_split_batches_are_the_cpu_batches_cut_in_two(odd_local_shards) -> None:
    """decode=split at share s: the first round(s*B) samples are exactly decode=cpu's pixels,
    the rest the JPEG files of decode=cpu's other samples; labels in the same order. A new
    share reaches the running workers."""
    from orchestrator.data import DataConfig, TrainLoader

    truth = _shard_labels(odd_local_shards)
    common = {
        "url": str(odd_local_shards),
        "train_transform": "rrc",
        "image_size": 32,
        "scale_range": (36, 48),
        "num_workers": 1,
        "shuffle_buffer": 8,
        "prefetch_factor": 1,
    }
    cpu = list(TrainLoader(DataConfig(**common), rank=0, world_size=1, batch_size=8, seed=3))
    split = TrainLoader(
        DataConfig(**common, decode="split", split_cpu_share=0.5),
        rank=0,
        world_size=1,
        batch_size=8,
        seed=3,
    )
    shares = []
    for i, ((batch, labels), (images, cpu_labels)) in enumerate(zip(split, cpu, strict=True)):
        k = len(batch.pixels)
        shares.append(k / len(labels))
        assert torch.equal(labels, cpu_labels) and len(batch) == len(images)
        assert torch.equal(batch.pixels, images[:k])
        assert [truth[j.numpy().tobytes()] for j in batch.jpegs()] == cpu_labels[k:].tolist()
        if i == 0:
            split.cpu_share = 0.0  # batches already queued keep 0.5; later ones have none decoded
    assert shares[0] == 0.5 and shares[-1] == 0.0
    whole = TrainLoader(
        DataConfig(**common, decode="split", split_cpu_share=1.0),
        rank=0,
        world_size=1,
        batch_size=8,
        seed=3,
    )
    batch, labels = next(iter(whole))
    assert len(batch.pixels) == len(labels) == 8 and batch.jpegs() == []  # all decoded by workers


def test_split_balancer_moves_work_to_whichever_side_has_room() -> None:
    from orchestrator.data import DataConfig, SplitBalancer, TrainLoader

    # the synthetic source: a real loader (its share clamps to 0..1) without reading any data
    cfg = DataConfig(num_workers=1, prefetch_factor=2, split_cpu_share=0.5)
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=8, seed=0)
    balancer = SplitBalancer(loader)
    assert balancer.window == 10  # 2 x the 2 batches the loader keeps queued, at least 10
    for _ in range(9):
        balancer.observe(0.5)  # the loop waits for data: the workers are short
    assert loader.cpu_share == 0.5  # judged only per window
    balancer.observe(0.5)
    # waited all of the window (the waits outweigh the time that passed: counted as 100%):
    # the share drops by share x 100%, to 0
    assert loader.cpu_share == 0.0
    for _ in range(30):
        balancer.observe(0.0)  # no waiting: the workers have room for more, a step per window
    assert loader.cpu_share == pytest.approx(3 * 0.05)
    balancer.new_epoch()  # fresh workers: their start-up wait says nothing about the share
    for _ in range(10):
        balancer.observe(5.0)
    assert loader.cpu_share == pytest.approx(3 * 0.05)
    for _ in range(10):
        balancer.observe(5.0)
    assert loader.cpu_share == 0.0


def test_gpu_decode_rejects_cifar_transform() -> None:
    from orchestrator.data import DataConfig

    with pytest.raises(ValueError, match="decode=gpu does the paper and rrc transforms"):
        DataConfig(
            url="x", decode="gpu", train_transform="cifar", image_size=32, scale_range=(32, 32)
        )
    with pytest.raises(
        ValueError, match=r"data.split_cpu_share=1.5 is out of range: set it between 0 and 1"
    ):
        DataConfig(url="x", decode="split", split_cpu_share=1.5)


def _damaged_shards(root) -> tuple[str, str]:
    """24 good JPEGs, one cut short (no end marker) and one whose header is whole and whose
    scan is missing (it passes the workers' checks; no decoder reads it), as indexed shards.
    Returns the two damaged samples' keys."""
    import io

    import numpy as np
    from PIL import Image

    members, rng = [], np.random.default_rng(0)
    for i in range(26):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()
        if i == 5:
            data = data[: len(data) // 2]
        if i == 17:
            data = data[: data.index(b"\xff\xda")] + b"\xff\xd9"
        members += [(f"s{i:02d}.jpg", data), (f"s{i:02d}.cls", str(i % 2).encode())]
    write_tar(root / "train-000000.tar", members)
    (root / "val-000000.tar").write_bytes((root / "train-000000.tar").read_bytes())
    run_script("datasets/index_shards.py", str(root), "--check", "header")
    return "s05", "s17"


def test_gpu_decode_replaces_and_counts_damaged_jpegs(tmp_path) -> None:
    """decode=gpu, a CPU standing in for the device: a cut-short JPEG is caught by the
    workers' end-marker check, one that only fails to decode by the device step; both are
    replaced within their batch and counted with the loader's bad samples."""
    from orchestrator.data import MixedBatch, TrainLoader

    _damaged_shards(tmp_path / "d")
    cfg = odd_shards_config(tmp_path / "d", decode="gpu", shuffle_buffer=8, bad_check_after=1000)
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=8, seed=0)
    sizes = []
    for batch, labels in loader:
        assert isinstance(batch, MixedBatch)
        images, kept, bad = replace_undecodable(decode_jpegs(batch.jpegs(), "cpu"), labels)
        if bad:
            loader.count_bad(bad, "device")
            assert all(img is not None for img in images) and len(images) == len(labels)
            assert set(kept.tolist()) <= set(labels.tolist())
        sizes.append(len(images))
    assert loader.stats()["bad_samples"] == 2
    assert sum(sizes) == 26 and len(sizes) == 4  # every batch full: bad ones replaced

    # the loop: trains through both, and says what it replaced
    out = run_script(
        "jobs/smoke.py",
        "--local",
        "name=damaged",
        f"checkpoint.storage={tmp_path / 'ckpt'}",
        "model.name=cifar_resnet20",
        "model.num_classes=2",
        *odd_shards_data(tmp_path / "d"),
        "data.decode=gpu",
        "data.bad_check_after=1000",
        "scaling.global_batch=8",
        "schedule.max_iters=4",
        "tracking.enabled=false",
        "eval.every_iters=0",
        "eval.at_end=false",
        "checkpoint.every_iters=4",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert "JPEG without its end marker" in out and "undecodable JPEG body" in out


def test_replace_undecodable_keeps_the_batch_size_and_labels_aligned() -> None:
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    images, labels, bad = replace_undecodable([None, a, None, b], torch.tensor([7, 1, 8, 2]))
    assert bad == 2 and labels.tolist() == [1, 1, 2, 2]
    assert images[0] is a and images[2] is b
    assert replace_undecodable([None], torch.tensor([3]))[1].numel() == 0
