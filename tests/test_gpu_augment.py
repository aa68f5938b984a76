"""The GPU augmentation maths, on CPU tensors: boxes, batched crop-resize, flips, fallbacks."""

from __future__ import annotations

import pytest
import torch

from orchestrator.gpu_augment import (
    DeviceAugment,
    crop_resize,
    decode_jpegs,
    pad_batch,
    paper_boxes,
    rrc_boxes,
)


def _image(h: int, w: int) -> torch.Tensor:
    return torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w) % 251


def test_whole_image_box_is_identity() -> None:
    img = _image(16, 16)
    out = crop_resize(img[None], torch.tensor([[16, 16]]), torch.tensor([[0.0, 0, 16, 16]]), 16, torch.tensor([False]))
    torch.testing.assert_close(out[0], img)


def test_aligned_box_equals_slicing_and_flip_mirrors() -> None:
    imgs = [_image(10, 12), _image(8, 9)]
    batch, sizes = pad_batch(imgs)
    assert batch.shape == (2, 3, 10, 12) and sizes.tolist() == [[10, 12], [8, 9]]
    boxes = torch.tensor([[2.0, 3, 4, 4], [1.0, 5, 4, 4]])
    out = crop_resize(batch, sizes, boxes, 4, torch.tensor([False, True]))
    torch.testing.assert_close(out[0], imgs[0][:, 2:6, 3:7])
    torch.testing.assert_close(out[1], imgs[1][:, 1:5, 5:9].flip(-1))


def test_paper_boxes_follow_scale_augmentation() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[375, 500], [500, 333], [256, 256]] * 50)
    boxes = paper_boxes(sizes, 224, (256, 480), gen)
    short = sizes.min(1).values.double()
    side = boxes[:, 2]
    assert torch.all(side >= 224 * short / 480 - 1e-6) and torch.all(side <= 224 * short / 256 + 1e-6)
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
    aug = DeviceAugment("paper", out=32, mean=(128.0, 128.0, 128.0), std=(64.0, 64.0, 64.0), scale_range=(36, 48))
    imgs = [torch.full((3, 40, 50), 192, dtype=torch.uint8), torch.full((3, 60, 44), 64, dtype=torch.uint8)]
    x = aug(imgs, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0], torch.full_like(x[0], 1.0))  # (192-128)/64
    torch.testing.assert_close(x[1], torch.full_like(x[1], -1.0))
    with pytest.raises(ValueError, match="choose 'paper' or 'rrc'"):
        DeviceAugment("cifar", 32, (0, 0, 0), (1, 1, 1))


def test_decode_without_torchvision_says_how_to_fix() -> None:
    try:
        import torchvision.io  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match=r"pip install -e \.\[gpu\].*data.decode=cpu"):
            decode_jpegs([b"\xff\xd8"], "cpu")
    else:  # where torchvision works, CPU decode of a real JPEG must work too
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (20, 10), (255, 0, 0)).save(buf, format="JPEG")
        (img,) = decode_jpegs([buf.getvalue()], "cpu")
        assert img.shape == (3, 10, 20)


def test_loader_ships_checked_jpeg_bytes_for_gpu_decode(odd_local_shards) -> None:
    """decode=gpu: workers send length-prefixed JPEG rows; they unpack to the shard's files."""
    import io

    from PIL import Image

    from orchestrator.data import DataConfig, TrainLoader, jpeg_rows

    cfg = DataConfig(url=str(odd_local_shards), decode="gpu", train_transform="rrc", image_size=32,
                     scale_range=(36, 48), num_workers=1, shuffle_buffer=8)  # fmt: skip
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=8, seed=0)
    seen = 0
    for rows, labels in loader:
        assert rows.dtype == torch.uint8 and rows.dim() == 2 and len(labels) == rows.shape[0]
        for jpeg in jpeg_rows(rows):
            with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as img:
                assert img.format == "JPEG" and img.size == (64, 48)
                img.load()  # the whole file came through, not just its header
            seen += 1
    assert seen == loader.num_samples == 48


def test_gpu_decode_rejects_cifar_transform() -> None:
    from orchestrator.data import DataConfig

    with pytest.raises(ValueError, match="decode=gpu does the paper and rrc transforms"):
        DataConfig(url="x", decode="gpu", train_transform="cifar", image_size=32, scale_range=(32, 32))
