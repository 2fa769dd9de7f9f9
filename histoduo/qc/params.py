"""QC settings: every threshold of the artefact detectors, with units in the names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

QC_MODES = ("exclude", "flag", "off")
# exclude: flagged tiles stay in the store and tables but leave training, the grade and MIL
# (docs/qc.md says why this is the default).
DEFAULT_QC_MODE = "exclude"
ARTEFACTS = ("pen", "blur", "fold")
# Bits of the per-tile ``qc_flags`` byte. CHECKED is set on every tile QC looked at, so a
# zero byte can never be mistaken for "clean" (stores written before QC have no flags at all).
FLAG_PEN = 1
FLAG_BLUR = 2
FLAG_FOLD = 4
FLAG_CHECKED = 128
FLAG_BITS = {"pen": FLAG_PEN, "blur": FLAG_BLUR, "fold": FLAG_FOLD}
# What `exclude` leaves out: pen and blur. Folds are flagged and shown, never excluded: the
# fold detector cannot tell a fold from dense tumour (recall 0.07-0.31 on synthetic folds,
# docs/qc.md), and excluding it dropped every high-grade training tile of a synthetic
# cohort, so the grade would have lost exactly the tumour it exists to find.
EXCLUDED_BITS = FLAG_PEN | FLAG_BLUR


@dataclass(frozen=True, kw_only=True)
class QCParams:
    """Thresholds of the classical artefact detectors (see docs/qc.md for how each was set).

    Pen and fold work on the tissue thumbnail (``TissueParams.mask_mpp``, 4 um/px by default);
    blur on each tile's own pixels at the target resolution.
    """

    # --- pen ink (thumbnail): hue bands H&E never reaches with real saturation
    pen_min_saturation: float = 0.25  # blue/green ink: HSV saturation at least this
    pen_hue_min_deg: float = 70.0  # blue/green ink hue band (H&E: 255-360 and 0-20 deg)
    pen_hue_max_deg: float = 250.0
    pen_red_min_saturation: float = 0.65  # red ink is far more saturated than eosin
    pen_red_hue_halfwidth_deg: float = 12.0  # red ink: hue within this of 0 deg
    pen_black_max_value: float = 0.25  # black ink: HSV value (max channel, 0-1) below this
    pen_dilate_um: float = 8.0  # stroke edges are fainter than their core
    pen_min_area_um2: float = 2000.0  # smaller specks are dust, not a stroke
    # --- folds (thumbnail): doubled tissue absorbs about twice the light
    fold_od_ratio: float = 1.5  # optical density >= this x the median OD of the tissue around
    fold_background_um: float = 150.0  # side of the square "around" (wider than a fold)
    fold_min_od: float = 0.45  # and at least this (sum over RGB), so pale slides have no folds
    fold_smoothing_um: float = 12.0
    fold_floor_um: float = 0.0  # grey opening: the density of the lightest parts nearby
    fold_min_area_um2: float = 4000.0
    # --- blur (tile pixels, in blocks): RMS Laplacian of optical density over mean optical
    # density, so stain density cancels out; a block below the threshold is out of focus
    blur_min_sharpness: float = 0.10
    blur_block_px: int = 64  # blocks of this side (target px) are judged one by one
    blur_min_tissue_fraction: float = 0.5  # blocks with less tissue are not judged
    # --- per-tile flags and the slide's verdict
    pen_max_tile_fraction: float = 0.2  # a tile is "pen" when ink covers this share of it
    fold_max_tile_fraction: float = 0.25
    blur_max_tile_fraction: float = 0.5  # a tile is "blur" when this share of it is
    max_burden: float = 0.10  # artefacts over this share of the tumour: uncertain call

    def __post_init__(self) -> None:
        for name in (
            "pen_min_saturation",
            "pen_red_min_saturation",
            "pen_black_max_value",
            "blur_min_tissue_fraction",
            "pen_max_tile_fraction",
            "fold_max_tile_fraction",
            "blur_max_tile_fraction",
            "max_burden",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"QC {name} must be in 0-1, got {value}")
        if not 0.0 <= self.pen_hue_min_deg < self.pen_hue_max_deg <= 360.0:
            raise ValueError(
                f"QC pen hue band must satisfy 0 <= min < max <= 360, got "
                f"{self.pen_hue_min_deg}-{self.pen_hue_max_deg}"
            )
        if not 0.0 <= self.pen_red_hue_halfwidth_deg <= 60.0:
            raise ValueError("QC pen_red_hue_halfwidth_deg must be in 0-60")
        for name in (
            "pen_dilate_um",
            "pen_min_area_um2",
            "fold_smoothing_um",
            "fold_floor_um",
            "fold_min_area_um2",
            "fold_background_um",
            "fold_min_od",
            "blur_min_sharpness",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"QC {name} must be >= 0, got {getattr(self, name)}")
        if self.blur_block_px < 8:
            raise ValueError(f"QC blur_block_px must be at least 8, got {self.blur_block_px}")
        if self.fold_od_ratio <= 1.0:
            raise ValueError(f"QC fold_od_ratio must be > 1, got {self.fold_od_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QCParams:
        return cls(**data)


def excluded_tiles(
    flags: np.ndarray | None, qc: str | None, tiled_mode: str | None
) -> np.ndarray | None:
    """bool per tile: what QC policy leaves out of training, the grade and MIL; None when
    nothing is left out. ``qc`` "exclude" leaves the pen/blur-flagged tiles out, "flag" and
    "off" none; None follows ``tiled_mode``, the --qc the slide was tiled with. ``flags``
    None: QC never checked the slide, so nothing is left out."""
    if flags is None or qc in ("flag", "off") or (qc or tiled_mode) != "exclude":
        return None
    return (np.asarray(flags) & EXCLUDED_BITS) > 0


def check_mode(mode: str) -> str:
    """``mode`` if it is a QC policy, else a ValueError naming the choices."""
    if mode not in QC_MODES:
        raise ValueError(f"QC mode must be one of {', '.join(QC_MODES)}, got {mode!r}")
    return mode
