"""Training DuoFormer and its baselines on labelled tiles of a tile store.

Names import their module on first use, so ``histoduo.training.config`` needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoduo.runtime.lazy import lazy_exports

_EXPORTS = {
    "AugmentConfig": "config",
    "LabelError": "data",
    "TrainConfig": "config",
    "TrainResult": "loop",
    "evaluate": "evaluation",
    "train": "loop",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "AugmentConfig",
    "LabelError",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "train",
]

if TYPE_CHECKING:
    from histoduo.training.config import AugmentConfig, TrainConfig
    from histoduo.training.data import LabelError
    from histoduo.training.evaluation import evaluate
    from histoduo.training.loop import TrainResult, train
