"""Slide-level training from slide labels (multiple-instance learning on feature files).

``train_mil(MILConfig(...))`` reads ``features_<encoder>/<slide>.h5`` files (store/features.py)
and a ``slide,label[,patient]`` CSV; aggregators live in ``histoduo.models.mil``.
"""

from histoduo.training.mil.config import MILConfig
from histoduo.training.mil.data import MILLabelError
from histoduo.training.mil.loop import MILResult, train_mil

__all__ = ["MILConfig", "MILLabelError", "MILResult", "train_mil"]
