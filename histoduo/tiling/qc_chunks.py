"""Tile workers with QC: read a chunk, measure each tile's blur, then encode it.

Blur is measured from the decoded pixels the worker already holds, before JPEG, so QC costs
one pass over pixels in memory and no extra read or decode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from histoduo.qc import QCParams, tile_blur_scores
from histoduo.runtime.codec import encode_jpeg
from histoduo.tiling import read as tileio


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
