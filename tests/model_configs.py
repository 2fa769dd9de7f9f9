"""The tiny model configuration the model tests share (fast on 2 CPU cores at 64 px)."""

from __future__ import annotations

from collections.abc import Sequence

from histoduo.grading import ClassRoles
from histoduo.models import ModelConfig
from histoduo.models.checkpoint import CheckpointMeta

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


def tiny_meta(config: ModelConfig, class_names: Sequence[str]) -> CheckpointMeta:
    """Checkpoint metadata for a tiny model on 64 px tiles at 1.0 um/px."""
    names = list(class_names)
    return CheckpointMeta(
        model_config=config.to_dict(),
        class_names=names,
        class_roles=ClassRoles.infer(names).to_dict(),
        target_mpp=1.0,
        tile_size_px=64,
        input_size_px=64,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )
