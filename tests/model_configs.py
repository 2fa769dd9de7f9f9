"""The tiny model configuration the model tests share (fast on 2 CPU cores at 64 px)."""

from __future__ import annotations

from histoduo.models import ModelConfig

TINY = dict(
    backbone="resnet18",
    embed_dim=32,
    scale_depth=1,
    patch_depth=1,
    scale_heads=2,
    patch_heads=2,
    input_size_px=64,
    patch_size_px=32,
    num_classes=3,
)


def tiny(**changes: object) -> ModelConfig:
    """TINY with ``changes`` applied."""
    return ModelConfig(**{**TINY, **changes})  # type: ignore[arg-type]
