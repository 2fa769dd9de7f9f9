"""The model configuration: one JSON-able dataclass that travels inside checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["duoformer", "resnet", "hybrid"]
ScaleToken = Literal["learned", "conv", "first", "mean"]
PatchBlock = Literal["faithful", "prenorm"]
BlockOrder = Literal["sequential", "interleaved"]
InteractionIn = Literal["scale", "patch", "both"]

ARCHS: tuple[str, ...] = ("duoformer", "resnet", "hybrid")
SCALE_TOKENS: tuple[str, ...] = ("learned", "conv", "first", "mean")
PATCH_BLOCKS: tuple[str, ...] = ("faithful", "prenorm")
BLOCK_ORDERS: tuple[str, ...] = ("sequential", "interleaved")
INTERACTION_INS: tuple[str, ...] = ("scale", "patch", "both")


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a histoduo classifier; defaults are the authors' best DuoFormer run.

    ``stages`` are indices into the backbone's timm ``feature_info`` (its ``out_indices``);
    ``None`` means the last four levels, which for ResNets is (1, 2, 3, 4) = S0-S3 (strides
    4, 8, 16, 32). The ``resnet`` and ``hybrid`` baselines always use the last level.

    The ``hybrid`` baseline reuses ``patch_depth``/``patch_heads`` for its ViT blocks (they
    attend across patches); the scale-attention fields apply to ``duoformer`` only.

    ``backbone_weights``: ``None``/"none" (random init), "timm" (hub download) or a path to a
    local ``.safetensors``/``.pth``/``.pt`` file in timm or torchvision key layout.

    Optional pre-attention interactions (``duoformer`` only, off by default; see
    :mod:`histoduo.models.interaction`): ``acp_levels`` pooling levels of aggressive
    convolutional pooling and ``cat_concepts`` concepts of conceptual attention (0 = off),
    in the blocks ``interaction_in`` names ("scale", "patch" or "both").
    """

    arch: Arch = "duoformer"
    backbone: str = "resnet50"
    num_classes: int = 3
    input_size_px: int = 224
    in_chans: int = 3
    stages: tuple[int, ...] | None = None
    patch_size_px: int = 32
    embed_dim: int = 768
    scale_depth: int = 8
    scale_heads: int = 8
    patch_depth: int = 8
    patch_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    scale_token: ScaleToken = "learned"
    patch_block: PatchBlock = "faithful"
    block_order: BlockOrder = "sequential"
    patch_attention: bool = True
    backbone_weights: str | None = None
    freeze_backbone: bool = False
    acp_levels: int = 0
    cat_concepts: int = 0
    interaction_in: InteractionIn = "both"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, kept verbatim

    def __post_init__(self) -> None:
        if self.stages is not None:
            self.stages = tuple(int(s) for s in self.stages)
        for name, value, allowed in (
            ("arch", self.arch, ARCHS),
            ("scale_token", self.scale_token, SCALE_TOKENS),
            ("patch_block", self.patch_block, PATCH_BLOCKS),
            ("block_order", self.block_order, BLOCK_ORDERS),
            ("interaction_in", self.interaction_in, INTERACTION_INS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        for name in ("num_classes", "input_size_px", "in_chans", "patch_size_px", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("acp_levels", "cat_concepts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.backbone_weights in ("", "none", "None"):
            self.backbone_weights = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        if data["stages"] is not None:
            data["stages"] = list(data["stages"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they mean a newer format).

        Missing keys take their defaults, so configs written before a field existed still load.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def small_cpu(
        cls, num_classes: int = 4, input_size_px: int = 64, **changes: Any
    ) -> ModelConfig:
        """A DuoFormer that trains on a CPU in minutes: ResNet-18 trunk, scales S1-S3, D 64,
        one scale block and one patch block of 4 heads (the demo's and the tests' model).

        Its patch block is ``prenorm``, not the authors' bare attention: without norm or
        residual that block diverged at the high learning rate a short run needs (seed 2 of
        the synthetic task: validation balanced accuracy 0.54 at lr 1e-3, 0.50 at 3e-4; pre-norm
        0.97, and 0.98 / 1.0 on seeds 0 / 1)."""
        settings: dict[str, Any] = dict(
            arch="duoformer",
            backbone="resnet18",
            num_classes=num_classes,
            input_size_px=input_size_px,
            patch_size_px=32,
            stages=(2, 3, 4),
            embed_dim=64,
            scale_depth=1,
            patch_depth=1,
            scale_heads=4,
            patch_heads=4,
            patch_block="prenorm",
        )
        settings.update(changes)
        return cls(**settings)

    def replace(self, **changes: Any) -> ModelConfig:
        """Copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
