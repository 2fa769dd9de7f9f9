"""Slides -> tissue -> tiles in an HDF5 tile store (``histoduo tile``).

- :mod:`~histoduo.tiling.params`: :class:`TilingParams`, how tiles are cut.
- :mod:`~histoduo.tiling.geometry`: tile footprint, grid and tissue selection.
- :mod:`~histoduo.tiling.labels`: per-tile labels from QuPath annotations.
- :mod:`~histoduo.tiling.run`: :func:`tile_slides`, the resumable per-slide run.
- :mod:`~histoduo.tiling.report`: the run report.
"""

from histoduo.runtime.pool import default_workers
from histoduo.tiling.geometry import TileGeometry, open_overview, plan_tiles, tile_grid
from histoduo.tiling.labels import Labeller
from histoduo.tiling.params import ENCODINGS, TilingParams
from histoduo.tiling.read import read_tile
from histoduo.tiling.report import SlideResult, TilingReport, summarise
from histoduo.tiling.run import tile_slides

__all__ = [
    "ENCODINGS",
    "Labeller",
    "SlideResult",
    "TileGeometry",
    "TilingParams",
    "TilingReport",
    "default_workers",
    "open_overview",
    "plan_tiles",
    "read_tile",
    "summarise",
    "tile_grid",
    "tile_slides",
]
