"""timm CNN backbones in ``features_only`` mode, and their input normalisation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from histoduo.models.config import ModelConfig
from histoduo.runtime.torchcompat import import_timm

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StageInfo:
    """One selected backbone level: its ``feature_info`` index, channels and stride (px)."""

    index: int
    channels: int
    stride_px: int


def is_encoder_backbone(backbone_name: str) -> bool:
    """A foundation-model ViT of the encoder registry (``uni``...): a pyramid backbone."""
    from histoduo.models.encoders import registered_encoders

    return any(spec.name == backbone_name for spec in registered_encoders())


def feature_levels(backbone_name: str) -> list[StageInfo]:
    """All levels a timm CNN offers with ``features_only`` (built on the meta device: cheap),
    or the strides of a registry ViT's simple feature pyramid (encoders/pyramid.py)."""
    import torch

    if is_encoder_backbone(backbone_name):
        from histoduo.models.encoders import get_encoder_spec
        from histoduo.models.encoders.pyramid import pyramid_levels

        return [StageInfo(*level) for level in pyramid_levels(get_encoder_spec(backbone_name))]

    timm = import_timm()
    with torch.device("meta"):
        model = timm.create_model(backbone_name, features_only=True, pretrained=False)
    info = model.feature_info
    return [StageInfo(i, c, r) for i, (c, r) in enumerate(zip(info.channels(), info.reduction()))]


def resolve_stages(config: ModelConfig, levels: list[StageInfo]) -> tuple[int, ...]:
    """The ``out_indices`` a config asks for: explicit stages, or the last four levels."""
    if config.arch != "duoformer":
        return (len(levels) - 1,)
    if config.stages is None:
        return tuple(s.index for s in levels[-4:])
    stages = tuple(config.stages)
    if not stages:
        raise ValueError("stages is empty: select at least one backbone level")
    bad = [s for s in stages if not 0 <= s < len(levels)]
    if bad:
        raise ValueError(
            f"stages {bad} do not exist in {config.backbone}, which has feature levels "
            f"0..{len(levels) - 1} (strides {[s.stride_px for s in levels]})"
        )
    if list(stages) != sorted(set(stages)):
        raise ValueError(f"stages must be increasing and distinct, got {list(stages)}")
    return stages


def create_backbone(
    config: ModelConfig, out_indices: tuple[int, ...], *, pretrained: bool = False
) -> nn.Module:
    """The timm ``features_only`` model; returns a list of maps, one per out index."""
    timm = import_timm()
    return timm.create_model(
        config.backbone,
        features_only=True,
        out_indices=out_indices,
        pretrained=pretrained,
        in_chans=config.in_chans,
    )


def create_vit_pyramid(config: ModelConfig, out_indices: tuple[int, ...]) -> nn.Module:
    """A registry ViT (frozen, local weights from ``backbone_weights`` or random) with the
    pyramid levels ``out_indices``; hub downloads are refused (weights are the user's)."""
    from histoduo.models.encoders import create_trunk, get_encoder_spec
    from histoduo.models.encoders.build import load_trunk_weights
    from histoduo.models.encoders.pyramid import ViTPyramid

    spec = get_encoder_spec(config.backbone)
    if config.backbone_weights == "timm":
        raise ValueError(
            f"{spec.name} weights are never downloaded: pass your local file with "
            f"--backbone-weights (model card: {spec.source or 'see docs/encoders.md'})"
        )
    digest = ""
    if config.backbone_weights is None:
        trunk = create_trunk(spec)
    else:
        trunk, _, digest = load_trunk_weights(spec, config.backbone_weights)
        if config.encoder_weights_sha256 and digest != config.encoder_weights_sha256:
            raise ValueError(
                f"{config.backbone_weights}: sha256 {digest[:16]}... is not the "
                f"{config.encoder_weights_sha256[:16]}... of the {spec.name} weights this "
                "model was trained with"
            )
    return ViTPyramid(spec, trunk, out_indices, weights_sha256=digest)


def input_normalization(
    backbone_name: str,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone expects on 0-1 RGB input: the encoder registry's (model
    cards), timm's pretrained cfg, else ImageNet."""
    if is_encoder_backbone(backbone_name):
        from histoduo.models.encoders import get_encoder_spec

        spec = get_encoder_spec(backbone_name)
        return tuple(spec.mean), tuple(spec.std)
    timm = import_timm()
    try:
        cfg = timm.models.get_pretrained_cfg(backbone_name)
    except Exception:  # unknown tag or no cfg: the ImageNet default is the sane fallback
        cfg = None
    mean = tuple(float(v) for v in getattr(cfg, "mean", None) or IMAGENET_MEAN)
    std = tuple(float(v) for v in getattr(cfg, "std", None) or IMAGENET_STD)
    return mean, std
