"""The HDF5 tile store: many slides in one file, one group per slide.

Layout (the public interface, documented exactly in docs/tile-store.md)::

    /                      attrs: format, format_version, histoduo_version, class_names
    /slides/<slide>/       attrs: name, source_path, complete (written last), params, ...
        coords             int64 (N, 2) level-0 (x, y) top-left; CLAM + TRIDENT attrs
        tissue_fraction    float32 (N,)
        jpeg               vlen uint8 (N,): one JPEG per tile      (tile_encoding = "jpeg")
        imgs               uint8 (N, H, W, 3), one tile per chunk   (tile_encoding = "raw")
        labels             int16 (N,), -1 = unlabelled              (optional)
        thumbnail          uint8 (h, w, 3) with attr downsample
        tissue_mask        uint8 (h, w) with attr downsample

Writers never modify a store in place: each slide is written to its own part file which is
renamed into place when complete, and stores are assembled into a temporary file that replaces
the old one atomically. A killed run therefore leaves the previous store intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo import __version__
from histoduo.tileio import decode_jpeg, encode_jpeg  # noqa: F401 - encode_jpeg re-exported

FORMAT_NAME = "histoduo-tilestore"
FORMAT_VERSION = 1
SLIDES_GROUP = "slides"
UNLABELLED = -1


class StoreError(Exception):
    """A tile store is missing, corrupt, or not a histoduo store; names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def group_key(name: str) -> str:
    """An HDF5-safe group name for a slide name ('/' would make nested groups)."""
    return name.replace("/", "_")


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


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
        _write_store_header(self._file)
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
        _fsync(self.tmp_path)
        os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_store_header(f: h5py.File, class_names: Sequence[str] | None = None) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["histoduo_version"] = __version__
    if class_names is not None:
        f.attrs["class_names"] = _json_attr(list(class_names))


def _check_header(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT_NAME:
        raise StoreError(path, "not a histoduo tile store (no 'format' attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            path,
            f"store format version {version} is newer than this histoduo reads "
            f"({FORMAT_VERSION}); upgrade histoduo",
        )


def complete_slides(path: Path) -> dict[str, dict[str, Any]]:
    """Names and attributes of the complete slides in a store or part file ({} if unreadable).

    Used for resume: an unreadable or truncated file counts as holding nothing.
    """
    try:
        with h5py.File(path, "r") as f:
            _check_header(f, path)
            slides = f.get(SLIDES_GROUP)
            if slides is None:
                return {}
            return {
                str(g.attrs["name"]): dict(g.attrs)
                for g in slides.values()
                if bool(g.attrs.get("complete", False))
            }
    except (OSError, StoreError, KeyError):
        return {}


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
            _write_store_header(dst, class_names)
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
        _fsync(tmp)
        os.replace(tmp, out_path)
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


class TileStore:
    """Read access to a tile store; safe to open in every DataLoader worker.

    The HDF5 handle is opened lazily and re-opened in a new process (after fork or pickling),
    because HDF5 handles must never cross a fork.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(self.path, "tile store not found")
        self._file: h5py.File | None = None
        self._pid = -1
        f = self._handle()
        self._slides = sorted(
            str(g.attrs["name"])
            for g in f.get(SLIDES_GROUP, {}).values()
            if bool(g.attrs.get("complete", False))
        )
        raw = f.attrs.get("class_names")
        self.class_names: list[str] = json.loads(raw) if raw else []

    # --- handle management -------------------------------------------------------------------
    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise StoreError(self.path, f"cannot open as HDF5 ({exc})") from exc
            self._pid = os.getpid()
            _check_header(self._file, self.path)
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = -1
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- contents ------------------------------------------------------------------------------
    @property
    def slides(self) -> list[str]:
        """Names of complete slides (incomplete groups are invisible)."""
        return list(self._slides)

    def _group(self, slide: str) -> h5py.Group:
        if slide not in self._slides:
            raise KeyError(f"{self.path}: no complete slide named {slide!r}")
        return self._handle()[f"{SLIDES_GROUP}/{group_key(slide)}"]

    def num_tiles(self, slide: str) -> int:
        return int(self._group(slide)["coords"].shape[0])

    def coords(self, slide: str) -> np.ndarray:
        return self._group(slide)["coords"][()]

    def tissue_fraction(self, slide: str) -> np.ndarray:
        return self._group(slide)["tissue_fraction"][()]

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
