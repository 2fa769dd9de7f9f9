"""Per-tile scores of one slide: what prediction produces and every picture is drawn from.

:class:`SlideScores` is the type that passes from prediction (``histoduo.predict``) to its
outputs and to the maps (``histoduo.results.maps``); ``scores.npz`` is its file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.runtime.files import atomic_write


@dataclass
class SlideScores:
    """Everything ``scores.npz`` holds; enough to redraw every picture without the model."""

    slide: str
    probs: np.ndarray  # (N, K) float32
    coords: np.ndarray  # (N, 2) int64 level-0 top-left
    tissue_fraction: np.ndarray  # (N,) float32
    tile_size_level0: int
    stride_level0: int
    class_names: list[str]
    class_colors: np.ndarray  # (K, 3) uint8
    thumbnail: np.ndarray  # (h, w, 3) uint8
    thumbnail_downsample: float
    tissue_mask: np.ndarray  # (hm, wm) bool
    mask_downsample: float
    level0_width: int
    level0_height: int
    slide_mpp: float
    target_mpp: float
    tile_size_px: int
    # Names people read, in class order (histoduo.results.display); None: derived from the ids.
    class_display_names: list[str] | None = None
    # Tumour grade classes low -> high (checkpoint roles); None: grade map paints every class.
    grade_classes: list[str] | None = None
    # Artefact QC (histoduo.qc), None when not checked: per tile the pen/fold share and blur
    # score (0-1), the FLAG_* byte and whether the grade left the tile out; the artefacts'
    # FLAG_* bits per pixel of the tissue-mask grid, for the QC overlay.
    qc_pen: np.ndarray | None = None
    qc_blur: np.ndarray | None = None
    qc_fold: np.ndarray | None = None
    qc_flags: np.ndarray | None = None
    qc_excluded: np.ndarray | None = None
    qc_labels: np.ndarray | None = None

    @property
    def qc_checked(self) -> bool:
        return self.qc_flags is not None

    def kept(self) -> np.ndarray:
        """Tiles the grade uses (all of them unless QC excluded some)."""
        if self.qc_excluded is None:
            return np.ones(len(self.probs), dtype=bool)
        return ~np.asarray(self.qc_excluded, dtype=bool)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def display_names(self) -> list[str]:
        from histoduo.results.display import default_display_name

        given = self.class_display_names or []
        if len(given) == len(self.class_names):
            return list(given)
        return [default_display_name(c) for c in self.class_names]

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in asdict(self).items() if v is not None}
        for key in ("class_names", "class_display_names", "grade_classes"):
            if key in arrays:
                arrays[key] = np.array(arrays[key], dtype=str).reshape(-1)
        with atomic_write(path, "wb") as handle:
            np.savez_compressed(handle, **{k: np.asarray(v) for k, v in arrays.items()})

    @classmethod
    def load(cls, path: str | Path) -> SlideScores:
        """The scores of ``path``; ValueError naming the file when it is cut short or not a
        scores file (a killed copy, a full disk)."""
        import zipfile

        try:
            return cls._load(path)
        except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(
                f"{path}: truncated or not a histoduo scores file ({type(exc).__name__}: "
                f"{str(exc)[:120]}); run predict for this slide again to rewrite it"
            ) from None

    @classmethod
    def _load(cls, path: str | Path) -> SlideScores:
        with np.load(path, allow_pickle=False) as data:
            values: dict[str, Any] = {k: data[k] for k in data.files}
        values["slide"] = str(values["slide"])
        for old, new in (("slide_width", "level0_width"), ("slide_height", "level0_height")):
            if old in values:  # scores files written before the one-name rename
                values[new] = values.pop(old)
        for key in ("tile_size_level0", "stride_level0", "level0_width", "level0_height"):
            values[key] = int(values[key])
        values["tile_size_px"] = int(values["tile_size_px"])
        for key in ("thumbnail_downsample", "mask_downsample", "slide_mpp", "target_mpp"):
            values[key] = float(values[key])
        for key in ("class_names", "class_display_names", "grade_classes"):
            if key in values:  # the last two are absent in older scores files
                values[key] = [str(c) for c in values[key]]
        values["tissue_mask"] = values["tissue_mask"].astype(bool)
        if "qc_excluded" in values:
            values["qc_excluded"] = values["qc_excluded"].astype(bool)
        return cls(**values)
