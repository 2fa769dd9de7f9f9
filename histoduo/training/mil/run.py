"""What one training run (one split) holds between setup and its final report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from histoduo.models.mil import MILModelConfig
from histoduo.training.mil.config import MILConfig
from histoduo.training.mil.data import Cohort


@dataclass(kw_only=True)
class MILRun:
    config: MILConfig
    cohort: Cohort
    out: Path
    split_of: dict[str, str]  # slide -> train / val / test
    model_config: MILModelConfig
    model: Any
    optimizer: Any
    device: Any

    def rows(self, split: str) -> pd.DataFrame:
        """The cohort's rows (slide, label, patient, path) of one split."""
        frame = self.cohort.frame
        return frame[frame["slide"].map(self.split_of) == split].reset_index(drop=True)
