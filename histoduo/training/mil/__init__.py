"""Slide-level training from slide labels (multiple-instance learning on feature files).

``train_mil(MILConfig(...))`` reads ``features_<encoder>/<slide>.h5`` files (store/features.py)
and a ``slide,label[,patient]`` CSV; aggregators live in ``histoduo.models.mil``. Names import
their module on first use, so ``histoduo.training.mil.config`` needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoduo.runtime.lazy import lazy_exports

_EXPORTS = {
    "MILConfig": "config",
    "MILLabelError": "data",
    "MILResult": "loop",
    "train_mil": "loop",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["MILConfig", "MILLabelError", "MILResult", "train_mil"]

if TYPE_CHECKING:
    from histoduo.training.mil.config import MILConfig
    from histoduo.training.mil.data import MILLabelError
    from histoduo.training.mil.loop import MILResult, train_mil
