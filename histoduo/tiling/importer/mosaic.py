"""Where imported images go: tile size and resolution, and each group's mosaic layout."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from histoduo import __version__
from histoduo.store import (
    SlideGroupData,
    SlideRecord,
    group_key,
)
from histoduo.tiling.importer.scan import ImageEntry, ImageImportError, ImportParams

_THUMBNAIL_MAX_PX = 256  # long side of a group's mosaic thumbnail


def _probe_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only; raises ValueError for a file that is no image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read as an image ({exc})") from None


def choose_tile_size(entries: Sequence[ImageEntry], tile_size_px: int | None) -> int:
    """``tile_size_px``, or the images' own size when they are all square and equal."""
    if tile_size_px is not None:
        return tile_size_px
    sizes = {e.size_px for e in entries}
    if len(sizes) == 1:
        (width, height) = next(iter(sizes))  # type: ignore[misc]
        if width == height:
            return int(width)
    shown = sorted(sizes)[:3]  # type: ignore[type-var]
    raise ImageImportError(
        entries[0].path.parent,
        f"images differ in size or are not square (e.g. {shown}); pass --tile-size to "
        "resize them all to one square size",
    )


def tile_mpp(entries: Sequence[ImageEntry], tile_size_px: int) -> tuple[float, float]:
    """(median, max / min) of the stored tiles' resolution: image mpp x source side / tile."""
    values = np.array(
        [e.mpp * min(e.size_px) / tile_size_px for e in entries]  # type: ignore[operator, type-var]
    )
    return float(np.median(values)), float(values.max() / values.min())


def grid_columns(n_tiles: int) -> int:
    """Columns of a group's synthetic mosaic: near square, row-major."""
    return max(1, math.ceil(math.sqrt(n_tiles)))


def mosaic_coords(n_tiles: int, tile_size_px: int) -> np.ndarray:
    """Level-0 (x, y) of each image in its group's mosaic: a row-major grid, x first."""
    cols = grid_columns(n_tiles)
    index = np.arange(n_tiles, dtype=np.int64)
    return np.stack([index % cols, index // cols], axis=1) * tile_size_px


def _cell_px(n_tiles: int, tile_size_px: int) -> int:
    """Thumbnail px per image: the mosaic within _THUMBNAIL_MAX_PX, and at most 1/8 tile
    (a single-image group should not store its image twice)."""
    cols = grid_columns(n_tiles)
    rows = math.ceil(n_tiles / cols)
    return max(1, min(tile_size_px // 8, _THUMBNAIL_MAX_PX // max(cols, rows)))


def _group_data(
    name: str,
    folder: Path,
    entries: Sequence[ImageEntry],
    tiles: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    tile_size_px: int,
    target_mpp: float,
    params: ImportParams,
    mpp_source: str,
) -> SlideGroupData:
    n = len(entries)
    coords = mosaic_coords(n, tile_size_px)
    cols = grid_columns(n)
    rows = math.ceil(n / cols)
    cell = cells[0].shape[0]
    thumbnail = np.full((rows * cell, cols * cell, 3), 255, dtype=np.uint8)  # white: no image
    mask = np.zeros((rows * cell, cols * cell), dtype=np.uint8)
    for i, image_cell in enumerate(cells):
        y, x = (i // cols) * cell, (i % cols) * cell
        thumbnail[y : y + cell, x : x + cell] = image_cell
        mask[y : y + cell, x : x + cell] = 1
    width0, height0 = cols * tile_size_px, rows * tile_size_px
    images = [e.name for e in entries]
    fingerprint = hashlib.sha256(
        json.dumps({"params": asdict(params), "images": images}, sort_keys=True).encode()
    ).hexdigest()[:16]
    mm_per_tile = tile_size_px * target_mpp / 1000
    patients = {e.patient for e in entries if e.patient}
    record = SlideRecord(
        name=name,
        source_path=str(entries[0].path if n == 1 else folder),
        fingerprint=fingerprint,
        params={**asdict(params), "source": "image folder"},
        slide_info={"reader": "histoduo import", "folder": str(folder), "n_images": n},
        slide_mpp=target_mpp,  # level 0 is the mosaic of stored tiles
        mpp_source=mpp_source,
        target_mpp=target_mpp,
        tile_size_px=tile_size_px,
        tile_size_level0=tile_size_px,
        stride_px=tile_size_px,
        stride_level0=tile_size_px,
        min_tissue_fraction=0.0,
        tissue_area_mm2=n * mm_per_tile**2,  # the imaged area, every image counted whole
        level0_width=width0,
        level0_height=height0,
        patient=patients.pop() if len(patients) == 1 else None,
        histoduo_version=__version__,
        scanner_magnification=None,
    )
    return SlideGroupData.from_record(
        record,
        coords=coords,
        tissue_fraction=np.ones(n, dtype=np.float32),
        thumbnail=thumbnail,
        tissue_mask=mask,
        mask_downsample=tile_size_px / cell,
        labels=np.array([e.label for e in entries], dtype=np.int16),
    )


def _group_entries(entries: Sequence[ImageEntry]) -> dict[str, list[ImageEntry]]:
    groups: dict[str, list[ImageEntry]] = {}
    for entry in sorted(entries, key=lambda e: (e.group, e.name)):
        groups.setdefault(entry.group, []).append(entry)
    keys: dict[str, str] = {}
    for name in groups:
        key = group_key(name)
        if key in keys:
            raise ImageImportError(
                name, f"group names {keys[key]!r} and {name!r} map to the same HDF5 group"
            )
        keys[key] = name
    return groups
