"""Image decode and augmentation on the CPU: encoded bytes in, uint8 CHW numpy arrays out.

Every random choice comes from a `numpy.random.Generator` the caller passes in, so a sample's
augmentation is a pure function of (bytes, generator seed): the data pipeline seeds that
generator from (seed, epoch, sample) and gets the same pixels back after a resume.

Speed matters here (one core decodes only a few hundred ImageNet JPEGs a second), so:
- geometry is *planned* first, from the image header alone (`Plan`: a box in original pixels,
  an output size, a flip), before any pixel is decoded;
- JPEGs are decoded by libjpeg-turbo, downscaled inside the DCT by 1/2, 1/4 or 1/8 where the
  plan allows it (never below the resolution the output needs: `_min_full_size`), and only the
  plan's box: `_jpeg_region` (our one C module, optional) skips the rows and columns outside
  it, about a quarter of a paper transform's CPU. Without it, simplejpeg decodes the whole
  image (about 1.4x faster than Pillow's decoder here) and the box is cut out afterwards: the
  same pixels. Pillow decodes everything else (PNG, CMYK JPEGs) and is the last fallback;
- the crop and the resize are one antialiased bilinear resample of the box only, by torch's
  uint8 kernel (the same filter as Pillow's BILINEAR, about 3x faster than Pillow's here).
  Training boxes are snapped to whole decoded pixels (at most half a pixel per edge: a
  sub-pixel shift no augmentation cares about); evaluation views resize the whole image and
  then crop, exactly as torchvision does.

No torchvision: the training worker must import without it. The maths follows torchvision
(Resize with an int, CenterCrop, RandomResizedCrop, TenCrop) so numbers match what people
expect, with one documented choice: in `ten_crop`, views 5..9 are the horizontal flips of
views 0..4 (torchvision takes the five crops of the flipped image instead; the set of ten
views is the same, only the order differs).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # libjpeg-turbo without Pillow's overhead; Pillow below is the fallback
    import simplejpeg
except ImportError:  # pragma: no cover - a core dependency, missing only on bare machines
    simplejpeg = None

try:  # built at install where libjpeg's headers exist (setup.py); optional, like simplejpeg
    from orchestrator import _jpeg_region  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - tests force the fallback (test_data's `decoder`)
    _jpeg_region = None

# Columns and rows decoded beyond the box on each side: libjpeg's chroma upsampling reads one
# neighbour in each direction, so without a margin the box's edge pixels would come out a few
# levels off the full decode's. Two pixels (one chroma sample at 4:2:0) make them identical.
_REGION_MARGIN = 2

# Pillow would otherwise refuse ~90-megapixel images as "decompression bombs"; ImageNet's
# largest are far below that, but a hostile shard should fail as a bad sample, not hang a
# worker on a 1-gigapixel decode. libjpeg-turbo's paths check the same limit (`_not_a_bomb`).
Image.MAX_IMAGE_PIXELS = 200_000_000

_JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class Plan:
    """What to cut out of an image: `box` (left, top, right, bottom) in the original image's
    pixel coordinates (floats allowed), resampled to `size` (width, height), then optionally
    mirrored left-right."""

    box: tuple[float, float, float, float]
    size: tuple[int, int]
    flip: bool = False


# --------------------------------------------------------------------------------------------
# decoding


def _min_full_size(w: int, h: int, plan: Plan) -> tuple[int, int]:
    """Smallest full-image size at which `plan.box` still has >= `plan.size` pixels."""
    bw = max(plan.box[2] - plan.box[0], 1e-6)
    bh = max(plan.box[3] - plan.box[1], 1e-6)
    scale = max(plan.size[0] / bw, plan.size[1] / bh)
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def cpu_decoder() -> str:
    """Which decoder this machine's CPU JPEG decodes use (benchmarks print it)."""
    if _jpeg_region is not None:
        return "partial (orchestrator._jpeg_region, libjpeg-turbo)"
    return "whole images (simplejpeg)" if simplejpeg is not None else "whole images (Pillow)"


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; no pixel is decoded."""
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return w, h
        except ValueError:
            pass  # let Pillow judge it (and raise its own error if it is corrupt)
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _not_a_bomb(w: int, h: int) -> None:
    """Refuse a header that claims more pixels than Pillow's limit, before any decode."""
    limit = Image.MAX_IMAGE_PIXELS  # None: the user turned Pillow's check off
    if limit is not None and w * h > limit:
        raise ValueError(
            f"{w}x{h} image: over {Image.MAX_IMAGE_PIXELS} pixels (decompression bomb?)"
        )


def _dct_reduction(w: int, h: int, need: tuple[int, int] | None) -> int:
    """The largest k in (8, 4, 2, 1) whose 1/k decode keeps both sides >= need. Only powers
    of two: libjpeg-turbo's other factors (7/8, 3/4 ...) decode slower than full size."""
    if need is None:
        return 1
    fits = (k for k in (8, 4, 2) if -(-w // k) >= need[0] and -(-h // k) >= need[1])
    return next(fits, 1)  # 1: the output needs every pixel (or more: an upscale)


def decode(data: bytes, need: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """Decode to RGB uint8 [H, W, 3], at least `need` (width, height) large where that allows
    a cheaper DCT-domain downscale; None = full resolution.

    Returns (array, factor): factor = decoded width / original width (1, 1/2, 1/4 or 1/8),
    to map original-pixel coordinates onto the decoded array.
    """
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            _not_a_bomb(w, h)  # a ValueError: Pillow's header read below refuses it again
            k = _dct_reduction(w, h, need)
            arr = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_width=-(-w // k), min_height=-(-h // k)
            )
            return arr, arr.shape[1] / w
        except ValueError:
            pass  # CMYK, progressive oddities, corrupt data: Pillow decides below
    im: Image.Image = Image.open(io.BytesIO(data))
    _not_a_bomb(*im.size)  # Pillow itself only warns below twice its limit
    w = im.size[0]
    factor = 1.0
    if need is not None and im.format == "JPEG":
        # draft() picks the largest 1/2^k reduction that keeps both sides >= need; the box it
        # returns tells which part of the reduced image maps to the original frame.
        res = im.draft("RGB", need)
        if res is not None:
            factor = res[1][2] / w
    if im.mode != "RGB":
        im = im.convert("RGB")  # grey, CMYK, palette, RGBA (alpha dropped)
    return np.array(im), factor  # a writable copy: torch.from_numpy wants one


def resample(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, size[1], size[0]] uint8, antialiased bilinear (Pillow's BILINEAR
    filter, widened when shrinking). The result is a CHW view of HWC memory."""
    if pixels.shape[1] == size[0] and pixels.shape[0] == size[1]:
        return pixels.transpose(2, 0, 1)
    # NCHW with channels-last strides: torch's vectorised uint8 path, no float round trip
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True)
    return out[0].numpy()


def _snap(
    box: tuple[float, float, float, float], factor: float, cols: int, rows: int
) -> tuple[int, int, int, int]:
    """`box` in original pixels -> whole pixels of an image decoded at `factor` (cols x rows),
    clamped inside it and at least one pixel wide and high."""
    left, top, right, bottom = (round(c * factor) for c in box)
    left, top = min(max(left, 0), cols - 1), min(max(top, 0), rows - 1)
    return left, top, min(max(right, left + 1), cols), min(max(bottom, top + 1), rows)


def _decode_region(
    data: bytes, k: int, box: tuple[int, int, int, int], cols: int, rows: int
) -> np.ndarray:
    """Exactly `box` (whole pixels of the image decoded at 1/k, cols x rows) as [H, W, 3] uint8,
    decoding only the rows and columns it needs (plus `_REGION_MARGIN`). ValueError where
    libjpeg refuses the data (corrupt, CMYK): the caller then decodes the whole image."""
    left, top, right, bottom = box
    m = _REGION_MARGIN
    lo_x, lo_y = max(left - m, 0), max(top - m, 0)
    buf, x0, width = _jpeg_region.decode_region(
        data, k, lo_x, lo_y, min(right + m, cols), min(bottom + m, rows)
    )
    pixels = np.frombuffer(buf, np.uint8).reshape(-1, width, 3)  # a writable view of buf
    return pixels[top - lo_y : bottom - lo_y, left - x0 : right - x0]


def decode_box(data: bytes, plan: Plan, w: int, h: int) -> np.ndarray:
    """The pixels of `plan.box` (snapped to whole decoded pixels), decoded just large enough
    for `plan.size`: [H, W, 3] uint8. `w`, `h`: the original image's size (from its header)."""
    need = _min_full_size(w, h, plan)
    _not_a_bomb(w, h)
    if _jpeg_region is not None and data[:2] == _JPEG_MAGIC:
        k = _dct_reduction(w, h, need)
        cols, rows = -(-w // k), -(-h // k)  # libjpeg's size at 1/k, as simplejpeg's below
        box = _snap(plan.box, cols / w, cols, rows)
        try:
            return _decode_region(data, k, box, cols, rows)
        except ValueError:
            pass  # decode() below decides: simplejpeg, then Pillow (which also judges damage)
    pixels, f = decode(data, need)
    left, top, right, bottom = _snap(plan.box, f, pixels.shape[1], pixels.shape[0])
    return pixels[top:bottom, left:right]


def render(data: bytes, plan: Plan, *, original: tuple[int, int] | None = None) -> np.ndarray:
    """Decode the part of `data` that `plan` needs, just large enough, and resample the box:
    uint8 [3, H, W]. `original`: the image's (width, height), if the caller already read the
    header."""
    w, h = original or image_size(data)
    out = resample(decode_box(data, plan, w, h), plan.size)
    return out[:, :, ::-1] if plan.flip else out


def resized_shape(w: int, h: int, shorter: int) -> tuple[int, int]:
    """torchvision Resize(int) semantics: the shorter side becomes `shorter`, the longer side
    keeps the aspect ratio (truncated). Returns (width, height)."""
    if w <= h:
        return shorter, int(shorter * h / w)
    return int(shorter * w / h), shorter


# --------------------------------------------------------------------------------------------
# planning (pure geometry, unit-testable without images)


def plan_paper(
    w: int,
    h: int,
    rng: np.random.Generator,
    *,
    size: int = 224,
    scale_range: tuple[int, int] = (256, 480),
) -> Plan:
    """He et al. 2016, Sec. 3.4: shorter side resized to s ~ U{scale_range} (inclusive), a
    random size x size crop, mirrored with probability 1/2."""
    s = int(rng.integers(scale_range[0], scale_range[1] + 1))
    rw, rh = resized_shape(w, h, s)
    x0 = int(rng.integers(0, rw - size + 1))
    y0 = int(rng.integers(0, rh - size + 1))
    sx, sy = w / rw, h / rh  # resized pixel -> original pixel
    box = (x0 * sx, y0 * sy, (x0 + size) * sx, (y0 + size) * sy)
    return Plan(box, (size, size), bool(rng.random() < 0.5))


def plan_rrc(
    w: int,
    h: int,
    rng: np.random.Generator,
    *,
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Plan:
    """RandomResizedCrop (Inception-style; torchvision's algorithm): a crop of random area
    fraction and aspect ratio, resized to size x size, mirrored with probability 1/2."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            break
    else:  # fallback: the central crop with the aspect ratio clamped into range
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            ch, cw = h, round(h * ratio[1])
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    return Plan((left, top, left + cw, top + ch), (size, size), bool(rng.random() < 0.5))


# --------------------------------------------------------------------------------------------
# training transforms: (bytes, rng) -> uint8 [3, size, size]


def paper_train(
    data: bytes,
    rng: np.random.Generator,
    *,
    size: int = 224,
    scale_range: tuple[int, int] = (256, 480),
) -> np.ndarray:
    """The paper's scale augmentation (PCA lighting happens later, on the device)."""
    w, h = image_size(data)
    return render(data, plan_paper(w, h, rng, size=size, scale_range=scale_range), original=(w, h))


def rrc_train(data: bytes, rng: np.random.Generator, *, size: int = 224) -> np.ndarray:
    """RandomResizedCrop(0.08-1, 3/4-4/3) + flip."""
    w, h = image_size(data)
    return render(data, plan_rrc(w, h, rng, size=size), original=(w, h))


def pad_crop_flip(
    arr: np.ndarray, rng: np.random.Generator, *, size: int = 32, pad: int = 4
) -> np.ndarray:
    """CIFAR augmentation on a uint8 [3, H, W] array: zero-pad `pad` pixels on each side, a
    random size x size crop, mirrored with probability 1/2."""
    padded = np.pad(arr, ((0, 0), (pad, pad), (pad, pad)))
    y0 = int(rng.integers(0, padded.shape[1] - size + 1))
    x0 = int(rng.integers(0, padded.shape[2] - size + 1))
    out = padded[:, y0 : y0 + size, x0 : x0 + size]
    return out[:, :, ::-1] if rng.random() < 0.5 else out


def cifar_train(
    data: bytes, rng: np.random.Generator, *, size: int = 32, pad: int = 4
) -> np.ndarray:
    """He et al. 2016, Sec. 4.2: pad 4, random 32 crop, flip (images resized to size x size
    first only if they are not already)."""
    return pad_crop_flip(cifar_eval(data, size=size), rng, size=size, pad=pad)


# --------------------------------------------------------------------------------------------
# evaluation views (deterministic)


def center_view(data: bytes, *, size: int = 224, resize: int = 256) -> np.ndarray:
    """Shorter side to `resize`, then the central size x size crop (torchvision's rounding):
    uint8 [3, size, size]."""
    full = full_view(data, resize=resize)
    _, h, w = full.shape
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return full[:, top : top + size, left : left + size]


def full_view(data: bytes, *, resize: int = 256) -> np.ndarray:
    """The whole image, shorter side `resize` (the paper's fully-convolutional multi-scale
    test): uint8 [3, H, W], H and W vary with the aspect ratio."""
    w, h = image_size(data)
    whole = Plan((0.0, 0.0, float(w), float(h)), resized_shape(w, h, resize))
    return render(data, whole, original=(w, h))


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The standard 10 views of a uint8 [3, H, W] array: top-left, top-right, bottom-left,
    bottom-right, centre, then the horizontal flip of each of those five: [10, 3, size, size]."""
    _, h, w = arr.shape
    if h < size or w < size:
        raise ValueError(f"ten_crop: image {w}x{h} smaller than crop {size}")
    cy, cx = round((h - size) / 2.0), round((w - size) / 2.0)
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (cy, cx)]
    five = np.stack([arr[:, y : y + size, x : x + size] for y, x in corners])
    return np.concatenate([five, five[:, :, :, ::-1]])


def ten_crop_view(data: bytes, *, size: int = 224, resize: int = 256) -> np.ndarray:
    """Shorter side `resize`, then `ten_crop`: uint8 [10, 3, size, size]."""
    return ten_crop(full_view(data, resize=resize), size)


def cifar_eval(data: bytes, *, size: int = 32) -> np.ndarray:
    """The original image (CIFAR's single test view), resampled only if it is not already
    size x size: uint8 [3, size, size]."""
    pixels, _ = decode(data)
    return resample(pixels, (size, size))
