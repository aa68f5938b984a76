"""On the training device: uint8 batches -> normalised float, with PCA lighting in training."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orchestrator.data.manifest import IMAGENET_MEAN, IMAGENET_STD


class DeviceNormalize:
    """uint8 batch -> normalized float on the training device, in channels_last.

    Train: AlexNet PCA lighting (Krizhevsky et al. 2012, as in fb.resnet.torch): each image gets
    eigvec @ (alpha * eigval) added to its RGB values, alpha ~ N(0, pca_lighting^2) per image,
    drawn from `generator` (seed it from (seed, step) for reproducible runs). Then
    (x - mean) / std with mean/std on the 0-255 scale (the manifest's, else ImageNet's).
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
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pca_lighting = float(pca_lighting)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device).view(
            3, 1, 1
        )
        # column i of EIGVEC is eigenvector i; scaled to 0-255 pixels once here
        self.basis = (
            torch.tensor(self.EIGVEC, dtype=torch.float32) * torch.tensor(self.EIGVAL) * 255.0
        )

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
        x = ((x - self.mean) * self.inv_std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
