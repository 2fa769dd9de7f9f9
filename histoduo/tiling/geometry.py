"""Where tiles go: a slide's tile footprint, the tile grid, and which grid tiles hold tissue."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoduo.slide import Slide, SlideError, open_slide
from histoduo.tiling.params import TilingParams
from histoduo.tissue import NoTissueError, TissueMask


@dataclass(frozen=True)
class TileGeometry:
    """A slide's tile footprint: sizes in level-0 px and the level tiles are read from.

    Each tile is the square of ``read_size_px`` px read at ``read_level`` (an integer square,
    so CLAM's ``read_region(xy, patch_level, (patch_size, patch_size))`` reads exactly the
    same pixels), resized to the tile size; ``tile_size_level0`` is that square's level-0
    footprint.
    """

    slide_mpp: float
    tile_size_level0: int
    stride_level0: int
    read_level: int
    read_level_downsample: float
    read_size_px: int

    @classmethod
    def for_slide(cls, slide: Slide, params: TilingParams) -> TileGeometry:
        slide_mpp = slide.require_mpp()
        scale = params.target_mpp / slide_mpp
        if scale < 0.9:
            raise SlideError(
                slide.path,
                f"target resolution {params.target_mpp:g} um/px is finer than the slide's own "
                f"{slide_mpp:g} um/px; choose --mpp >= {slide_mpp:g} (or a lower --mag)",
            )
        level = slide.best_level_for_downsample(scale)
        level_ds = slide.level_downsamples[level]
        # Whole pixels of the read level, for the footprint and for the grid step: corners
        # then fall on that level's pixel grid, where every reader rounds them the same way.
        read_px = max(1, round(params.tile_size_px * scale / level_ds))
        stride_read_px = max(1, round(params.effective_stride_px * scale / level_ds))
        size0 = max(1, round(read_px * level_ds))
        stride0 = max(1, round(stride_read_px * level_ds))
        return cls(slide_mpp, size0, stride0, level, level_ds, read_px)


def tile_grid(width0: int, height0: int, size0: int, stride0: int) -> np.ndarray:
    """Level-0 top-left corners of every tile fully inside the slide, row-major.

    The grid starts at (0, 0) for every slide, so tiles align with the scanner's own JPEG
    tiles and no source tile is decoded twice by neighbouring tiles.
    """
    xs = np.arange(0, max(width0 - size0, -1) + 1, stride0, dtype=np.int64)
    ys = np.arange(0, max(height0 - size0, -1) + 1, stride0, dtype=np.int64)
    if len(xs) == 0 or len(ys) == 0:
        return np.empty((0, 2), dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def plan_tiles(
    mask: TissueMask, geometry: TileGeometry, width0: int, height0: int, min_tissue: float
) -> tuple[np.ndarray, np.ndarray]:
    """(coords, tissue fraction) of grid tiles with at least ``min_tissue`` tissue."""
    grid = tile_grid(width0, height0, geometry.tile_size_level0, geometry.stride_level0)
    if len(grid) == 0:
        return grid, np.empty(0, dtype=np.float32)
    fractions = mask.fractions_in_boxes(grid, float(geometry.tile_size_level0))
    # A tile with no tissue at all never qualifies, even when min_tissue is 0.
    keep = (fractions >= min_tissue) & (fractions > 0)
    return grid[keep], fractions[keep].astype(np.float32)


def require_tiles(
    coords: np.ndarray, path: str | Path, min_tissue_fraction: float, detail: str = ""
) -> None:
    """A NoTissueError (status no_tissue) when no tile qualified; ``detail`` ends the message."""
    if len(coords) == 0:
        raise NoTissueError(
            path,
            f"no tissue tiles: no tile reaches the minimum tissue fraction "
            f"{min_tissue_fraction:g}" + detail,
        )


def open_overview(path: str | Path, backend: str, mpp_override: float | None) -> Slide:
    """The slide as the parent process needs it: metadata and a low-resolution read.

    With ``auto``, OpenSlide: it opens in milliseconds, while tiffslide (faster at decoding
    the many level-0 tiles the workers read) costs a second of imports. Any file OpenSlide
    does not take falls back to the normal choice.
    """
    if backend == "auto":
        try:
            return open_slide(path, "openslide", mpp_override)
        except SlideError:
            pass
    return open_slide(path, backend, mpp_override)
