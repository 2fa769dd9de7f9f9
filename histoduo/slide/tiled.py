"""Direct reads of a tiled TIFF pyramid level: decode exactly the tiles an area covers.

tiffslide reads through zarr, whose asynchronous machinery costs about 4 ms per call on
this kind of machine, while decoding the four 256 px JPEG tiles of a 512 px region takes
about 1.4 ms. For the plain case (one tiled page per level, 8-bit RGB, chunky samples) this
module reads the tiles' bytes and decodes them with the page's own tifffile decoder, the one
tiffslide's zarr store calls, so the pixels are the same; anything else stays on tiffslide.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TiledLevel:
    """One pyramid level stored as a single tiled TIFF page."""

    def __init__(self, page: Any, filehandle: Any) -> None:
        self._page = page
        self._fh = filehandle
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.tiles_across = -(-self.width // self.tile_w)
        self._fill = int(page.nodata or 0)  # tifffile's fill for tiles never written
        self._decode_args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            self._decode_args["jpegtables"] = page.jpegtables

    @classmethod
    def for_level(cls, tif: Any, series_index: int, level: int) -> TiledLevel | None:
        """The level's reader, or None when it is not the plain case this module handles."""
        from tifffile import TiffPage

        series = tif.series[series_index]
        if level >= len(series.levels):
            return None
        level_series = series.levels[level]
        if len(level_series.pages) != 1:
            return None
        page = level_series.pages[0]
        if not isinstance(page, TiffPage):  # a TiffFrame borrows its keyframe's tags: leave it
            return None
        plain = (
            page.is_tiled
            and not page.is_ndpi
            and page.jpegheader is None
            and int(page.imagedepth) == 1
            and int(page.tiledepth) == 1
            and int(page.planarconfig) == 1
            and int(page.samplesperpixel) == 3
            and page.dtype == np.uint8
            and len(page.dataoffsets)
            == -(-int(page.imagelength) // int(page.tilelength))
            * -(-int(page.imagewidth) // int(page.tilewidth))
        )
        if not plain:
            return None
        # tifffile's handle does not lock by default; a seek + read must not interleave with
        # another thread's on the same slide object.
        tif.filehandle.set_lock(True)
        return cls(page, tif.filehandle)

    def _tile(self, row: int, col: int) -> np.ndarray | None:
        index = row * self.tiles_across + col
        offset = int(self._page.dataoffsets[index])
        count = int(self._page.databytecounts[index])
        if offset == 0 or count == 0:
            return None
        with self._fh.lock:
            self._fh.seek(offset)
            data = self._fh.read(count)
        if len(data) != count:
            raise ValueError(f"tile {index} is truncated ({len(data)} of {count} bytes)")
        decoded = self._page.decode(data, index, **self._decode_args)[0]
        return decoded.reshape(self.tile_h, self.tile_w, 3)

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB (height, width, 3) of the area at level pixels (x, y); it must lie inside."""
        if x < 0 or y < 0 or x + width > self.width or y + height > self.height:
            raise ValueError(f"area {x},{y} {width}x{height} is outside the level")
        out = np.empty((height, width, 3), dtype=np.uint8)
        for row in range(y // self.tile_h, (y + height - 1) // self.tile_h + 1):
            top = row * self.tile_h
            y0, y1 = max(y, top), min(y + height, top + self.tile_h)
            for col in range(x // self.tile_w, (x + width - 1) // self.tile_w + 1):
                left = col * self.tile_w
                x0, x1 = max(x, left), min(x + width, left + self.tile_w)
                tile = self._tile(row, col)
                target = out[y0 - y : y1 - y, x0 - x : x1 - x]
                if tile is None:
                    target[...] = self._fill
                else:
                    target[...] = tile[y0 - top : y1 - top, x0 - left : x1 - left]
        return out
