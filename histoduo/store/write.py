"""Writing stores: one slide per part file, and stores assembled from parts, atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo.run.files import commit_path
from histoduo.store.read import TileStore
from histoduo.store.record import (
    SLIDES_GROUP,
    SlideRecord,
    StoreError,
    group_key,
    write_store_header,
)


@dataclass
class SlideGroupData:
    """Everything one slide contributes to a store, held by the single writer."""

    name: str
    source_path: str
    coords: np.ndarray
    tissue_fraction: np.ndarray
    attrs: dict[str, Any]
    coords_attrs: dict[str, Any]
    thumbnail: np.ndarray
    tissue_mask: np.ndarray
    mask_downsample: float
    labels: np.ndarray | None = None

    @classmethod
    def from_record(
        cls,
        record: SlideRecord,
        coords: np.ndarray,
        tissue_fraction: np.ndarray,
        thumbnail: np.ndarray,
        tissue_mask: np.ndarray,
        mask_downsample: float,
        labels: np.ndarray | None = None,
    ) -> SlideGroupData:
        return cls(
            name=record.name,
            source_path=record.source_path,
            coords=coords,
            tissue_fraction=tissue_fraction,
            attrs=record.to_attrs(),
            coords_attrs=record.coords_attrs(),
            thumbnail=thumbnail,
            tissue_mask=tissue_mask,
            mask_downsample=mask_downsample,
            labels=labels,
        )


class SlidePartWriter:
    """Writes one slide into its own HDF5 part file; ``commit`` marks it complete and renames.

    Tiles are appended in order, in batches, by the one process that owns the file.
    """

    def __init__(
        self,
        final_path: Path,
        data: SlideGroupData,
        encoding: str | None,
        tile_size_px: int,
    ) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(final_path.name + ".tmp")
        self.encoding = encoding
        self._count = 0
        self._n = len(data.coords)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.tmp_path, "w")
        write_store_header(self._file)
        group = self._file.create_group(f"{SLIDES_GROUP}/{group_key(data.name)}")
        self._group = group
        for key, value in data.attrs.items():
            group.attrs[key] = value
        group.attrs["name"] = data.name
        group.attrs["source_path"] = data.source_path
        group.attrs["n_tiles"] = self._n
        group.attrs["tile_encoding"] = encoding or "none"
        group.attrs["complete"] = False
        coords = group.create_dataset("coords", data=np.asarray(data.coords, dtype=np.int64))
        for key, value in data.coords_attrs.items():
            coords.attrs[key] = value
        group.create_dataset(
            "tissue_fraction", data=np.asarray(data.tissue_fraction, dtype=np.float32)
        )
        if data.labels is not None:
            group.create_dataset("labels", data=np.asarray(data.labels, dtype=np.int16))
        thumb = group.create_dataset("thumbnail", data=data.thumbnail, compression="gzip")
        thumb.attrs["downsample"] = data.mask_downsample
        mask = group.create_dataset(
            "tissue_mask", data=data.tissue_mask.astype(np.uint8), compression="gzip"
        )
        mask.attrs["downsample"] = data.mask_downsample
        self._pixels = None
        if encoding == "jpeg":
            self._pixels = group.create_dataset(
                "jpeg", shape=(self._n,), dtype=h5py.vlen_dtype(np.uint8)
            )
        elif encoding == "raw":
            shape = (self._n, tile_size_px, tile_size_px, 3)
            self._pixels = group.create_dataset(
                "imgs",
                shape=shape,
                dtype=np.uint8,
                chunks=(1, tile_size_px, tile_size_px, 3) if self._n else None,
            )

    def append(self, tiles: Sequence[np.ndarray] | np.ndarray) -> None:
        """Append encoded (JPEG byte arrays) or raw tiles, in coords order."""
        n = len(tiles)
        if n == 0 or self._pixels is None:
            self._count += n
            return
        stop = self._count + n
        if self.encoding == "raw":
            self._pixels[self._count : stop] = np.asarray(tiles)
        else:
            if len({len(tile) for tile in tiles}) == 1:
                # h5py turns equal-length byte arrays (or a single one) into a 2-D block that
                # does not fit a 1-D vlen dataset, so those go one by one.
                for offset, tile in enumerate(tiles):
                    self._pixels[self._count + offset] = tile
            else:
                block = np.empty(n, dtype=object)
                for i, tile in enumerate(tiles):
                    block[i] = tile
                self._pixels[self._count : stop] = block
        self._count = stop

    def commit(self) -> Path:
        if self._pixels is not None and self._count != self._n:
            raise RuntimeError(f"{self.final_path}: wrote {self._count} of {self._n} tiles")
        self._group.attrs["complete"] = True  # last: readers trust nothing without it
        self._file.flush()
        self._file.close()
        return commit_path(self.tmp_path, self.final_path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def assemble_store(
    out_path: Path,
    sources: Iterable[tuple[Path, str]],
    *,
    link: bool = False,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write a store holding the given (file, slide name) groups, atomically.

    ``link=True`` makes HDF5 external links to the source files instead of copying pixels;
    the sources must then stay where they are (paths are stored relative to the store).
    """
    tmp = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    try:
        with h5py.File(tmp, "w") as dst:
            write_store_header(dst, class_names)
            slides = dst.create_group(SLIDES_GROUP)
            for src_path, name in sources:
                key = group_key(name)
                if key in seen:
                    raise StoreError(src_path, f"slide {name!r} appears in more than one input")
                seen.add(key)
                if link:
                    rel = os.path.relpath(src_path.resolve(), out_path.resolve().parent)
                    slides[key] = h5py.ExternalLink(rel, f"/{SLIDES_GROUP}/{key}")
                    continue
                with h5py.File(src_path, "r") as src:
                    src.copy(src[f"{SLIDES_GROUP}/{key}"], slides, name=key)
        commit_path(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def merge_stores(
    inputs: Sequence[Path], out_path: Path, *, link: bool = False, overwrite: bool = False
) -> list[str]:
    """Combine complete slides of several stores into one; returns the slide names.

    Slide names must be unique across inputs. Class vocabularies must agree.
    """
    if out_path.exists() and not overwrite:
        raise StoreError(out_path, "output exists; pass --overwrite to replace it")
    sources: list[tuple[Path, str]] = []
    class_names: list[str] | None = None
    for path in inputs:
        with TileStore(path) as store:
            names = store.slides
            if store.class_names:
                if class_names is not None and class_names != store.class_names:
                    raise StoreError(
                        path, f"class names {store.class_names} differ from {class_names}"
                    )
                class_names = store.class_names
        sources.extend((path, name) for name in names)
    assemble_store(out_path, sources, link=link, class_names=class_names)
    return [name for _, name in sources]
