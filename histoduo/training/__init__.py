"""Training DuoFormer and its baselines on labelled tiles of a tile store."""

from histoduo.training.config import AugmentConfig, TrainConfig
from histoduo.training.data import LabelError
from histoduo.training.loop import TrainResult, evaluate, train

__all__ = ["AugmentConfig", "LabelError", "TrainConfig", "TrainResult", "evaluate", "train"]
