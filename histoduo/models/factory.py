"""One entry point from a :class:`ModelConfig` to a ready ``nn.Module``."""

from __future__ import annotations

import logging

from histoduo.models.backbone import create_backbone, feature_levels, resolve_stages
from histoduo.models.baselines import CNNClassifier, HybridViT
from histoduo.models.config import ModelConfig
from histoduo.models.duoformer import DuoFormer, HistoClassifier
from histoduo.models.weights import check_hub_reachable, load_backbone_file, offline_hint

log = logging.getLogger(__name__)


def validate_config(config: ModelConfig) -> None:
    """Checks that need the backbone's strides; raises ValueError with the reason."""
    levels = feature_levels(config.backbone)
    stages = [levels[i] for i in resolve_stages(config, levels)]
    interactions = config.acp_levels > 0 or config.cat_concepts > 0
    if interactions and config.arch != "duoformer":
        raise ValueError(
            f"acp_levels/cat_concepts are DuoFormer options; arch {config.arch!r} has no "
            "scale or patch blocks to put them in"
        )
    if interactions and config.interaction_in == "patch" and not config.patch_attention:
        raise ValueError("interaction_in='patch' needs patch attention (it is disabled)")
    if config.arch == "resnet":
        return
    for name, dim, heads in (
        ("scale_heads", config.embed_dim, config.scale_heads),
        ("patch_heads", config.embed_dim, config.patch_heads),
    ):
        if heads < 1 or dim % heads:
            raise ValueError(f"{name}={heads} does not divide embed_dim={dim}")
    if config.arch == "hybrid":
        if config.input_size_px % stages[-1].stride_px:
            raise ValueError(
                f"input size {config.input_size_px} px is not a multiple of the last-stage "
                f"stride {stages[-1].stride_px} px of {config.backbone}"
            )
        return
    patch = config.patch_size_px
    for stage in stages:
        if patch % stage.stride_px:
            raise ValueError(
                f"patch size {patch} px is not a multiple of stage {stage.index}'s stride "
                f"{stage.stride_px} px ({config.backbone}, strides "
                f"{[s.stride_px for s in stages]})"
            )
    if config.input_size_px % patch:
        raise ValueError(
            f"input size {config.input_size_px} px is not a multiple of patch size {patch} px"
        )
    if config.scale_depth < 1:
        raise ValueError("scale_depth must be >= 1")
    if config.patch_attention and config.patch_depth < 1:
        raise ValueError("patch_depth must be >= 1 with patch attention (or disable it)")
    if config.block_order == "interleaved" and config.patch_attention:
        if config.scale_depth != config.patch_depth:
            raise ValueError(
                f"interleaved block order needs scale_depth == patch_depth, got "
                f"{config.scale_depth} and {config.patch_depth}"
            )
        if config.scale_token == "mean":
            raise ValueError(
                "interleaved block order needs a per-patch token to write back into; "
                "use scale_token learned, conv or first"
            )


def build_model(config: ModelConfig, *, trust_weights: bool = False) -> HistoClassifier:
    """Build the classifier a config describes, with its backbone weights loaded/frozen.

    ``trust_weights`` allows a pickled (torch.save) backbone weights file; see weights.py.
    """
    validate_config(config)
    levels = feature_levels(config.backbone)
    out_indices = resolve_stages(config, levels)
    stages = [levels[i] for i in out_indices]
    pretrained = config.backbone_weights == "timm"
    if pretrained:
        check_hub_reachable(config.backbone)
        try:
            backbone = create_backbone(config, out_indices, pretrained=True)
        except Exception as err:  # hub/cache errors come in many types
            raise offline_hint(config.backbone, err) from err
    else:
        backbone = create_backbone(config, out_indices)
    if config.backbone_weights is not None and not pretrained:
        report = load_backbone_file(backbone, config.backbone_weights, trust=trust_weights)
        log.info("backbone weights: %s", report.summary())
        if report.missing:
            log.warning("backbone tensors not in %s: %s", report.path, report.missing[:10])

    model: HistoClassifier
    if config.arch == "duoformer":
        model = DuoFormer(config, backbone, stages)
    elif config.arch == "resnet":
        model = CNNClassifier(config, backbone, stages[-1])
    else:
        model = HybridViT(config, backbone, stages[-1])
    if config.freeze_backbone:
        for param in model.backbone.parameters():
            param.requires_grad_(False)
        model.train()  # re-applies eval() to the frozen backbone
    return model
