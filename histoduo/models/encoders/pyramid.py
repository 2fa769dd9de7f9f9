"""A multi-scale feature pyramid from a plain ViT, for DuoFormer on a foundation model.

DuoFormer's tokenizer wants CNN-like maps at several strides. A ViT has one token grid (stride
= its patch size). Following ViTDet's simple feature pyramid, maps at other strides come from
the token grid itself: transposed convolutions up, max-pooling down. Unlike ViTDet, each level
reads its own block (evenly spaced through the depth, the finest from the earliest), so the
scales also differ in depth of processing, as a CNN's stages do.

The ViT is frozen (its weights and its LayerNorm statistics stay as published); the pyramid's
up/down layers and 1x1 projections train. Experimental: see docs/encoders.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from histoduo.models.encoders.registry import EncoderSpec

PYRAMID_CHANNELS = 256


def pyramid_scales(patch_size_px: int) -> tuple[float, ...]:
    """Scales relative to the token grid: 4x, 2x, 1x, 1/2x where the strides stay whole
    pixels (patch 16: strides 4, 8, 16, 32); 2x, 1x, 1/2x for patch 14 (7, 14, 28)."""
    if patch_size_px % 4 == 0:
        return (4.0, 2.0, 1.0, 0.5)
    if patch_size_px % 2 == 0:
        return (2.0, 1.0, 0.5)
    return (1.0, 0.5)


def pyramid_blocks(depth: int, n_levels: int) -> list[int]:
    """Evenly spaced block indices ending at the last block (finest level first); a ViT
    shallower than the pyramid gives some levels the same block."""
    return [max(0, round((i + 1) * depth / n_levels) - 1) for i in range(n_levels)]


def _rescale(dim: int, scale: float) -> tuple[nn.Module, int]:
    """Layers taking (B, dim, h, w) to ``scale`` x the size; returns them and their width."""
    if scale == 4.0:
        return (
            nn.Sequential(
                nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
            ),
            dim // 4,
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2), dim
    raise ValueError(f"unsupported pyramid scale {scale}")


class ViTPyramid(nn.Module):
    """Frozen timm ViT -> list of (B, C, H/s, W/s) maps at the pyramid's strides ``s``."""

    def __init__(
        self,
        spec: EncoderSpec,
        trunk: nn.Module,
        levels: Sequence[int] | None = None,
        channels: int = PYRAMID_CHANNELS,
        weights_sha256: str = "",
    ) -> None:
        super().__init__()
        if not hasattr(trunk, "forward_intermediates") or not hasattr(trunk, "blocks"):
            raise ValueError(f"{spec.name}: a ViT pyramid needs a timm ViT trunk")
        self.spec = spec
        self.trunk = trunk
        for param in self.trunk.parameters():
            param.requires_grad_(False)
        patch = int(trunk.patch_embed.patch_size[0])
        all_scales = pyramid_scales(patch)
        chosen = list(range(len(all_scales))) if levels is None else list(levels)
        self.scales = [all_scales[i] for i in chosen]
        self.blocks = pyramid_blocks(len(trunk.blocks), len(all_scales))
        self.block_indices = [self.blocks[i] for i in chosen]
        dim = int(trunk.embed_dim)
        rescale, project = [], []
        for scale in self.scales:
            layers, width = _rescale(dim, scale)
            rescale.append(layers)
            project.append(nn.Conv2d(width, channels, 1))
        self.rescale = nn.ModuleList(rescale)
        self.project = nn.ModuleList(project)
        self.strides_px = [int(patch / s) for s in self.scales]
        self.channels = channels
        self.weights_sha256 = weights_sha256  # of the ViT's weights file ('' = random)

    def train(self, mode: bool = True) -> ViTPyramid:
        super().train(mode)
        self.trunk.eval()  # frozen: dropout/drop-path off whatever the classifier does
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        unique = sorted(set(self.block_indices))  # timm returns each block once
        with torch.no_grad():
            taken = self.trunk.forward_intermediates(
                x, indices=unique, output_fmt="NCHW", intermediates_only=True
            )
        maps = [taken[unique.index(block)] for block in self.block_indices]
        return [proj(up(m)) for up, proj, m in zip(self.rescale, self.project, maps)]


def pyramid_levels(spec: EncoderSpec) -> list[tuple[int, int, int]]:
    """(index, channels, stride px) of every level the spec's pyramid offers (no build)."""
    patch = int(spec.timm_kwargs.get("patch_size", _patch_from_name(spec.timm_name)))
    return [(i, PYRAMID_CHANNELS, int(patch / s)) for i, s in enumerate(pyramid_scales(patch))]


def _patch_from_name(timm_name: str) -> int:
    import re

    match = re.search(r"patch(\d+)", timm_name)
    if match is None:
        raise ValueError(f"cannot tell the patch size of {timm_name}")
    return int(match.group(1))


# The frozen ViT's tensors inside a classifier's state dict (DuoFormer keeps the pyramid as
# ``backbone``): they are the user's licensed weights, never written into checkpoints.
TRUNK_PREFIX = "backbone.trunk."


def foundation_weights_sha256(model: nn.Module) -> str:
    """sha256 of the weights file of a model's foundation-model ViT ('' if none or random)."""
    backbone = getattr(model, "backbone", None)
    return getattr(backbone, "weights_sha256", "") if isinstance(backbone, ViTPyramid) else ""


def shareable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: without the ViT's tensors when they came from a weights file
    (the checkpoint names the file by sha256; predict takes it again with --encoder-weights)."""
    state = model.state_dict()
    if not foundation_weights_sha256(model):
        return state
    return {k: v for k, v in state.items() if not k.startswith(TRUNK_PREFIX)}


def load_shareable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that accepts exactly the ViT's tensors missing (loaded from the
    user's weights file when the model was built); anything else missing is an error."""
    result = model.load_state_dict(state, strict=False)
    allowed = TRUNK_PREFIX if foundation_weights_sha256(model) else None
    missing = [k for k in result.missing_keys if allowed is None or not k.startswith(allowed)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"state dict does not fit: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
