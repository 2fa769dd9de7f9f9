"""The thresholds of the grade rule and of the uncertainty flag (recorded in every manifest)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class UncertaintyParams:
    """When a slide-level call is flagged uncertain (see the module docstring).

    Defaults: 0.6 is well above chance for 2-6 classes (0.17-0.5) and below what a trained
    model gives on clear tissue (0.8-0.95 on the demo); 5 % / 20 tiles of tumour is about
    0.3 mm^2 at 0.5 um/px and 64 px tiles, the smallest area one would grade by eye from;
    50 tiles is a small biopsy; 1.25x is the resolution step beyond which tile texture visibly
    changes (0.5 vs 0.625 um/px).
    """

    min_confidence: float = 0.6  # 0-1
    min_tumour_fraction: float = 0.05  # of the tissue area, for a grade call
    min_tumour_tiles: int = 20  # for a grade call
    min_tiles: int = 50  # tiles on the slide
    max_mpp_ratio: float = 1.25  # tile mpp vs model mpp (either way); slide mpp over tile mpp

    def __post_init__(self) -> None:
        for name in ("min_confidence", "min_tumour_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in 0-1, got {value}")
        for name in ("min_tumour_tiles", "min_tiles"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_mpp_ratio < 1.0:
            raise ValueError(f"max_mpp_ratio must be >= 1, got {self.max_mpp_ratio}")


@dataclass(frozen=True, kw_only=True)
class GradeParams:
    """Thresholds of the slide-level grade rule (see the module docstring)."""

    min_grade_fraction: float = 0.05  # of the tumour area, 0-1
    min_grade_tiles: int = 3
    min_tumour_fraction: float = 0.01  # of the tissue area, 0-1
    min_tumour_tiles: int = 3
    uncertainty: UncertaintyParams = field(default_factory=UncertaintyParams)

    def __post_init__(self) -> None:
        for name in ("min_grade_fraction", "min_tumour_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in 0-1, got {value}")
        for name in ("min_grade_tiles", "min_tumour_tiles"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
