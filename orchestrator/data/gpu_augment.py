"""Batched augmentation on the training device, for JPEGs decoded there (nvJPEG).

A Python loop that crops and resizes one image at a time costs the GPU more than the decode
itself: on one H200, nvJPEG decodes ~21,000 img/s in batches of 64, but ~10,400 img/s once a
per-sample crop loop follows it (docs/performance-anchors.md). Here every step is one batched
call: the decoded images are padded into one tensor, each sample's crop box is drawn on the
host (tiny), and a single `grid_sample` resamples every crop to the output size, flips
included; normalisation follows in the same pass.

    augment = DeviceAugment("paper", out=224, scale_range=(256, 480), mean=..., std=...)
    x = augment(decode_jpegs(jpeg_bytes, device), generator)   # [N,3,224,224] channels_last

The crop boxes reproduce the CPU transforms (orchestrator.data.transforms): "paper" (shorter
side to s ~ U[lo, hi], then a random out x out crop, flip) and "rrc" (RandomResizedCrop scale
0.08-1, ratio 3/4-4/3, 10 tries then a centre crop, flip). Only `decode_jpegs` on a GPU needs
torchvision; the rest is plain torch, so the maths is tested on CPU tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Boxes = torch.Tensor  # [N, 4] float: y0, x0, height, width in source pixels


def paper_boxes(
    sizes: torch.Tensor, out: int, scale_range: tuple[int, int], gen: torch.Generator
) -> Boxes:
    """Scale augmentation: resize the shorter side to s ~ U[lo, hi], crop out x out at random.

    In source pixels the crop is out * short / s on a side, anywhere inside the image."""
    n = sizes.shape[0]
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    lo, hi = scale_range
    s = torch.randint(lo, hi + 1, (n,), generator=gen).double()
    side = out * torch.minimum(h, w) / s
    y0 = torch.rand(n, generator=gen, dtype=torch.float64) * (h - side).clamp(min=0)
    x0 = torch.rand(n, generator=gen, dtype=torch.float64) * (w - side).clamp(min=0)
    return torch.stack([y0, x0, side, side], dim=1)


def rrc_boxes(
    sizes: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> Boxes:
    """RandomResizedCrop's boxes, all samples and all tries at once."""
    n = sizes.shape[0]
    h, w = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = h * w * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=gen)
    log_r = torch.empty(n, tries, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=gen
    )
    r = torch.exp(log_r)
    cw, ch = torch.sqrt(area * r).round(), torch.sqrt(area / r).round()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick_h, pick_w = ch[rows, first.clamp(min=0)], cw[rows, first.clamp(min=0)]
    # fallback (no try fits): the centre crop at the nearest allowed ratio, as torchvision does
    in_ratio = (w / h).squeeze(1)
    fb_w = torch.where(
        in_ratio < ratio[0],
        w.squeeze(1),
        torch.where(in_ratio > ratio[1], (h.squeeze(1) * ratio[1]).round(), w.squeeze(1)),
    )
    fb_h = torch.where(in_ratio < ratio[0], (w.squeeze(1) / ratio[0]).round(), h.squeeze(1))
    valid = first >= 0
    bh, bw = torch.where(valid, pick_h, fb_h), torch.where(valid, pick_w, fb_w)
    y0 = torch.where(
        valid,
        torch.rand(n, generator=gen, dtype=torch.float64) * (h.squeeze(1) - bh + 1).floor(),
        (h.squeeze(1) - bh) / 2,
    )
    x0 = torch.where(
        valid,
        torch.rand(n, generator=gen, dtype=torch.float64) * (w.squeeze(1) - bw + 1).floor(),
        (w.squeeze(1) - bw) / 2,
    )
    return torch.stack([y0.floor(), x0.floor(), bh, bw], dim=1)


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-size CHW images -> one zero-padded [N,C,Hmax,Wmax] tensor and their sizes."""
    sizes = torch.tensor([img.shape[-2:] for img in images])
    hmax, wmax = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    batch = images[0].new_zeros((len(images), images[0].shape[0], hmax, wmax))
    for i, img in enumerate(images):  # copies only; the maths below is batched
        batch[i, :, : img.shape[-2], : img.shape[-1]] = img
    return batch, sizes


def shrink_to(image: torch.Tensor, cap: int) -> torch.Tensor:
    """A CHW uint8 image with its shorter side reduced to `cap` (antialiased), if larger."""
    h, w = image.shape[-2:]
    if min(h, w) <= cap:
        return image
    size = (cap, max(1, int(cap * w / h))) if h <= w else (max(1, int(cap * h / w)), cap)
    small = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0]
    return small.round_().clamp_(0, 255).to(torch.uint8)


def cut_to_boxes(images: Sequence[torch.Tensor], boxes: Boxes) -> tuple[list[torch.Tensor], Boxes]:
    """Each image cut (a view, no copy) to the pixels its box samples, one pixel of margin for
    the bilinear neighbours; the boxes moved into the cut images' coordinates. Host-side
    arithmetic only: nothing here waits for the GPU."""
    cuts, moved = [], boxes.clone()
    for i, (image, (y0, x0, bh, bw)) in enumerate(zip(images, boxes.tolist(), strict=True)):
        h, w = image.shape[-2:]
        top, left = max(0, math.floor(y0) - 1), max(0, math.floor(x0) - 1)
        bottom, right = min(h, math.ceil(y0 + bh) + 1), min(w, math.ceil(x0 + bw) + 1)
        cuts.append(image[:, top:bottom, left:right])
        moved[i, 0] -= top
        moved[i, 1] -= left
    return cuts, moved


def crop_resize(batch: torch.Tensor, boxes: Boxes, out: int, flips: torch.Tensor) -> torch.Tensor:
    """Resample every sample's box to out x out (bilinear) in one grid_sample call.

    `batch` is padded to [N,C,Hmax,Wmax]; boxes (on the host) are in each image's own pixels.
    A flip mirrors the sampling grid, which is the same as flipping the crop."""
    n, _, hmax, wmax = batch.shape
    dev = batch.device
    # decided on the host copy: reading a device value would stall the CPU until the GPU
    # caught up, every step (no host syncs in the hot path)
    pool = float((torch.minimum(boxes[:, 2], boxes[:, 3]) / out).min()) >= 2
    y0, x0, bh, bw = boxes.to(dev, torch.float32, non_blocking=True).unbind(1)
    # pixel-centre coordinates of the output grid inside each box, then to [-1, 1] of the pad
    t = (torch.arange(out, device=dev, dtype=torch.float32) + 0.5) / out
    ys = y0[:, None] + t[None, :] * bh[:, None]  # [N, out]
    xs = x0[:, None] + t[None, :] * bw[:, None]
    xs = torch.where(
        flips.to(dev, non_blocking=True)[:, None], (x0 + bw)[:, None] - (xs - x0[:, None]), xs
    )
    gy = ys / hmax * 2 - 1
    gx = xs / wmax * 2 - 1
    grid = torch.stack(
        [gx[:, None, :].expand(n, out, out), gy[:, :, None].expand(n, out, out)], dim=-1
    )
    x = batch.float() if not batch.is_floating_point() else batch
    # where the box is much larger than the output, average 2x2 first so bilinear does not alias
    if pool and hmax % 2 == 0 and wmax % 2 == 0:
        x = F.avg_pool2d(x, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class DeviceAugment:
    """uint8 images (list of CHW, any sizes, on the device) -> augmented, normalised batch."""

    def __init__(
        self,
        kind: str,
        out: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: tuple[int, int] = (256, 480),
        device: torch.device | str = "cpu",
    ) -> None:
        if kind not in ("paper", "rrc"):
            raise ValueError(f"GPU augmentation {kind!r}: choose 'paper' or 'rrc'")
        self.kind, self.out, self.scale_range = kind, out, scale_range
        # the most resolution a crop can use: paper, a shorter side of s <= scale_range[1];
        # rrc, an 8%-area box still >= out pixels wide (out / sqrt(0.08))
        self.cap = scale_range[1] if kind == "paper" else math.ceil(out / math.sqrt(0.08))
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.inv_std = 1 / torch.tensor(std, device=device).view(1, 3, 1, 1)

    def boxes(self, sizes: torch.Tensor, gen: torch.Generator) -> tuple[Boxes, torch.Tensor]:
        if self.kind == "paper":
            boxes = paper_boxes(sizes, self.out, self.scale_range, gen)
        else:
            boxes = rrc_boxes(sizes, gen)
        flips = torch.rand(sizes.shape[0], generator=gen) < 0.5
        return boxes, flips

    def prepare(
        self, images: Sequence[torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, Boxes, torch.Tensor]:
        """Draw the boxes, then pad only what they sample: (batch [N,C,h,w], boxes in batch
        pixels, flips). Padding whole images would size the batch by the tallest and the widest
        image at once: one 4000x3000 ImageNet photo next to a portrait one makes 256 x 3 x
        4000 x 4000 floats. So images larger than the transform can use are shrunk first
        (shorter side to `self.cap`), and each is cut to its box before padding."""
        images = [shrink_to(img, self.cap) for img in images]
        sizes = torch.tensor([img.shape[-2:] for img in images])
        boxes, flips = self.boxes(sizes, gen)
        crops, boxes = cut_to_boxes(images, boxes)
        batch, _ = pad_batch(crops)
        return batch, boxes, flips

    def __call__(self, images: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        batch, boxes, flips = self.prepare(images, gen)
        x = crop_resize(batch, boxes, self.out, flips)
        x = (x - self.mean.to(x.device)) * self.inv_std.to(x.device)
        return x.contiguous(memory_format=torch.channels_last)


def decode_jpegs(
    jpegs: Sequence[bytes | torch.Tensor], device: torch.device | str
) -> list[torch.Tensor | None]:
    """Decode a batch of JPEGs to uint8 CHW tensors on `device`: with nvJPEG on a GPU
    (torchvision, the `gpu` extra); on a CPU device, with the loader's own host decoder, so
    the decode=gpu/split paths also run (and are tested) where there is no GPU. None for a
    file no decoder can read (see `replace_undecodable`)."""
    blobs = [
        j if isinstance(j, torch.Tensor) else torch.frombuffer(bytearray(j), dtype=torch.uint8)
        for j in jpegs
    ]
    if torch.device(device).type == "cpu":
        return [_host_decode(b) for b in blobs]
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as err:  # noqa: BLE001 - any import failure means the same thing here
        raise RuntimeError(
            "data.decode=gpu/split need torchvision with nvJPEG: `pip install -e .[gpu]`, "
            f"or set data.decode=cpu ({type(err).__name__}: {err})"
        ) from None
    try:
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one file nvJPEG refuses (ImageNet holds a few CMYK JPEGs) fails all
        out = []
        for blob in blobs:
            try:
                out.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                _FALLBACKS.count(err)
                img = _host_decode(blob)
                # pinned, so the copy is queued and the host goes on (no blocking copy)
                out.append(None if img is None else img.pin_memory().to(device, non_blocking=True))
        return out


class _FallbackCount:
    """Images nvJPEG refused and the host decoded: the first one logged (with the fix), all of
    them counted, as the loop's `system/nvjpeg_fallback_images`."""

    def __init__(self) -> None:
        self.images = 0

    def count(self, err: Exception) -> None:
        if not self.images:
            log.warning(
                "nvJPEG refused a JPEG (%s): it and any later one are decoded on the host, one "
                "image at a time (counted as system/nvjpeg_fallback_images). A few CMYK or "
                "progressive files are normal; if the count grows with every batch, re-encode "
                "the dataset (datasets/imagenet.py converts such files) or set data.decode=cpu",
                err,
            )
        self.images += 1


_FALLBACKS = _FallbackCount()


def nvjpeg_fallbacks() -> int:
    """How many images nvJPEG refused in this process so far (each decoded on the host)."""
    return _FALLBACKS.images


def _host_decode(blob: torch.Tensor) -> torch.Tensor | None:
    """libjpeg-turbo or Pillow on the host (CMYK and other JPEGs nvJPEG refuses included);
    None, with a warning, for a file no decoder can read. The loader's workers already checked
    its header and its end marker, so this is a body damaged inside, rarer still."""
    from orchestrator.data.transforms import decode

    try:
        pixels, _ = decode(bytes(blob.numpy()))
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for damaged data
        log.warning(
            "undecodable JPEG body (%d bytes) in a decode=gpu/split batch: %s", len(blob), err
        )
        return None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def replace_undecodable(
    images: Sequence[torch.Tensor | None], labels: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """(images, labels, how many were replaced): each undecodable image (None) replaced by a
    decodable one of the same batch, with its label, so the batch keeps its size, as the
    loader's workers replace the bad samples they find. Empty when none decoded."""
    good = [i for i, img in enumerate(images) if img is not None]
    bad = len(images) - len(good)
    if not bad:
        return list(images), labels, 0  # type: ignore[arg-type]  # no None among them
    if not good:
        return [], labels[:0], bad
    source, replaced = [], 0
    for i, img in enumerate(images):  # the k-th bad image takes the k-th good one (cycling)
        source.append(i if img is not None else good[replaced % len(good)])
        replaced += img is None
    picked = torch.tensor(source, device=labels.device)
    return [images[i] for i in source], labels[picked], bad  # type: ignore[misc]
