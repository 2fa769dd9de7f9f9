"""Training configuration: one dataclass, saved with every run and inside its checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("onecycle", "cosine", "none")
PRESETS = ("default", "authors")


@dataclass(kw_only=True)
class AugmentConfig:
    """Train-time augmentation, applied to uint8 tensors in the DataLoader workers."""

    flips: bool = True  # horizontal and vertical
    rotate90: bool = True  # multiples of 90 degrees: exact, no interpolation
    rotation_deg: float = 0.0  # free rotation in [0, rotation_deg) (authors: 360)
    brightness: float = 0.1  # colour jitter strengths (authors: 0.1 / 0.1)
    contrast: float = 0.1
    hed_sigma: float = 0.0  # HED stain augmentation strength (0 = off; ~0.03 is mild)
    center_crop_fraction: float = 1.0  # authors: 282 / 400 of the tile, then a random crop
    random_crop: bool = False  # random crop of the model's input size (authors: True)


@dataclass(kw_only=True)
class TrainConfig:
    """How a model is trained. ``preset="authors"`` reproduces the DuoFormer authors' recipe
    (docs/training.md)."""

    epochs: int = 10
    iterations_per_epoch: int | None = None  # None: one pass over the training tiles
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "onecycle"  # stepped every iteration
    label_smoothing: float = 0.0
    balanced_sampler: bool = True  # equal tiles per class in every batch
    weighted_loss: bool = False  # inverse-frequency class weights (use instead of the sampler)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_fraction: float = 0.2  # of slides (or patients)
    test_fraction: float = 0.2
    split_by: str = "slide"  # or "patient" (a column of the slide-label CSV / import CSV)
    splits_csv: str | None = None  # a given split: columns slide,split
    slide_labels_csv: str | None = None  # slide,label: every tile of the slide gets the label
    grades: list[str] | None = None  # tumour grade classes low -> high (default: from names)
    # {class id: name people read, e.g. "ISUP grade 3-4"} into the checkpoint; others derived
    class_display_names: dict[str, str] = field(default_factory=dict)
    early_stopping_patience: int | None = None  # epochs without val improvement
    grad_accumulation: int = 1
    bf16: str = "auto"  # auto: bf16 autocast on GPU only; "on" / "off"
    channels_last: bool = True
    compile: bool = False
    num_workers: int | None = None  # DataLoader workers; None: min(4, cores - 1)
    decode: str = "auto"  # auto: tiles decoded + augmented on the GPU there (decode.py)
    device: str = "auto"
    seed: int = 0
    preset: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise ValueError("epochs, batch size and gradient accumulation must be >= 1")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val and test fractions must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val + test fractions must leave slides for training")
        if self.split_by not in ("slide", "patient"):
            raise ValueError(f"split_by must be slide or patient, got {self.split_by!r}")
        from histoduo.runtime.device import check_decode, check_device_name

        check_device_name(self.device)
        check_decode(self.decode)
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be auto, on or off, got {self.bf16!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**data)

    @classmethod
    def from_preset(
        cls, preset: str = "default", *, hed_sigma: float | None = None, **settings: Any
    ) -> TrainConfig:
        """``default`` or ``authors`` (:meth:`authors`), with ``settings`` on top; ``hed_sigma``
        sets the stain augmentation of either."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        config = cls.authors(**settings) if preset == "authors" else cls(**settings)
        if hed_sigma is not None:
            config.augment = dataclasses.replace(config.augment, hed_sigma=hed_sigma)
        return config

    @classmethod
    def authors(cls, **overrides: Any) -> TrainConfig:
        """The DuoFormer authors' recipe (docs/training.md, section 5): Adam 1e-4 / wd 1e-4,
        OneCycle stepped every iteration, class-balanced batches, 1000 iterations per epoch,
        jitter 0.1/0.1, 0-360 rotation, centre crop 282/400 then random crop, flips; eval
        centre crop."""
        settings: dict[str, Any] = dict(
            preset="authors",
            optimizer="adam",
            lr=1e-4,
            weight_decay=1e-4,
            scheduler="onecycle",
            balanced_sampler=True,
            iterations_per_epoch=1000,
            batch_size=6,
            augment=AugmentConfig(
                flips=True,
                rotate90=False,
                rotation_deg=360.0,
                brightness=0.1,
                contrast=0.1,
                center_crop_fraction=282 / 400,
                random_crop=True,
            ),
        )
        settings.update(overrides)
        return cls(**settings)
