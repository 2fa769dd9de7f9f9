"""Artefact QC: pen ink, folds and out-of-focus blur, found before tiles are graded.

``params`` holds the thresholds (:class:`QCParams`) and the flag bits; ``detect`` the
detectors, per-tile scores and slide burdens. The layer sits above ``histoduo.tissue`` (whose
colour helpers it shares) and below ``histoduo.store``.
"""

from histoduo.qc.detect import (
    ArtefactMasks,
    TileQC,
    block_sharpness,
    detect_artefacts,
    detect_folds,
    detect_pen,
    optical_density,
    slide_burdens,
    tile_blur_score,
    tile_blur_scores,
    tile_flags,
    tile_qc,
)
from histoduo.qc.params import (
    ARTEFACTS,
    FLAG_BITS,
    FLAG_BLUR,
    FLAG_CHECKED,
    FLAG_FOLD,
    FLAG_PEN,
    QC_MODES,
    QCParams,
    check_mode,
)

__all__ = [
    "ARTEFACTS",
    "FLAG_BITS",
    "FLAG_BLUR",
    "FLAG_CHECKED",
    "FLAG_FOLD",
    "FLAG_PEN",
    "QC_MODES",
    "ArtefactMasks",
    "QCParams",
    "TileQC",
    "block_sharpness",
    "check_mode",
    "detect_artefacts",
    "detect_folds",
    "detect_pen",
    "optical_density",
    "slide_burdens",
    "tile_blur_scores",
    "tile_flags",
    "tile_qc",
    "tile_blur_score",
]
