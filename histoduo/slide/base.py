"""The reader interface every backend implements: RGB uint8, level-0 coordinates, white outside."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from histoduo.slide.info import (
    _MAX_WHOLE_READ_PX,
    SlideError,
    SlideInfo,
    magnification_from_properties,
    mpp_from_properties,
    mpp_to_magnification,
    slide_name,
)


class Slide:
    """A whole-slide image: level-0 coordinates in, RGB uint8 arrays out.

    Open with :func:`open_slide`. Use as a context manager, or call :meth:`close`.
    """

    backend: str = ""

    def __init__(self, path: Path, mpp_override: float | None = None) -> None:
        self.path = path
        self.name = slide_name(path)
        self._mpp_override = mpp_override

    # --- what each backend provides ---------------------------------------------------------
    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    @property
    def level_downsamples(self) -> list[float]:
        raise NotImplementedError

    @property
    def properties(self) -> Mapping[str, str]:
        return {}

    @property
    def associated_image_names(self) -> list[str]:
        return []

    @property
    def vendor(self) -> str:
        return str(self.properties.get("openslide.vendor", "")) or "unknown"

    def _read_raw(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB (height, width, 3) uint8 of an in-bounds area; x, y at level 0."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    # --- shared behaviour -------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        if self._mpp_override is not None:
            return self._mpp_override
        return mpp_from_properties(self.properties)[0]

    @property
    def mpp_source(self) -> str:
        if self._mpp_override is not None:
            return "override"
        return mpp_from_properties(self.properties)[1]

    @property
    def magnification(self) -> float | None:
        found = magnification_from_properties(self.properties)
        if found is not None:
            return found
        mpp = self.mpp
        return mpp_to_magnification(mpp) if mpp else None

    def require_mpp(self) -> float:
        """The slide's mpp, or a SlideError that says how to supply it."""
        mpp = self.mpp
        if mpp is None:
            raise SlideError(
                self.path,
                "no resolution (microns per pixel) in the slide's metadata; pass --slide-mpp "
                "or give an 'mpp' column in a slide CSV",
            )
        return mpp

    def info(self) -> SlideInfo:
        width, height = self.dimensions
        return SlideInfo(
            path=str(self.path),
            name=self.name,
            backend=self.backend,
            vendor=self.vendor,
            level0_width=width,
            level0_height=height,
            level_dimensions=[tuple(d) for d in self.level_dimensions],
            level_downsamples=[float(d) for d in self.level_downsamples],
            mpp=self.mpp,
            mpp_source=self.mpp_source,
            magnification=self.magnification,
            associated_images=list(self.associated_image_names),
        )

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample``."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB (h, w, 3) uint8 at ``level``, top-left ``location`` in level-0 pixels.

        Parts outside the image are white, so edge tiles look like glass, not black.
        """
        x0, y0 = int(location[0]), int(location[1])
        width, height = int(size[0]), int(size[1])
        level_w, level_h = self.level_dimensions[level]
        level_ds = self.level_downsamples[level]
        # Work in level pixels to clip, then convert the clipped origin back to level 0.
        lx0, ly0 = math.floor(x0 / level_ds), math.floor(y0 / level_ds)
        cx0, cy0 = max(lx0, 0), max(ly0, 0)
        cx1, cy1 = min(lx0 + width, level_w), min(ly0 + height, level_h)
        if cx0 == lx0 and cy0 == ly0 and cx1 - cx0 == width and cy1 - cy0 == height:
            return self._read_raw(x0, y0, level, width, height)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            # Shift by whole level pixels so the read stays on the same level-pixel grid.
            rx = x0 + round((cx0 - lx0) * level_ds)
            ry = y0 + round((cy0 - ly0) * level_ds)
            patch = self._read_raw(rx, ry, level, cx1 - cx0, cy1 - cy0)
            out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = patch
        return out

    def read_resized(
        self,
        location: tuple[int, int],
        size_level0: tuple[int, int],
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """The level-0 area ``size_level0`` at ``location``, resampled to ``out_size`` (w, h).

        Reads the level just finer than the needed downsample, then resizes, so the result
        never depends on non-integer level downsamples being rounded.
        """
        downsample = min(size_level0[0] / out_size[0], size_level0[1] / out_size[1])
        level = self.best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        read_w = max(1, round(size_level0[0] / level_ds))
        read_h = max(1, round(size_level0[1] / level_ds))
        region = self.read_region(location, level, (read_w, read_h))
        return resize_rgb(region, out_size)

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` x level 0, never loading a large level whole."""
        width0, height0 = self.dimensions
        out_w = max(1, round(width0 / downsample))
        out_h = max(1, round(height0 / downsample))
        level = self.best_level_for_downsample(downsample)
        level_w, level_h = self.level_dimensions[level]
        level_ds = self.level_downsamples[level]
        if level_w * level_h > MAX_OVERVIEW_LEVEL_PX:
            # Bounded work: an overview from a level this large decodes every pixel of it
            # (hours, with no pyramid to read instead), so say so rather than start.
            raise SlideError(
                self.path,
                f"its coarsest usable level is {level_w:,} x {level_h:,} px "
                f"({level_w * level_h / 1e9:.1f} Gpx, limit {MAX_OVERVIEW_LEVEL_PX / 1e9:g}): "
                "without a smaller pyramid level its overview alone means decoding every "
                "pixel; write it with a pyramid (e.g. `vips tiffsave in out.tif --tile "
                "--pyramid`)",
            )
        if level_w * level_h <= _MAX_WHOLE_READ_PX:
            return resize_rgb(self.read_region((0, 0), level, (level_w, level_h)), (out_w, out_h))
        # Strips of whole output rows, each read at the level and shrunk on its own.
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        rows_per_strip = max(1, _MAX_WHOLE_READ_PX // 4 // max(level_w, 1))
        out_rows = max(1, int(rows_per_strip * level_ds / downsample))
        for oy in range(0, out_h, out_rows):
            oh = min(out_rows, out_h - oy)
            y0 = round(oy * downsample)
            y1 = min(height0, round((oy + oh) * downsample))
            strip_h = max(1, round((y1 - y0) / level_ds))
            strip = self.read_region((0, y0), level, (level_w, strip_h))
            out[oy : oy + oh] = resize_rgb(strip, (out_w, oh))
        return out

    def thumbnail(self, max_size_px: int = 1024) -> tuple[np.ndarray, float]:
        """(RGB thumbnail whose long side is at most ``max_size_px``, its downsample)."""
        width0, height0 = self.dimensions
        downsample = max(width0, height0) / max_size_px
        downsample = max(downsample, 1.0)
        return self.read_downsampled(downsample), downsample


# The largest level an overview (thumbnail, tissue mask) is computed from: 2.5 Gpx, e.g.
# 50,000 x 50,000 px, minutes of decoding. Pyramidal slides read a level far below this.
MAX_OVERVIEW_LEVEL_PX = 2_500_000_000


def resize_rgb(image: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB array to (width, height) with area-averaging when shrinking."""
    from PIL import Image

    out_w, out_h = int(out_size[0]), int(out_size[1])
    if image.shape[1] == out_w and image.shape[0] == out_h:
        return image
    pil = Image.fromarray(image)
    factor_x, factor_y = image.shape[1] / out_w, image.shape[0] / out_h
    if factor_x == factor_y and factor_x == int(factor_x) and factor_x > 1:
        # Integer shrink: an exact box filter, several times faster than a generic resize.
        return np.asarray(pil.reduce(int(factor_x)))
    resample = Image.Resampling.BOX if min(factor_x, factor_y) >= 1 else Image.Resampling.BILINEAR
    return np.asarray(pil.resize((out_w, out_h), resample=resample))


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA to RGB over white (transparent = outside the scanned area)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
