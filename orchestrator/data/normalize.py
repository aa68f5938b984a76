"""On the training device: uint8 batches -> normalised float, with PCA lighting in training."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.data.manifest import IMAGENET_MEAN, IMAGENET_STD

MAX_MEAN_SIZES = 16  # resized mean images kept per normalizer (multiscale sees many shapes)


def pixel_scale(std: Sequence[float]) -> float:
    """data.normalize=per_pixel_mean's one divisor: the root mean square of the per-channel
    stds (0-255 scale), i.e. the pooled std of the three channels, so the input has about the
    scale per_channel gives and a recipe's learning rate means the same under both forms."""
    return math.sqrt(sum(float(s) ** 2 for s in std) / len(std))


class DeviceNormalize:
    """uint8 batch -> normalized float on the training device, in channels_last.

    Train: AlexNet PCA lighting (Krizhevsky et al. 2012, as in fb.resnet.torch): each image gets
    eigvec @ (alpha * eigval) added to its RGB values, alpha ~ N(0, pca_lighting^2) per image,
    drawn from `generator` (seed it from (seed, step) for reproducible runs). Then
    (x - mean) / std with mean/std on the 0-255 scale (the manifest's, else ImageNet's): per
    channel, or, given `mean_image` (float [3, h, w], 0-255: data.normalize=per_pixel_mean, the
    paper's per-pixel mean), x minus the mean image, divided by `pixel_scale(std)`. The mean
    image is resized (bilinear, antialiased) to each batch's H x W where they differ: a
    multiscale evaluation's whole images, a run whose crop is not the dataset's mean size.
    """

    EIGVAL = (0.2175, 0.0188, 0.0045)  # of the ImageNet RGB covariance, 0-1 scale
    EIGVEC = (
        (-0.5675, 0.7192, 0.4009),
        (-0.5808, -0.0045, -0.8140),
        (-0.5836, -0.6948, 0.4203),
    )

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pca_lighting: float = 0.1,
        device: torch.device | str = "cpu",
        *,
        mean_image: np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pca_lighting = float(pca_lighting)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device).view(
            3, 1, 1
        )
        self._mean_images: dict[tuple[int, int], torch.Tensor] = {}  # (H, W) -> mean image
        self.per_pixel = mean_image is not None
        if mean_image is not None:
            image = torch.tensor(np.asarray(mean_image, dtype=np.float32), device=self.device)
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"mean_image: expected [3, H, W], got {list(image.shape)}")
            self._mean_images[(int(image.shape[1]), int(image.shape[2]))] = image
            self._native = image
            self.inv_std = torch.tensor(1.0 / pixel_scale(std), device=self.device)
        # column i of EIGVEC is eigenvector i; scaled to 0-255 pixels once here
        self.basis = (
            torch.tensor(self.EIGVEC, dtype=torch.float32) * torch.tensor(self.EIGVAL) * 255.0
        )

    def mean_for(self, height: int, width: int) -> torch.Tensor:
        """What is subtracted from an H x W image: [3, 1, 1] per channel, else the mean image
        at that size."""
        if not self.per_pixel:
            return self.mean
        key = (int(height), int(width))
        if key not in self._mean_images:
            if len(self._mean_images) >= MAX_MEAN_SIZES:
                native = (int(self._native.shape[1]), int(self._native.shape[2]))
                self._mean_images = {native: self._native}
            self._mean_images[key] = F.interpolate(
                self._native[None], size=key, mode="bilinear", align_corners=False, antialias=True
            )[0]
        return self._mean_images[key]

    def lighting(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The per-image RGB offsets [batch, 3] (0-255 scale) PCA lighting adds."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        alpha = torch.randn(batch, 3, generator=generator, device=gen_device) * self.pca_lighting
        # non_blocking: a blocking host-to-device copy waits for the GPU's queue, every step
        return (alpha.cpu() @ self.basis.T).to(self.device, non_blocking=True)

    def __call__(
        self, images_uint8: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[..., 3, H, W] uint8 (any device) -> float on self.device; 4-D results are
        channels_last."""
        x = images_uint8.to(self.device, non_blocking=True).to(torch.float32)
        if train and self.pca_lighting > 0:
            flat = x.reshape(-1, *x.shape[-3:])
            x = (flat + self.lighting(flat.shape[0], generator).view(-1, 3, 1, 1)).view(x.shape)
        x = ((x - self.mean_for(*x.shape[-2:])) * self.inv_std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
