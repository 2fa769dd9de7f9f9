"""Artefact QC: pen ink, folds and out-of-focus blur, found before tiles are graded.

``params`` holds the thresholds (:class:`QCParams`) and the flag bits; ``detect`` the
detectors, per-tile scores and slide burdens. The layer sits above ``histoduo.tissue`` (whose
colour helpers it shares) and below ``histoduo.store``.
"""

from typing import Any

from histoduo.qc.params import (
    ARTEFACTS,
    DEFAULT_QC_MODE,
    FLAG_BITS,
    FLAG_BLUR,
    FLAG_CHECKED,
    FLAG_FOLD,
    FLAG_PEN,
    QC_MODES,
    QCParams,
    check_mode,
)

# The detectors (numpy, scipy) load on first use, so the CLI can read the defaults above
# without paying for them at start-up.
_DETECT = (
    "ArtefactMasks",
    "TileQC",
    "block_sharpness",
    "detect_artefacts",
    "detect_folds",
    "detect_pen",
    "optical_density",
    "slide_burdens",
    "tile_blur_score",
    "tile_blur_scores",
    "tile_flags",
    "tile_qc",
)


def __getattr__(name: str) -> Any:
    if name in _DETECT:
        from histoduo.qc import detect

        return getattr(detect, name)
    raise AttributeError(f"module 'histoduo.qc' has no attribute {name!r}")


__all__ = [
    "ARTEFACTS",
    "DEFAULT_QC_MODE",
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
