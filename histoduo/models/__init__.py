"""Models: DuoFormer, the ResNet and hybrid baselines, their config, weights and costs."""

from histoduo.models.backbone import StageInfo, feature_levels, input_normalization
from histoduo.models.baselines import CNNClassifier, HybridViT
from histoduo.models.config import ModelConfig
from histoduo.models.duoformer import ConvScaleToken, DuoFormer, HistoClassifier, patchify
from histoduo.models.factory import build_model, validate_config
from histoduo.models.weights import LoadReport, WeightsError, load_backbone_file
from histoduo.runtime.device import maybe_compile

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
    "maybe_compile",
    "patchify",
    "validate_config",
]
