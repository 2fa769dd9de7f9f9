"""A slide's tiles in chunks for the workers, with artefact QC riding along.

Workers read a chunk (and, with QC, measure each tile's blur from the pixels they already
hold, before JPEG: one pass over pixels in memory, no extra read or decode), then encode it.
The writer gathers the blur scores and stores the per-tile QC beside ``tissue_fraction``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from histoduo.qc import QCParams, slide_burdens, tile_blur_scores, tile_qc
from histoduo.runtime.codec import encode_jpeg
from histoduo.slide.sources import SlideSource
from histoduo.tiling import read as tileio

CHUNK_TILES = 16  # small enough that the last chunks balance across workers


@dataclass(frozen=True)
class QCChunkTask:
    task: tileio.ChunkTask
    params: QCParams


def read_chunk_qc(job: QCChunkTask) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
    """(tiles encoded as ``job.task`` asks, blur score of each tile)."""
    task = job.task
    tiles = tileio.read_chunk(replace(task, encoding=None))
    blur = tile_blur_scores(tiles, job.params)
    if task.encoding == "jpeg":
        return [encode_jpeg(t, task.jpeg_quality) for t in tiles], blur
    return tiles, blur


def tile_blocks(
    source: SlideSource,
    coords: np.ndarray,
    geometry: Any,
    params: Any,
    backend: str,
    pool: Any,
    qc: QCParams | None = None,
) -> Iterator[Any]:
    """The slide's tiles in order, in blocks; with a pool, dispatched right away. With
    ``qc`` each block is (tiles, blur scores), measured in the worker."""
    tasks = [
        tileio.ChunkTask(
            slide_path=str(source.path),
            backend=backend,
            mpp_override=source.mpp,
            coords=coords[start : start + CHUNK_TILES],
            tile_size_px=params.tile_size_px,
            encoding=params.encoding,
            jpeg_quality=params.jpeg_quality,
            read_level=geometry.read_level,
            read_size_px=geometry.read_size_px,
        )
        for start in range(0, len(coords), CHUNK_TILES)
    ]
    reader: Any = tileio.read_chunk
    jobs: list[Any] = tasks
    if qc is not None:
        reader, jobs = read_chunk_qc, [QCChunkTask(task, qc) for task in tasks]
    if pool is not None:
        return pool.imap(reader, jobs)
    return _in_process(reader, jobs)


def _in_process(reader: Any, jobs: list[Any]) -> Iterator[Any]:
    try:
        for job in jobs:
            yield reader(job)
    finally:
        tileio.close_cached_slide()


class BlurCollector:
    """Passes the tiles of each block on and keeps the blur scores QC workers sent with them."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def tiles(self, blocks: Iterable[Any]) -> Iterator[Any]:
        for block in blocks:
            if isinstance(block, tuple):  # (tiles, blur scores) from a QC worker
                block, scores = block
                self._parts.append(scores)
            yield block

    @property
    def scores(self) -> np.ndarray | None:
        """Blur score per tile, or None when no QC worker measured any."""
        return np.concatenate(self._parts) if self._parts else None


def store_slide_qc(
    writer: Any, plan: Any, blur: np.ndarray | None, params: QCParams | None, mode: str
) -> dict[str, float]:
    """Write a planned slide's per-tile QC and summary through its ``SlidePartWriter``
    (before the commit); returns its burdens ({} when QC is off). ``blur`` None: not
    measured (a store without pixels)."""
    if params is None or plan.artefacts is None:
        return {}
    tiles = tile_qc(plan.artefacts, plan.coords, plan.geometry.tile_size_level0, blur, params)
    burdens = slide_burdens(plan.artefacts, tiles, plan.fractions)
    info = {
        "mode": mode,
        "blur_measured": blur is not None,
        "params": params.to_dict(),
        "burdens": burdens,
    }
    datasets = {"qc_pen": tiles.pen, "qc_blur": tiles.blur, "qc_fold": tiles.fold}
    writer.set_qc({**datasets, "qc_flags": tiles.flags}, json.dumps(info))
    return burdens
