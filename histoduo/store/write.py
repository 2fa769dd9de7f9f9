"""Writing a tile store: one slide file at a time, TRIDENT files, assembly, merge, upgrade."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo.runtime.files import (
    atomic_path,
    commit_path,
    require_free_space,
    temporary_path,
)
from histoduo.store.layout import (
    IndexEntry,
    read_slide_record,
    remove_unlisted,
    slide_file_path,
    trident_file_path,
    write_index,
)
from histoduo.store.record import (
    SLIDE_FILE_FORMAT,
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
    imgs_attrs: dict[str, Any] | None = None  # CLAM's legacy attributes on raw ``imgs``

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
            imgs_attrs=record.legacy_imgs_attrs(),
        )


class SlidePartWriter:
    """Writes one slide file (CLAM's layout: datasets at the root) under a temporary name;
    ``commit`` marks it complete, syncs it and renames it to ``final_path``.

    Tiles are appended in order, in batches, by the one process that owns the file. Until
    the rename nothing is at ``final_path``, so a kill never leaves a half-written slide
    where a reader (histoduo, CLAM, TRIDENT) would look.
    """

    def __init__(
        self,
        final_path: Path,
        data: SlideGroupData,
        encoding: str | None,
        tile_size_px: int,
    ) -> None:
        self.final_path = Path(final_path)
        self.tmp_path = temporary_path(self.final_path)
        self.encoding = encoding
        self._count = 0
        self._n = len(data.coords)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        overview_bytes = data.thumbnail.nbytes + data.tissue_mask.size + 16 * len(data.coords)
        require_free_space(self.final_path, overview_bytes)
        self._file = h5py.File(self.tmp_path, "w")
        root = self._file
        write_store_header(root, kind=SLIDE_FILE_FORMAT)
        for key, value in data.attrs.items():
            root.attrs[key] = value
        # A fresh identity per file, copied into the index: a swapped file is told apart.
        self.file_id = uuid.uuid4().hex
        root.attrs["file_id"] = self.file_id
        root.attrs["name"] = data.name
        root.attrs["source_path"] = data.source_path
        root.attrs["n_tiles"] = self._n
        root.attrs["tile_encoding"] = encoding or "none"
        root.attrs["complete"] = False
        coords = root.create_dataset("coords", data=np.asarray(data.coords, dtype=np.int64))
        for key, value in data.coords_attrs.items():
            coords.attrs[key] = value
        root.create_dataset(
            "tissue_fraction", data=np.asarray(data.tissue_fraction, dtype=np.float32)
        )
        if data.labels is not None:
            root.create_dataset("labels", data=np.asarray(data.labels, dtype=np.int16))
        thumb = root.create_dataset("thumbnail", data=data.thumbnail, compression="gzip")
        thumb.attrs["downsample"] = data.mask_downsample
        mask = root.create_dataset(
            "tissue_mask", data=data.tissue_mask.astype(np.uint8), compression="gzip"
        )
        mask.attrs["downsample"] = data.mask_downsample
        self._pixels = None
        if encoding == "jpeg":
            self._pixels = root.create_dataset(
                "jpeg", shape=(self._n,), dtype=h5py.vlen_dtype(np.uint8)
            )
        elif encoding == "raw":
            shape = (self._n, tile_size_px, tile_size_px, 3)
            self._pixels = root.create_dataset(
                "imgs",
                shape=shape,
                dtype=np.uint8,
                chunks=(1, tile_size_px, tile_size_px, 3) if self._n else None,
            )
            for key, value in (data.imgs_attrs or {}).items():
                self._pixels.attrs[key] = value

    def set_qc(self, datasets: dict[str, np.ndarray], info: str) -> None:
        """Artefact QC of every tile (``qc_*`` datasets, written with the file) and its
        JSON summary (params, mode, burdens) as the ``qc`` attribute."""
        for name, values in datasets.items():
            if not name.startswith("qc_") or len(values) != self._n:
                raise ValueError(f"{name}: QC datasets are qc_* arrays of one value per tile")
            if name in self._file:
                del self._file[name]
            self._file.create_dataset(name, data=np.asarray(values))
        self._file.attrs["qc"] = info

    def append(self, tiles: Sequence[np.ndarray] | np.ndarray) -> None:
        """Append encoded (JPEG byte arrays) or raw tiles, in coords order."""
        n = len(tiles)
        if n == 0 or self._pixels is None:
            self._count += n
            return
        stop = self._count + n
        # Twice the block: HDF5 may hold it in its chunk cache and write it again at close.
        require_free_space(self.tmp_path, 2 * sum(np.asarray(t).nbytes for t in tiles))
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
        self._file.attrs["complete"] = True  # last: readers trust nothing without it
        self._file.flush()
        self._file.close()
        return commit_path(self.tmp_path, self.final_path)

    def abort(self) -> None:
        # On a full disk closing fails too (its last flush); the file is discarded anyway.
        with suppress(OSError), suppress(RuntimeError):
            self._file.close()
        with suppress(OSError):
            self.tmp_path.unlink(missing_ok=True)


def write_trident_coords(out_path: str | Path, coords: np.ndarray, record: SlideRecord) -> Path:
    """A TRIDENT coordinates file: ``coords`` with TRIDENT's attributes, atomically."""
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for key, value in record.trident_attrs().items():
                ds.attrs[key] = value
    return Path(out_path)


def write_trident_file(slide_file: str | Path, out_path: str | Path) -> Path:
    """The TRIDENT coordinates file of a slide file."""
    with h5py.File(slide_file, "r") as src:
        record = SlideRecord.from_attrs(dict(src.attrs), dict(src["coords"].attrs))
        coords = src["coords"][()]
    return write_trident_coords(out_path, coords, record)


def install_slide_file(index_path: Path, src: Path, name: str, *, how: str = "move") -> IndexEntry:
    """Put a complete slide file into a store's folder (``move``, ``link``: a hard link,
    copying only across file systems, or ``copy``) and write its TRIDENT file.

    The destination is replaced by a rename, so hard-linked copies in other stores never
    change under their readers.
    """
    dest = slide_file_path(index_path, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    same = dest.exists() and src.exists() and os.path.samefile(src, dest)
    if not same:
        if how == "move":
            try:
                os.replace(src, dest)
            except OSError:  # another file system
                _copy_in(src, dest)
                src.unlink()
        else:
            tmp = temporary_path(dest)
            try:
                if how == "link":
                    os.link(src, tmp)
                else:
                    raise OSError("copy requested")
            except OSError:
                tmp.unlink(missing_ok=True)
                _copy_in(src, dest)
            else:
                os.replace(tmp, dest)
    write_trident_file(dest, trident_file_path(index_path, name))
    record = read_slide_record(dest)
    if record is None:
        raise StoreError(src, f"not a complete histoduo slide file (slide {name!r})")
    return IndexEntry.of(record, dest)


def _copy_in(src: Path, dest: Path) -> None:
    import shutil

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def convert_v1_slide(v1_path: Path, name: str, dest: Path) -> Path:
    """A format-1 store's slide group as a format-2 slide file at ``dest`` (atomically).

    The CLAM attributes are derived from what format 1 recorded: it read
    ``round(tile_size_level0 / downsample)`` px at ``patch_level``.
    """
    key = group_key(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(v1_path, "r") as src, atomic_path(dest) as tmp:
        group = src[f"{SLIDES_GROUP}/{key}"]
        record = SlideRecord.from_attrs(dict(group.attrs), dict(group["coords"].attrs))
        with h5py.File(tmp, "w") as dst:
            write_store_header(dst, kind=SLIDE_FILE_FORMAT)
            for ds_name in group:
                src.copy(group[ds_name], dst, name=ds_name)
            for attr in list(dst["coords"].attrs):
                del dst["coords"].attrs[attr]
            for attr, value in record.coords_attrs().items():
                dst["coords"].attrs[attr] = value
            for attr, value in group.attrs.items():
                dst.attrs[attr] = value
            for attr, value in record.to_attrs().items():
                dst.attrs[attr] = value
            if "imgs" in dst:
                for attr, value in record.legacy_imgs_attrs().items():
                    dst["imgs"].attrs[attr] = value
            dst.attrs["file_id"] = uuid.uuid4().hex
            dst.attrs["complete"] = True
    return dest


def assemble_store(
    out_path: Path,
    sources: Iterable[tuple[Path, str]],
    *,
    link: bool = False,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Make ``out_path`` a store holding exactly the given (slide file, slide name) pairs.

    The files are moved into the store's folder (``link=True``: hard-linked, so the sources
    stay valid), the index is written atomically, then files of slides no longer listed are
    removed. A killed call leaves the previous index valid.
    """
    out_path = Path(out_path)
    entries: list[IndexEntry] = []
    seen: set[str] = set()
    for src, name in sources:
        key = group_key(name)
        if key in seen:
            raise StoreError(src, f"slide {name!r} appears in more than one input")
        seen.add(key)
        entries.append(
            install_slide_file(out_path, Path(src), name, how="link" if link else "move")
        )
    write_index(out_path, entries, class_names)
    remove_unlisted(out_path, entries)
    return out_path
