"""Models: DuoFormer, the ResNet and hybrid baselines, their config, weights and costs.

Names import their module on first use, so ``histoduo.models.config`` needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoduo.runtime.lazy import lazy_exports

_EXPORTS = {
    "CNNClassifier": "baselines",
    "ConvScaleToken": "duoformer",
    "DuoFormer": "duoformer",
    "HistoClassifier": "duoformer",
    "HybridViT": "baselines",
    "LoadReport": "weights",
    "ModelConfig": "config",
    "StageInfo": "backbone",
    "WeightsError": "weights",
    "build_model": "factory",
    "feature_levels": "backbone",
    "input_normalization": "backbone",
    "load_backbone_file": "weights",
    "patchify": "duoformer",
    "validate_config": "factory",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "CNNClassifier",
    "ConvScaleToken",
    "DuoFormer",
    "HistoClassifier",
    "HybridViT",
    "LoadReport",
    "ModelConfig",
    "StageInfo",
    "WeightsError",
    "build_model",
    "feature_levels",
    "input_normalization",
    "load_backbone_file",
    "patchify",
    "validate_config",
]

if TYPE_CHECKING:
    from histoduo.models.backbone import StageInfo, feature_levels, input_normalization
    from histoduo.models.baselines import CNNClassifier, HybridViT
    from histoduo.models.config import ModelConfig
    from histoduo.models.duoformer import ConvScaleToken, DuoFormer, HistoClassifier, patchify
    from histoduo.models.factory import build_model, validate_config
    from histoduo.models.weights import LoadReport, WeightsError, load_backbone_file
