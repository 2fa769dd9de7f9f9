"""How tiles are cut: :class:`TilingParams`, recorded in the store and compared on resume."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from histoduo.tissue import TissueParams

ENCODINGS = ("jpeg", "raw")


@dataclass(frozen=True, kw_only=True)
class TilingParams:
    """How tiles are cut; recorded in the store and compared on resume."""

    target_mpp: float = 0.5
    tile_size_px: int = 256
    stride_px: int | None = None  # at the target resolution; None = tile_size_px (no overlap)
    min_tissue_fraction: float = 0.25  # of the tile's area, 0-1
    encoding: str = "jpeg"
    jpeg_quality: int = 90
    tissue: TissueParams = field(default_factory=TissueParams)
    requested_magnification: float | None = None  # when the user asked with --mag
    dry_run: bool = False  # coordinates only, no pixels
    label_min_coverage: float = 0.5  # a tile takes a class covering at least this fraction

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"target mpp must be positive, got {self.target_mpp}")
        if self.tile_size_px < 8:
            raise ValueError(f"tile size must be at least 8 px, got {self.tile_size_px}")
        if self.stride_px is not None and self.stride_px < 1:
            raise ValueError(f"stride must be at least 1 px, got {self.stride_px}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min tissue fraction must be in 0-1, got {self.min_tissue_fraction}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be 1-100, got {self.jpeg_quality}")

    @property
    def effective_stride_px(self) -> int:
        return self.stride_px if self.stride_px is not None else self.tile_size_px

    @property
    def overlap_px(self) -> int:
        return max(0, self.tile_size_px - self.effective_stride_px)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilingParams:
        data = dict(data)
        data["tissue"] = TissueParams(**data.get("tissue", {}))
        return cls(**data)

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        """Identifies the parameters (plus per-slide extras) for resume decisions."""
        text = json.dumps({"params": self.to_dict(), "extra": extra or {}}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
