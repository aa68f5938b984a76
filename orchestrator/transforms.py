"""Image decode and augmentation on the CPU: encoded bytes in, uint8 CHW numpy arrays out.

Every random choice comes from a `numpy.random.Generator` the caller passes in, so a sample's
augmentation is a pure function of (bytes, generator seed): the data pipeline seeds that
generator from (seed, epoch, sample) and gets the same pixels back after a resume.

Speed matters here (one core decodes only a few hundred ImageNet JPEGs a second), so:
- geometry is *planned* first, from the image header alone (`Plan`: a box in original pixels,
  an output size, a flip), before any pixel is decoded;
- JPEGs are then decoded with PIL's draft mode, which lets libjpeg downscale by 1/2, 1/4 or
  1/8 inside the DCT, but only as far as the plan allows: never below the resolution the output
  needs (`decode_for`);
- the crop and the resize are one `Image.resize(..., box=...)`, which resamples only the
  pixels that end up in the output (the same maths as resize-then-crop, less work).
`simplejpeg` is used when it is importable (it is optional; PIL is the reference path).

No torchvision: the training worker must import without it. The maths follows torchvision's
PIL code paths (Resize with an int, CenterCrop, RandomResizedCrop, TenCrop) so numbers match
what people expect, with one documented choice: in `ten_crop`, views 5..9 are the horizontal
flips of views 0..4 (torchvision takes the five crops of the flipped image instead; the set of
ten views is the same, only the order differs).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

try:  # optional fast JPEG decoder; never required
    import simplejpeg  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    simplejpeg = None

# Pillow would otherwise refuse ~90-megapixel images as "decompression bombs"; ImageNet's
# largest are far below that, but a hostile shard should fail as a bad sample, not hang a
# worker on a 1-gigapixel decode.
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


def open_image(data: bytes) -> Image.Image:
    """Open lazily: size and format are known, no pixel is decoded yet."""
    return Image.open(io.BytesIO(data))


def decode(
    data: bytes, need: tuple[int, int] | None = None, *, image: Image.Image | None = None
) -> tuple[Image.Image, float]:
    """Decode to an RGB PIL image at least `need` (width, height) large, if that allows a
    cheaper DCT-domain downscale; None = full resolution. `image`: `open_image(data)` if the
    caller already has it (saves parsing the header twice).

    Returns (image, factor): factor = decoded size / original size (1, 1/2, 1/4 or 1/8), to
    map original-pixel coordinates onto the decoded image.
    """
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        with contextlib.suppress(Exception):  # e.g. CMYK or odd JPEGs: PIL below handles them
            return _decode_simplejpeg(data, need)
    im = image if image is not None else open_image(data)
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
    else:
        im.load()
    return im, factor


def _decode_simplejpeg(data: bytes, need: tuple[int, int] | None) -> tuple[Image.Image, float]:
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    min_w, min_h = need if need is not None else (w, h)
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=min_w, min_height=min_h)
    return Image.fromarray(arr), arr.shape[1] / w


def render(data: bytes, plan: Plan, *, image: Image.Image | None = None) -> np.ndarray:
    """Decode `data` just large enough for `plan`, cut and resample: uint8 [3, H, W]."""
    image = image if image is not None else open_image(data)
    w, h = image.size
    im, f = decode(data, _min_full_size(w, h, plan), image=image)
    box = tuple(c * f for c in plan.box)
    # BILINEAR in PIL widens its filter when shrinking (antialiasing), like torchvision's
    # PIL path; resize(box=) resamples only the box: crop and resize in one pass.
    out = im.resize(plan.size, Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(out).transpose(2, 0, 1)
    return arr[:, :, ::-1] if plan.flip else arr


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


def plan_center(w: int, h: int, *, size: int = 224, resize: int = 256) -> Plan:
    """Shorter side to `resize`, then the central size x size crop (torchvision rounding)."""
    rw, rh = resized_shape(w, h, resize)
    x0 = round((rw - size) / 2.0)
    y0 = round((rh - size) / 2.0)
    sx, sy = w / rw, h / rh
    return Plan((x0 * sx, y0 * sy, (x0 + size) * sx, (y0 + size) * sy), (size, size))


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
    im = open_image(data)
    plan = plan_paper(*im.size, rng, size=size, scale_range=scale_range)
    return render(data, plan, image=im)


def rrc_train(data: bytes, rng: np.random.Generator, *, size: int = 224) -> np.ndarray:
    """RandomResizedCrop(0.08-1, 3/4-4/3) + flip."""
    im = open_image(data)
    return render(data, plan_rrc(*im.size, rng, size=size), image=im)


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
    """Single centre crop: uint8 [3, size, size]."""
    im = open_image(data)
    return render(data, plan_center(*im.size, size=size, resize=resize), image=im)


def full_view(data: bytes, *, resize: int = 256) -> np.ndarray:
    """The whole image, shorter side `resize` (the paper's fully-convolutional multi-scale
    test): uint8 [3, H, W], H and W vary with the aspect ratio."""
    im = open_image(data)
    w, h = im.size
    rw, rh = resized_shape(w, h, resize)
    return render(data, Plan((0.0, 0.0, float(w), float(h)), (rw, rh)), image=im)


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
    """The original image (CIFAR's single test view): uint8 [3, size, size]."""
    im, _ = decode(data)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im).transpose(2, 0, 1)
