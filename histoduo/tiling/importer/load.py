"""Reading images into tiles, in worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from histoduo.runtime.pool import WorkerPool
from histoduo.tiling.importer.mosaic import _cell_px
from histoduo.tiling.importer.scan import ImageEntry, ImportParams

_CHUNK_IMAGES = 32  # images per worker task


@dataclass(frozen=True)
class _LoadTask:
    paths: tuple[str, ...]
    tile_size_px: int
    cell_px: int
    encoding: str
    jpeg_quality: int


@dataclass
class _Loaded:
    tile: np.ndarray | None  # JPEG bytes or (T, T, 3) uint8
    cell: np.ndarray | None  # (c, c, 3) uint8 thumbnail cell
    error: str = ""


def square_tile(image: np.ndarray, tile_size_px: int) -> np.ndarray:
    """Centre-crop an RGB array to a square (its shorter side) and resize it to the tile."""
    from histoduo.slide import resize_rgb

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(image[top : top + side, left : left + side])
    return resize_rgb(square, (tile_size_px, tile_size_px))


def _load_one(path: str, task: _LoadTask) -> _Loaded:
    from PIL import Image

    from histoduo.runtime.codec import encode_jpeg
    from histoduo.slide import resize_rgb

    try:
        with Image.open(path) as image:
            image.load()  # the full decode: a truncated file fails here, not in training
            keep_bytes = (
                task.encoding == "jpeg"
                and image.format == "JPEG"
                and image.mode == "RGB"
                and image.size == (task.tile_size_px, task.tile_size_px)
            )
            rgb = np.asarray(image.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
        return _Loaded(None, None, f"cannot decode ({type(exc).__name__}: {exc})")
    tile = square_tile(rgb, task.tile_size_px)
    cell = resize_rgb(tile, (task.cell_px, task.cell_px))
    if keep_bytes:  # already the right size: no second lossy JPEG pass
        return _Loaded(np.fromfile(path, dtype=np.uint8), cell)
    if task.encoding == "jpeg":
        return _Loaded(encode_jpeg(tile, task.jpeg_quality), cell)
    return _Loaded(tile, cell)


def _load_chunk(task: _LoadTask) -> list[_Loaded]:
    return [_load_one(path, task) for path in task.paths]


def _pool(workers: int) -> Any:
    # Workers start clean (never a fork of a parent holding HDF5 handles).
    return WorkerPool(workers, ["histoduo.tiling.importer.load", "PIL.Image", "imagecodecs"])


def _load_groups(
    groups: dict[str, list[ImageEntry]], tile_size_px: int, params: ImportParams, pool: Any
) -> Iterator[tuple[str, list[ImageEntry], list[_Loaded]]]:
    """(group, its images, their decoded tiles), group by group, in order.

    Tasks of all groups go to the pool as one ordered stream, so workers stay busy across
    group boundaries while the single writer stores the previous group.
    """
    tasks: list[tuple[str, _LoadTask]] = []
    for name, members in groups.items():
        cell = _cell_px(len(members), tile_size_px)
        for start in range(0, len(members), _CHUNK_IMAGES):
            paths = tuple(str(e.path) for e in members[start : start + _CHUNK_IMAGES])
            task = _LoadTask(paths, tile_size_px, cell, params.encoding, params.jpeg_quality)
            tasks.append((name, task))
    only_tasks = (task for _, task in tasks)
    results = pool.imap(_load_chunk, only_tasks) if pool else map(_load_chunk, only_tasks)
    current: str | None = None
    loaded: list[_Loaded] = []
    for (name, _), chunk in zip(tasks, results):
        if name != current and current is not None:
            yield current, groups[current], loaded
            loaded = []
        current = name
        loaded.extend(chunk)
    if current is not None:
        yield current, groups[current], loaded
