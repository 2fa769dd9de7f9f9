"""Per-tile scores of one slide: what prediction produces and every picture is drawn from.

:class:`SlideScores` is the type that passes from prediction (``histoduo.predict``) to its
outputs and to the maps (``histoduo.heatmap``); ``scores.npz`` is its file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.run.files import atomic_write

SCORES_FILE = "scores.npz"


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
    slide_width: int
    slide_height: int
    slide_mpp: float
    target_mpp: float
    tile_size_px: int

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def save(self, path: Path) -> None:
        arrays = dict(asdict(self))
        arrays["class_names"] = np.array(self.class_names, dtype=str)
        with atomic_write(path, "wb") as handle:
            np.savez_compressed(handle, **{k: np.asarray(v) for k, v in arrays.items()})

    @classmethod
    def load(cls, path: str | Path) -> SlideScores:
        with np.load(path, allow_pickle=False) as data:
            values: dict[str, Any] = {k: data[k] for k in data.files}
        values["slide"] = str(values["slide"])
        for key in ("tile_size_level0", "stride_level0", "slide_width", "slide_height"):
            values[key] = int(values[key])
        values["tile_size_px"] = int(values["tile_size_px"])
        for key in ("thumbnail_downsample", "mask_downsample", "slide_mpp", "target_mpp"):
            values[key] = float(values[key])
        values["class_names"] = [str(c) for c in values["class_names"]]
        values["tissue_mask"] = values["tissue_mask"].astype(bool)
        return cls(**values)
