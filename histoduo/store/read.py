"""Reading a tile store of either format: :class:`TileStore` and the resume helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo.runtime.codec import decode_jpeg
from histoduo.runtime.decode import EncodedBatch, encoded_pixels
from histoduo.store.layout import (
    IndexEntry,
    identity_problem,
    read_index,
    read_slide_record,
    store_folder,
)
from histoduo.store.record import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QC_DATASETS,
    SLIDE_FILE_FORMAT,
    SLIDES_GROUP,
    UNLABELLED,
    SlideRecord,
    StoreError,
    check_header,
    group_key,
)


def _v1_complete(path: Path) -> dict[str, SlideRecord]:
    with h5py.File(path, "r") as f:
        records = {}
        for group in f.get(SLIDES_GROUP, {}).values():
            if not bool(group.attrs.get("complete", False)):
                continue
            try:
                record = SlideRecord.from_attrs(dict(group.attrs), dict(group["coords"].attrs))
            except (KeyError, TypeError, ValueError):
                continue  # a group this version cannot read is redone
            records[record.name] = record
        return records


def complete_slides(
    path: Path,
    problems: dict[str, str] | None = None,
    open_only: set[str] | None = None,
) -> dict[str, SlideRecord]:
    """Names and records of the complete slides of a store (either format) or slide file.

    Used for resume: an unreadable or truncated file counts as holding nothing, and so does
    a listed slide whose file is missing, incomplete, or not the file the index recorded
    (another size or file id: swapped, truncated, half-copied). Why a listed slide was left
    out goes into ``problems`` (slide name -> reason), so the caller can say so. With
    ``open_only``, only those slides' files are opened to check their id (the others get the
    size check, a ``stat``): a run that adds slides to a big store opens only its own.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("format")
            version = int(f.attrs.get("format_version", -1))
    except OSError:
        return {}
    try:
        if kind == SLIDE_FILE_FORMAT:
            record = read_slide_record(path)
            return {record.name: record} if record is not None else {}
        if kind != FORMAT_NAME or version > FORMAT_VERSION:
            return {}
        if version < 2:
            return _v1_complete(path)
        entries, _ = read_index(path)
    except (OSError, StoreError, KeyError):
        return {}
    records = {}
    for name, entry in entries.items():
        if entry.h5_path != "/":
            record = _v1_complete(entry.file).get(name)
        elif (
            problem := entry.problem(open_file=open_only is None or name in open_only)
        ) is not None:
            record = None
            if problems is not None:
                problems[name] = f"{entry.file} {problem}"
        elif entry.record is not None and entry.record.file_id:
            record = entry.record  # identity checked: the index's copy is the file's record
        else:
            record = read_slide_record(entry.file)  # an older index: the file's own record
        if record is not None:
            records[name] = record
    return records


def store_class_names(path: Path) -> list[str] | None:
    """The label vocabulary of a store (None when it holds no labels)."""
    with h5py.File(path, "r") as f:
        raw = f.attrs.get("class_names")
    return json.loads(raw) if raw else None


def is_store(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file with a store header (of any version)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") is not None
    except OSError:
        return False


def require_pixels(store: TileStore) -> None:
    """StoreError unless every slide of ``store`` holds tile pixels (a dry run holds none)."""
    empty = [name for name in store.slides if not store.has_pixels(name)]
    if empty:
        shown = ", ".join(empty[:3]) + (" ..." if len(empty) > 3 else "")
        raise StoreError(
            store.path,
            f"{len(empty)} slide(s) ({shown}) hold tile coordinates but no pixels (a "
            "`histoduo tile --dry-run` store); tile them again without --dry-run",
        )


_REDO_HINT = (
    "rerun the `histoduo tile` command that made this store to redo that slide (the other "
    "slides are kept)"
)


class TileStore:
    """Read access to a tile store (either format); safe to open in every DataLoader worker.

    HDF5 handles are opened lazily and re-opened in a new process (after fork or pickling),
    because HDF5 handles must never cross a fork. A format-2 store keeps at most
    ``max_open_files`` slide files open.
    """

    max_open_files = 64

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(self.path, "tile store not found")
        self._files: dict[Path, h5py.File] = {}
        self._pid = -1
        try:
            with h5py.File(self.path, "r") as f:
                self.version = check_header(f, self.path)
        except OSError as exc:
            raise StoreError(self.path, f"cannot open as HDF5 ({exc})") from exc
        if self.version < 2:
            entries = {
                name: IndexEntry(name, self.path, f"/{SLIDES_GROUP}/{group_key(name)}")
                for name in _v1_complete(self.path)
            }
            raw = store_class_names(self.path)
            self.class_names: list[str] = raw or []
        else:
            entries, self.class_names = read_index(self.path)
            missing = [e for e in entries.values() if not e.file.exists()]
            if missing:
                raise StoreError(
                    missing[0].file,
                    f"slide {missing[0].name!r} listed in {self.path} is missing "
                    f"({len(missing)} missing); move or copy {self.path.name} together with "
                    f"its folder {store_folder(self.path).name}/",
                )
            for entry in entries.values():
                problem = entry.problem(open_file=False)  # a stat per slide: sizes
                if problem is not None:
                    raise StoreError(entry.file, f"{problem}; {_REDO_HINT}")
        self._entries = entries
        self._slides = sorted(entries)
        self._verified: set[str] = set()

    # --- handle management -------------------------------------------------------------------
    def _open(self, file: Path) -> h5py.File:
        if self._pid != os.getpid():
            self._files = {}  # handles of the parent process are never used after a fork
            self._pid = os.getpid()
        handle = self._files.get(file)
        if handle is None:
            if len(self._files) >= self.max_open_files:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
            try:
                handle = h5py.File(file, "r")
            except OSError as exc:
                raise StoreError(file, f"cannot open as HDF5 ({exc})") from exc
            self._files[file] = handle
        return handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}
        state["_pid"] = -1
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._files.values():
                handle.close()
        self._files = {}

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- contents ------------------------------------------------------------------------------
    @property
    def slides(self) -> list[str]:
        """Names of complete slides (incomplete ones are invisible)."""
        return list(self._slides)

    def slide_file(self, slide: str) -> Path:
        """The file holding ``slide`` (format 2: its CLAM-layout slide file)."""
        return self._entry(slide).file

    def _entry(self, slide: str) -> IndexEntry:
        entry = self._entries.get(slide)
        if entry is None:
            raise KeyError(f"{self.path}: no complete slide named {slide!r}")
        return entry

    def _group(self, slide: str) -> h5py.Group:
        entry = self._entry(slide)
        handle = self._open(entry.file)
        group = handle[entry.h5_path]
        if entry.h5_path == "/" and slide not in self._verified:
            problem = identity_problem(entry, dict(group.attrs))
            if problem is not None:
                raise StoreError(entry.file, f"{problem}; {_REDO_HINT}")
            self._verified.add(slide)
        return group

    def num_tiles(self, slide: str) -> int:
        return int(self._group(slide)["coords"].shape[0])

    def coords(self, slide: str) -> np.ndarray:
        return self._group(slide)["coords"][()]

    def tissue_fraction(self, slide: str) -> np.ndarray:
        return self._group(slide)["tissue_fraction"][()]

    def qc(self, slide: str) -> dict[str, np.ndarray] | None:
        """The slide's per-tile artefact QC (``qc_pen``, ``qc_blur``, ``qc_fold`` float32 and
        ``qc_flags`` uint8), or None when QC did not check it (older stores, ``--qc off``)."""
        group = self._group(slide)
        if "qc_flags" not in group:
            return None
        return {name: group[name][()] for name in QC_DATASETS if name in group}

    def qc_excluded(self, slide: str, qc: str | None = None) -> np.ndarray:
        """bool (N,): the slide's tiles that QC policy leaves out of training, the grade and
        MIL. ``qc`` "exclude" leaves the flagged tiles out, "flag"/"off" none; None follows
        the mode the slide was tiled with. A slide QC never checked leaves nothing out."""
        from histoduo.qc.params import excluded_tiles

        checked = self.qc(slide) if qc not in ("flag", "off") else None
        flags = None if checked is None else checked["qc_flags"]
        excluded = excluded_tiles(flags, qc, (self.qc_info(slide) or {}).get("mode", "flag"))
        return np.zeros(self.num_tiles(slide), dtype=bool) if excluded is None else excluded

    def qc_info(self, slide: str) -> dict[str, Any] | None:
        """The slide's QC summary (mode, params, burdens), or None when not checked."""
        value = self._group(slide).attrs.get("qc")
        if value is None:
            return None
        return json.loads(value.decode() if isinstance(value, bytes) else value)

    def labels(self, slide: str) -> np.ndarray | None:
        group = self._group(slide)
        return group["labels"][()] if "labels" in group else None

    def attrs(self, slide: str) -> dict[str, Any]:
        """Slide attributes; JSON-encoded ones (params, slide) decoded."""
        out: dict[str, Any] = {}
        for key, value in self._group(slide).attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if key in ("params", "slide_info") and isinstance(value, str):
                value = json.loads(value)
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    def record(self, slide: str) -> SlideRecord:
        """The slide's typed attributes."""
        group = self._group(slide)
        return SlideRecord.from_attrs(dict(group.attrs), dict(group["coords"].attrs))

    def coords_attrs(self, slide: str) -> dict[str, Any]:
        return {
            k: (v.item() if isinstance(v, np.generic) else v)
            for k, v in self._group(slide)["coords"].attrs.items()
        }

    def has_pixels(self, slide: str) -> bool:
        group = self._group(slide)
        return "jpeg" in group or "imgs" in group

    def thumbnail(self, slide: str) -> tuple[np.ndarray, float]:
        ds = self._group(slide)["thumbnail"]
        return ds[()], float(ds.attrs["downsample"])

    def tissue_mask(self, slide: str) -> tuple[np.ndarray, float]:
        ds = self._group(slide)["tissue_mask"]
        return ds[()].astype(bool), float(ds.attrs["downsample"])

    def read_tile(self, slide: str, index: int) -> np.ndarray:
        return self.read_tiles(slide, [index])[0]

    def read_tiles(self, slide: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tiles as (n, H, W, 3) uint8, in the order of ``indices``."""
        group = self._group(slide)
        idx = np.asarray(indices, dtype=np.int64)
        if "imgs" in group:
            if len(idx) == 0:
                return np.empty((0, *group["imgs"].shape[1:]), dtype=np.uint8)
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            unique, inverse = np.unique(sorted_idx, return_inverse=True)
            block = group["imgs"][unique]  # h5py needs increasing indices
            out = np.empty((len(idx), *block.shape[1:]), dtype=np.uint8)
            out[order] = block[inverse]
            return out
        if "jpeg" in group:
            data = group["jpeg"]
            tiles = [decode_jpeg(data[int(i)]) for i in idx]
            if not tiles:
                size = int(self.attrs(slide)["tile_size_px"])
                return np.empty((0, size, size, 3), dtype=np.uint8)
            return np.stack(tiles)
        raise StoreError(self.path, f"slide {slide!r} holds coordinates only (a --dry-run store)")

    def read_jpeg_bytes(
        self, slide: str, indices: Sequence[int] | np.ndarray
    ) -> list[np.ndarray] | None:
        """The stored JPEG of each tile, undecoded (for batched GPU decoding); None when the
        slide stores raw pixels (read those with :meth:`read_tiles`)."""
        group = self._group(slide)
        if "jpeg" not in group:
            if "imgs" in group:
                return None
            raise StoreError(
                self.path, f"slide {slide!r} holds coordinates only (a --dry-run store)"
            )
        data = group["jpeg"]
        return [data[int(i)] for i in np.asarray(indices, dtype=np.int64)]

    def index(self) -> Any:
        """One row per tile of every slide: slide, tile (index within slide), x, y, label."""
        import pandas as pd

        frames = []
        for slide in self._slides:
            coords = self.coords(slide)
            labels = self.labels(slide)
            frames.append(
                pd.DataFrame(
                    {
                        "slide": slide,
                        "tile": np.arange(len(coords)),
                        "x": coords[:, 0],
                        "y": coords[:, 1],
                        "label": labels if labels is not None else UNLABELLED,
                    }
                )
            )
        if not frames:
            return pd.DataFrame(columns=["slide", "tile", "x", "y", "label"])
        return pd.concat(frames, ignore_index=True)


def read_encoded(store: TileStore, slide: str, indices: Sequence[int] | np.ndarray) -> EncodedBatch:
    """One slide's tiles from a store, undecoded where the store holds JPEG."""
    blobs = store.read_jpeg_bytes(slide, indices)
    if blobs is None:
        return encoded_pixels(store.read_tiles(slide, indices))
    return EncodedBatch(jpeg=blobs)
