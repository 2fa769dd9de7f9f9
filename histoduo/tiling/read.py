"""Reading and encoding tiles, the work done inside tiling and prediction worker processes.

Kept light on imports (the slide reader and imagecodecs only) so worker processes start fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoduo.runtime.codec import encode_jpeg
from histoduo.slide import Slide, open_slide, resize_rgb

# What a tile worker imports; the fork server loads these once, so each worker starts
# without paying for them (tiffslide's imports cost about a second).
WORKER_PRELOAD = ("histoduo.tiling.read", "tiffslide", "openslide", "imagecodecs", "PIL.Image")


def read_tile(
    slide: Slide, xy0: Sequence[int], read_level: int, read_size_px: int, tile_size_px: int
) -> np.ndarray:
    """One tile: the ``read_size_px`` square at ``read_level`` whose top-left is level-0
    ``xy0``, resized to ``tile_size_px``.

    The one tile reader: tiling, prediction from a slide and anything else that cuts tiles
    call it with the slide's :class:`~histoduo.tiling.geometry.TileGeometry`, so the tiles a
    model is trained on are the tiles it is later graded on, and CLAM's
    ``read_region(xy, patch_level, (patch_size, patch_size))`` reads the same pixels.
    """
    region = slide.read_region((int(xy0[0]), int(xy0[1])), read_level, (read_size_px, read_size_px))
    return resize_rgb(region, (tile_size_px, tile_size_px))


@dataclass(frozen=True)
class ChunkTask:
    """A run of tiles of one slide for one worker to read (and encode)."""

    slide_path: str
    backend: str
    mpp_override: float | None
    coords: np.ndarray
    read_level: int
    read_size_px: int
    tile_size_px: int
    encoding: str | None  # "jpeg", "raw" or None (decoded arrays, for prediction)
    jpeg_quality: int = 90


class SlideCache:
    """The one slide a worker has open; switching slides closes the previous one."""

    def __init__(self) -> None:
        self._key: tuple[str, str, float | None] | None = None
        self._slide: Slide | None = None

    def get(self, path: str, backend: str, mpp_override: float | None) -> Slide:
        key = (path, backend, mpp_override)
        if self._slide is None or self._key != key:
            self.close()
            self._slide = open_slide(path, backend, mpp_override)
            self._key = key
        return self._slide

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
        self._slide, self._key = None, None


_cache = SlideCache()  # per worker process: each process opens its own handle


def warm_up() -> None:
    """Pool initializer: importing this module is the point (done while the parent works)."""
    import imagecodecs  # noqa: F401


def read_chunk(task: ChunkTask) -> list[np.ndarray] | np.ndarray:
    slide = _cache.get(task.slide_path, task.backend, task.mpp_override)
    level, side, size = task.read_level, task.read_size_px, task.tile_size_px
    tiles = [read_tile(slide, xy, level, side, size) for xy in task.coords]
    if task.encoding == "jpeg":
        return [encode_jpeg(t, task.jpeg_quality) for t in tiles]
    if not tiles:
        return np.empty((0, task.tile_size_px, task.tile_size_px, 3), dtype=np.uint8)
    return np.stack(tiles)


def close_cached_slide() -> None:
    _cache.close()
