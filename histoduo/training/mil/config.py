"""How a slide-level (MIL) model is trained: one keyword-only dataclass, saved with the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoduo.models.mil import AGGREGATORS


@dataclass(kw_only=True)
class MILConfig:
    """``train_mil``'s inputs and settings. Paths are part of it: a run folder's config.json
    says exactly which features and labels it learnt from."""

    features_dir: Path  # a features_<encoder> folder of <slide>.h5 files
    labels_csv: Path  # slide,label[,patient]
    out_dir: Path
    aggregator: str = "abmil"
    multi_branch: bool = False  # abmil: one attention branch per class
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    heads: int = 8  # transmil
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-5
    val_fraction: float = 0.2  # of patients
    test_fraction: float = 0.2
    folds: int = 1  # K > 1: K-fold cross-validation (fold k tests, fold k+1 validates)
    grades: list[str] | None = None  # ordinal classes low -> high (else sorted label names)
    balanced_sampler: bool = True  # each epoch draws slides with equal weight per class
    early_stopping_patience: int | None = 5  # epochs without a validation gain
    max_train_tiles: int | None = None  # random subset of a bag per training step (None: all)
    num_workers: int = 1  # processes reading bags ahead of the model (0: read in-line)
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (1 is fastest for small bags on busy CPUs)
    seed: int = 0
    # Tiles QC flagged (pen, blur): exclude / flag; None: as each slide was tiled (the
    # flags ride in the feature files that embed writes from a QC-checked store).
    qc: str | None = None

    def __post_init__(self) -> None:
        self.features_dir = Path(self.features_dir)
        self.labels_csv = Path(self.labels_csv)
        self.out_dir = Path(self.out_dir)
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.folds < 1 or self.folds == 2:
            raise ValueError("folds must be 1 (one split) or >= 3 (a test and a val fold each)")
        if self.folds == 1:
            if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
                raise ValueError("val fraction must be in (0, 1) and test fraction in [0, 1)")
            if self.val_fraction + self.test_fraction >= 1:
                raise ValueError("val + test fractions must leave patients for training")
        if self.max_train_tiles is not None and self.max_train_tiles < 1:
            raise ValueError("max_train_tiles must be >= 1")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if self.qc is not None:
            from histoduo.qc.params import check_mode

            check_mode(self.qc)
        if self.grades is not None and len(set(self.grades)) != len(self.grades):
            raise ValueError(f"grades repeat a name: {self.grades}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("features_dir", "labels_csv", "out_dir"):
            data[key] = str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MILConfig:
        return cls(**data)
