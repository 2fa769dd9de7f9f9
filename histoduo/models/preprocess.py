"""Tiles (uint8 RGB) -> normalised model input, identical in evaluation and prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from histoduo.models.checkpoint import CheckpointMeta

EVAL_RESIZES = ("resize", "center_crop")


def to_tensor_batch(tiles: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) uint8 tensor, without copying where possible."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)


def eval_transform(
    batch: torch.Tensor,
    input_size_px: int,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    eval_resize: str = "resize",
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, S, S) float32 normalised, S = ``input_size_px``.

    ``resize`` keeps the whole tile (what a slide map wants); ``center_crop`` is the authors'
    evaluation transform for tiles larger than the input.
    """
    import torch
    import torch.nn.functional as F

    if eval_resize not in EVAL_RESIZES:
        raise ValueError(f"eval_resize must be one of {EVAL_RESIZES}, got {eval_resize!r}")
    x = batch.float().div_(255.0)
    height, width = x.shape[-2:]
    if (height, width) != (input_size_px, input_size_px):
        if eval_resize == "center_crop" and min(height, width) >= input_size_px:
            top = (height - input_size_px) // 2
            left = (width - input_size_px) // 2
            x = x[..., top : top + input_size_px, left : left + input_size_px]
        else:
            x = F.interpolate(
                x,
                size=(input_size_px, input_size_px),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def eval_transform_for(batch: torch.Tensor, meta: CheckpointMeta) -> torch.Tensor:
    return eval_transform(batch, meta.input_size_px, meta.mean, meta.std, meta.eval_resize)
