"""What a synthetic slide is: its spec (size, mpp, classes, pyramid) and the written result."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_CLASSES: tuple[str, ...] = ("normal", "low_grade", "high_grade", "necrosis")

_BLOCK_PX = 128  # level-0 block that owns a fixed set of candidate nuclei (determinism unit)
_MAX_LAYOUT_CELLS = 2048  # long side of the layout grid; keeps label maps small for any slide
_MIN_LEVEL_PX = 256  # pyramid levels smaller than this on the long side are dropped
_BG_RGB = np.array([242.0, 240.0, 243.0], dtype=np.float32)
# Marker inks as the fraction of each of R, G, B they let through.
PEN_COLOURS: dict[str, tuple[float, float, float]] = {
    "blue": (0.22, 0.38, 0.85),
    "green": (0.2, 0.65, 0.35),
    "black": (0.12, 0.12, 0.14),
    "red": (0.9, 0.12, 0.15),
}


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _level_size(size0: int, downsample: float) -> int:
    if int(downsample) == downsample:
        return _ceil_div(size0, int(downsample))
    return max(1, int(size0 / downsample))


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """Everything that determines a synthetic slide (pixels and ground truth)."""

    level0_width: int
    level0_height: int
    mpp: float = 0.25
    seed: int = 0
    format: str = "svs"
    tile_size_px: int = 256
    # Integers give ceil-sized levels, as scanners write them; a non-integer (e.g. 2.0005)
    # gives a floor-sized level whose true downsample is not a whole number, as real
    # pyramids have (15.9957 happens).
    level_downsamples: tuple[float, ...] = (1, 4, 16)
    jpeg_quality: int = 90
    classes: tuple[str, ...] = DEFAULT_CLASSES
    class_weights: tuple[float, ...] | None = None
    foci: tuple[tuple[str, float], ...] = ()
    tissue_pieces: int = 2
    tissue_coverage: float = 0.45
    region_size_um: float = 400.0
    magnification: float | None = None
    write_mpp: bool = True
    # Artefacts drawn over the slide (additive; ground truth in <stem>.artefacts.geojson):
    # one marker stroke per colour listed (blue, green, black, red), out-of-focus vertical
    # bands of blur_sigma_um defocus, and tissue folds (tissue lying twice over itself).
    pen_strokes: tuple[str, ...] = ()
    blur_bands: int = 0
    folds: int = 0
    blur_sigma_um: float = 3.0

    def __post_init__(self) -> None:
        if self.level0_width < 16 or self.level0_height < 16:
            raise ValueError("synthetic slide must be at least 16 x 16 px")
        if self.mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {self.mpp}")
        if self.format not in ("svs", "tiff"):
            raise ValueError(f"format must be 'svs' or 'tiff', got {self.format!r}")
        if self.tile_size_px % 16:
            raise ValueError("tile_size_px must be a multiple of 16 (TIFF requirement)")
        if not self.classes:
            raise ValueError("at least one class is required")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")
        if self.class_weights is not None:
            if len(self.class_weights) != len(self.classes):
                raise ValueError("class_weights must have one weight per class")
            if min(self.class_weights) < 0 or sum(self.class_weights) <= 0:
                raise ValueError("class_weights must be >= 0 with a positive sum")
        if not 0 < self.tissue_coverage < 0.9:
            raise ValueError("tissue_coverage must be in (0, 0.9)")
        for name, frac in self.foci:
            if not 0 < frac < 1:
                raise ValueError(f"focus {name!r}: area fraction must be in (0, 1)")
        if any(d < 1 for d in self.level_downsamples):
            raise ValueError("level_downsamples must be >= 1")
        unknown = [c for c in self.pen_strokes if c not in PEN_COLOURS]
        if unknown:
            raise ValueError(f"pen colours must be among {sorted(PEN_COLOURS)}, got {unknown}")
        if self.blur_bands < 0 or self.folds < 0:
            raise ValueError("blur_bands and folds must be >= 0")
        if self.blur_sigma_um <= 0:
            raise ValueError(f"blur_sigma_um must be > 0, got {self.blur_sigma_um}")

    @property
    def has_artefacts(self) -> bool:
        return bool(self.pen_strokes or self.blur_bands or self.folds)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names in label order: ``classes`` then foci classes not already listed."""
        extra: list[str] = []
        for name, _ in self.foci:
            if name not in self.classes and name not in extra:
                extra.append(name)
        return tuple(self.classes) + tuple(extra)

    @property
    def app_mag(self) -> float:
        return self.magnification if self.magnification is not None else 10.0 / self.mpp

    @property
    def level_downsamples_used(self) -> tuple[float, ...]:
        """Downsamples asked for and written (level 0 always; tiny levels dropped)."""
        out: list[float] = [1]
        for d in sorted(set(self.level_downsamples)):
            if d > 1 and max(
                _level_size(self.level0_width, d), _level_size(self.level0_height, d)
            ) >= (_MIN_LEVEL_PX):
                out.append(int(d) if int(d) == d else float(d))
        return tuple(out)

    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every written level."""
        return tuple(
            (_level_size(self.level0_width, d), _level_size(self.level0_height, d))
            for d in self.level_downsamples_used
        )

    def render_downsamples(self) -> tuple[float, ...]:
        """The downsample each level is drawn at: the asked integer, or for a non-integer
        level what readers compute from its size (mean of the width and height ratios)."""
        return tuple(
            d if int(d) == d else (self.level0_width / w + self.level0_height / h) / 2
            for d, (w, h) in zip(self.level_downsamples_used, self.level_dimensions())
        )
