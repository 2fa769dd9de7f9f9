"""Train-time augmentation on uint8 tensor batches, then the shared normalisation.

Everything is plain torch on (B, 3, H, W) batches, random per sample, so it runs in the
DataLoader workers with no PIL round trips, or on the GPU after a batched decode there
(random draws come from a CPU generator, so a seed gives the same augmentation on any device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histoduo.models.preprocess import eval_transform
from histoduo.training.config import AugmentConfig

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB), RGB order.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(
    x: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scale and shift each stain's optical density by ~N(1, sigma) and ~N(0, sigma).

    ``x``: (B, 3, H, W) float in 0-1. Works in optical-density space so a stain can become
    stronger or paler without changing the others.
    """
    batch = x.shape[0]
    od = -torch.log(x.clamp(min=1e-3))  # Beer-Lambert: optical density
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB.to(x))
    alpha = 1 + sigma * torch.randn(batch, 3, 1, 1, generator=generator).to(x.device)
    beta = sigma * torch.randn(batch, 3, 1, 1, generator=generator).to(x.device)
    hed = hed * alpha + beta
    od = torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED.to(x))
    return torch.exp(-od).clamp(0, 1)


def _rotate(x: torch.Tensor, max_deg: float, generator: torch.Generator | None) -> torch.Tensor:
    """Rotate each sample by a random angle in [0, max_deg); corners filled by reflection."""
    batch = x.shape[0]
    angles = (torch.rand(batch, generator=generator) * math.radians(max_deg)).to(x.device)
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class TrainTransform:
    """uint8 (B, 3, H, W) -> augmented, normalised float (B, 3, S, S)."""

    augment: AugmentConfig
    input_size_px: int
    mean: list[float]
    std: list[float]

    def __call__(
        self, batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        a = self.augment
        g = generator
        x = batch.float().div_(255.0)
        size = x.shape[-1]
        if a.center_crop_fraction < 1.0:
            crop = max(self.input_size_px, round(size * a.center_crop_fraction))
            top = (x.shape[-2] - crop) // 2
            left = (size - crop) // 2
            x = x[..., top : top + crop, left : left + crop]
        if a.rotation_deg > 0:
            x = _rotate(x, a.rotation_deg, g)
        if a.random_crop and x.shape[-1] > self.input_size_px:
            limit = x.shape[-1] - self.input_size_px + 1
            top, left = (int(v) for v in torch.randint(0, limit, (2,), generator=g))
            x = x[..., top : top + self.input_size_px, left : left + self.input_size_px]
        if a.flips:
            # Drawn on the CPU generator (the same draws on any device), then moved to x.
            flip_h = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
            flip_v = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
            x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
            x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
        if a.rotate90 and x.shape[-1] == x.shape[-2]:
            turns = torch.randint(0, 4, (x.shape[0],), generator=g)
            x = torch.stack([torch.rot90(t, int(k), (-2, -1)) for t, k in zip(x, turns)])
        if a.brightness > 0 or a.contrast > 0:
            batch_size = x.shape[0]
            bright = 1 + (torch.rand(batch_size, 1, 1, 1, generator=g) * 2 - 1) * a.brightness
            contrast = 1 + (torch.rand(batch_size, 1, 1, 1, generator=g) * 2 - 1) * a.contrast
            bright, contrast = bright.to(x), contrast.to(x)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x * bright - mean) * contrast + mean).clamp(0, 1)
        if a.hed_sigma > 0:
            x = hed_jitter(x, a.hed_sigma, g)
        # Resize (if needed) and normalise exactly as evaluation does.
        return eval_transform(x.mul(255.0), self.input_size_px, self.mean, self.std, "resize")


@dataclass
class EvalTransform:
    """The evaluation transform of preprocess.py, as a picklable callable."""

    input_size_px: int
    mean: list[float]
    std: list[float]
    eval_resize: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return eval_transform(batch, self.input_size_px, self.mean, self.std, self.eval_resize)
