"""The HDF5 tile store, format 2: one file per slide, and an index that users pass around.

Layout (the public interface, documented exactly in docs/tile-store.md)::

    tiles.h5                       the index: attrs format, format_version = 2, class_names;
                                   /slides/<slide> = external link to the slide file's root
    tiles.h5.d/clam/patches/<slide>.h5
                                   one slide (CLAM's layout): attrs name, complete, params, ...
        coords                     int64 (N, 2) level-0 (x, y) top-left; CLAM attrs
        tissue_fraction            float32 (N,)
        jpeg | imgs                one JPEG per tile (vlen uint8) | uint8 (N, H, W, 3)
        labels                     int16 (N,), -1 = unlabelled (optional)
        thumbnail, tissue_mask     overview and mask, attr downsample
    tiles.h5.d/trident/patches/<slide>_patches.h5
                                   coords only, with TRIDENT's attrs

Format 1 (one file, a group per slide) still reads; ``upgrade_store`` rewrites it.

Writers never modify a file in place: a slide file is written under a temporary name and
renamed when complete, and the index is rewritten whole and renamed. A killed run therefore
leaves every finished slide and the previous index intact, and a rerun touches only the
slides it adds plus the index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo import __version__
from histoduo.run.errors import HistoduoError
from histoduo.run.files import atomic_path, commit_path, temporary_path
from histoduo.slide import mpp_to_magnification
from histoduo.tileio import decode_jpeg, encode_jpeg  # noqa: F401 - encode_jpeg re-exported

FORMAT_NAME = "histoduo-tilestore"
FORMAT_VERSION = 2
SLIDE_FILE_FORMAT = "histoduo-slide"  # the root of a per-slide file
SLIDES_GROUP = "slides"
UNLABELLED = -1


class StoreError(HistoduoError):
    """A tile store is missing, corrupt, or not a histoduo store; names the file."""


class StoreUpgradeNeeded(StoreError):
    """A format-1 store where a command would add to it; the message says how to upgrade."""


def group_key(name: str) -> str:
    """An HDF5-safe group name for a slide name ('/' would make nested groups)."""
    return name.replace("/", "_")


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes -> str, numpy scalar -> number)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class SlideRecord:
    """One slide group's attributes, typed: the store schema in code (docs/tile-store.md).

    Every writer builds one and every reader gets one back (``TileStore.record``), so no
    module outside this one spells an attribute name. ``coords_attrs`` holds the TRIDENT and
    CLAM names on the ``coords`` dataset, derived from the same fields.
    """

    name: str
    source_path: str
    fingerprint: str
    params: dict[str, Any]  # every tiling / import parameter (JSON attr)
    slide_info: dict[str, Any]  # what the slide is (JSON attr)
    slide_mpp: float  # the slide's level-0 resolution, um/px
    mpp_source: str
    target_mpp: float  # the stored tiles' resolution, um/px
    tile_size_px: int
    tile_size_level0: int
    stride_px: int
    stride_level0: int
    min_tissue_fraction: float
    tissue_area_mm2: float | None
    level0_width: int
    level0_height: int
    n_tiles: int = 0
    tile_encoding: str = "none"
    complete: bool = False
    patient: str | None = None
    histoduo_version: str = __version__
    # Where the pixels were read (CLAM's patch_level / downsample / level_dim / patch_size).
    read_level: int = 0
    read_level_downsample: float = 1.0
    read_level_width: int | None = None  # None: level 0's
    read_level_height: int | None = None
    level0_magnification: float | None = None  # None: from slide_mpp
    read_size_px: int | None = None  # side of the square read at read_level; None: derived

    @property
    def read_side_px(self) -> int:
        """Side of the square region read at ``read_level`` (then resized to the tile)."""
        if self.read_size_px is not None:
            return self.read_size_px
        return max(1, round(self.tile_size_level0 / self.read_level_downsample))

    @property
    def read_level_dim(self) -> tuple[int, int]:
        width = self.read_level_width if self.read_level_width is not None else self.level0_width
        height = (
            self.read_level_height if self.read_level_height is not None else self.level0_height
        )
        return width, height

    def to_attrs(self) -> dict[str, Any]:
        """The slide group's HDF5 attributes."""
        attrs: dict[str, Any] = {
            "name": self.name,
            "source_path": self.source_path,
            "complete": self.complete,
            "fingerprint": self.fingerprint,
            "params": _json_attr(self.params),
            "slide_info": _json_attr(self.slide_info),
            "slide_mpp": self.slide_mpp,
            "mpp_source": self.mpp_source,
            "target_mpp": self.target_mpp,
            "tile_size_px": self.tile_size_px,
            "tile_size_level0": self.tile_size_level0,
            "stride_px": self.stride_px,
            "stride_level0": self.stride_level0,
            "min_tissue_fraction": self.min_tissue_fraction,
            "tissue_area_mm2": (
                float("nan") if self.tissue_area_mm2 is None else self.tissue_area_mm2
            ),
            "level0_width": self.level0_width,
            "level0_height": self.level0_height,
            "n_tiles": self.n_tiles,
            "tile_encoding": self.tile_encoding,
            "histoduo_version": self.histoduo_version,
        }
        if self.patient is not None:
            attrs["patient"] = self.patient  # read by split_by="patient"
        # Format 2: the read geometry lives on the root too, so the record is self-contained.
        attrs["read_level"] = self.read_level
        attrs["read_level_downsample"] = self.read_level_downsample
        attrs["read_size_px"] = self.read_side_px
        attrs["read_level_width"], attrs["read_level_height"] = self.read_level_dim
        attrs["level0_magnification"] = self._level0_magnification()
        return attrs

    def _level0_magnification(self) -> float:
        return float(self.level0_magnification or mpp_to_magnification(self.slide_mpp))

    def clam_attrs(self) -> dict[str, Any]:
        """``coords`` attributes with CLAM's meaning: read ``(patch_size, patch_size)`` at
        ``patch_level`` from each coordinate, then resize to the stored tile size."""
        level_dim = np.array(self.read_level_dim, dtype=np.int64)
        return {
            "patch_size": self.read_side_px,
            "patch_level": self.read_level,
            "downsample": np.array([self.read_level_downsample] * 2, dtype=np.float64),
            "downsampled_level_dim": level_dim,
            "level_dim": level_dim.copy(),
            "name": self.name,
        }

    def trident_attrs(self) -> dict[str, Any]:
        """``coords`` attributes with TRIDENT's meaning: ``patch_size`` px at the target,
        covering ``patch_size_level0`` level-0 px."""
        return {
            "patch_size": self.tile_size_px,
            "patch_size_level0": self.tile_size_level0,
            "level0_magnification": self._level0_magnification(),
            "target_magnification": mpp_to_magnification(self.target_mpp),
            "overlap": max(0, self.tile_size_px - self.stride_px),
            "name": self.name,
            "level0_width": self.level0_width,
            "level0_height": self.level0_height,
        }

    def coords_attrs(self) -> dict[str, Any]:
        """Attributes of the slide file's ``coords`` dataset (CLAM's; TRIDENT's live in the
        TRIDENT file, because the two tools' ``patch_size`` mean different things)."""
        return self.clam_attrs()

    @classmethod
    def from_attrs(
        cls, attrs: dict[str, Any], coords_attrs: dict[str, Any] | None = None
    ) -> SlideRecord:
        """The record of a group's attributes (as h5py or ``complete_slides`` gives them)."""
        a = {k: _plain(v) for k, v in attrs.items()}
        c = {k: _plain(v) for k, v in (coords_attrs or {}).items()}

        def json_field(key: str) -> dict[str, Any]:
            value = a.get(key, "{}")
            return json.loads(value) if isinstance(value, str) else dict(value)

        area = a.get("tissue_area_mm2")
        level_dim = c.get("level_dim")
        if "read_level_width" in a:  # format 2: the root holds the read geometry
            level_dim = [a["read_level_width"], a["read_level_height"]]
        magnification = a.get("level0_magnification", c.get("level0_magnification"))
        return cls(
            name=str(a["name"]),
            source_path=str(a.get("source_path", "")),
            fingerprint=str(a.get("fingerprint", "")),
            params=json_field("params"),
            slide_info=json_field("slide_info"),
            slide_mpp=float(a["slide_mpp"]),
            mpp_source=str(a.get("mpp_source", "")),
            target_mpp=float(a["target_mpp"]),
            tile_size_px=int(a["tile_size_px"]),
            tile_size_level0=int(a["tile_size_level0"]),
            stride_px=int(a.get("stride_px", a["tile_size_px"])),
            stride_level0=int(a.get("stride_level0", a["tile_size_level0"])),
            min_tissue_fraction=float(a.get("min_tissue_fraction", 0.0)),
            tissue_area_mm2=None if area is None or not np.isfinite(area) else float(area),
            level0_width=int(a["level0_width"]),
            level0_height=int(a["level0_height"]),
            n_tiles=int(a.get("n_tiles", 0)),
            tile_encoding=str(a.get("tile_encoding", "none")),
            complete=bool(a.get("complete", False)),
            patient=str(a["patient"]) if a.get("patient") is not None else None,
            histoduo_version=str(a.get("histoduo_version", "")),
            read_level=int(a.get("read_level", c.get("patch_level", 0))),
            read_level_downsample=float(
                a.get("read_level_downsample", np.ravel(c.get("downsample", [1.0]))[0])
            ),
            read_level_width=int(level_dim[0]) if level_dim is not None else None,
            read_level_height=int(level_dim[1]) if level_dim is not None else None,
            level0_magnification=float(magnification) if magnification is not None else None,
            read_size_px=int(a["read_size_px"]) if "read_size_px" in a else None,
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


# --- layout of a format-2 store ------------------------------------------------------------


def store_folder(index_path: str | Path) -> Path:
    """The folder beside the index that holds the per-slide files: ``tiles.h5.d``."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".d")


def clam_dir(index_path: str | Path) -> Path:
    """What CLAM's ``--data_h5_dir`` points at (it reads ``<dir>/patches/<slide>.h5``)."""
    return store_folder(index_path) / "clam"


def trident_dir(index_path: str | Path) -> Path:
    """What TRIDENT's coordinates folder points at (``<dir>/patches/<slide>_patches.h5``)."""
    return store_folder(index_path) / "trident"


def slide_file_path(index_path: str | Path, name: str) -> Path:
    return clam_dir(index_path) / "patches" / f"{group_key(name)}.h5"


def trident_file_path(index_path: str | Path, name: str) -> Path:
    return trident_dir(index_path) / "patches" / f"{group_key(name)}_patches.h5"


def _write_header(
    f: h5py.File, class_names: Sequence[str] | None = None, *, kind: str = FORMAT_NAME
) -> None:
    f.attrs["format"] = kind
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["histoduo_version"] = __version__
    if class_names is not None:
        f.attrs["class_names"] = _json_attr(list(class_names))


def _check_header(f: h5py.File, path: Path, kind: str = FORMAT_NAME) -> int:
    """The file's format version; raises unless it is a ``kind`` file this version reads."""
    if f.attrs.get("format") != kind:
        what = "tile store" if kind == FORMAT_NAME else "histoduo slide file"
        raise StoreError(path, f"not a {what} (no 'format' attribute {kind!r})")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            path,
            f"store format version {version} is newer than this histoduo reads "
            f"({FORMAT_VERSION}); upgrade histoduo",
        )
    return version


def store_version(path: str | Path) -> int | None:
    """1 or 2 for a tile store (index), None for anything else (missing, not HDF5, ...)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_NAME:
                return None
            return int(f.attrs.get("format_version", -1))
    except OSError:
        return None


def upgrade_hint(path: str | Path) -> str:
    """Why a format-1 store cannot be added to, and the command that fixes it."""
    return (
        f"it is a format-1 tile store; run `histoduo upgrade-store {path}` once to rewrite it "
        f"as format 2 (per-slide files CLAM and TRIDENT read), or pass --overwrite"
    )


@dataclass(frozen=True)
class IndexEntry:
    """One slide of an index: its name, the file holding it and the object path in there."""

    name: str
    file: Path  # absolute, resolved from the index's own folder
    h5_path: str = "/"  # "/" for a slide file; "/slides/<key>" for a group of a format-1 file
    record: SlideRecord | None = None  # a copy of the file's record, so resume opens no file

    @classmethod
    def of(cls, record: SlideRecord, file: Path) -> IndexEntry:
        return cls(record.name, Path(file).resolve(), "/", record)


def read_index(index_path: str | Path) -> tuple[dict[str, IndexEntry], list[str]]:
    """(entries by slide name, class names) of a format-2 index.

    Link targets are relative to the index's folder (so the store moves as a whole) and are
    resolved here, not by HDF5, so the current directory never matters.
    """
    index_path = Path(index_path)
    with h5py.File(index_path, "r") as f:
        _check_header(f, index_path)
        names: dict[str, str] = {}
        records: dict[str, SlideRecord] = {}
        if "slide_names" in f:  # a dataset: an attribute would cap the store at ~1,500 slides
            for key, name, record in f["slide_names"].asstr()[()]:
                names[str(key)] = str(name)
                if record:
                    records[str(key)] = SlideRecord.from_attrs(json.loads(record))
        raw = f.attrs.get("class_names")
        class_names = json.loads(raw) if raw else []
        entries: dict[str, IndexEntry] = {}
        group = f.get(SLIDES_GROUP)
        keys = list(group.keys()) if group is not None else []
        for key in keys:
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.ExternalLink):
                raise StoreError(index_path, f"slide {key!r} is not an external link")
            target = Path(link.filename)
            if not target.is_absolute():
                target = index_path.parent / target
            name = str(names.get(key, key))
            file = Path(os.path.normpath(target))
            entries[name] = IndexEntry(name, file, link.path, records.get(key))
    return entries, class_names


def write_index(
    index_path: str | Path,
    entries: Iterable[IndexEntry],
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the index atomically (tmp + rename): readers see the old one or the new one."""
    index_path = Path(index_path)
    folder = index_path.resolve().parent
    with atomic_path(index_path) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_header(f, class_names)
            group = f.create_group(SLIDES_GROUP)
            rows: dict[str, tuple[str, str, str]] = {}
            for entry in sorted(entries, key=lambda e: e.name):
                key = group_key(entry.name)
                if key in rows:
                    raise StoreError(index_path, f"slide {entry.name!r} listed twice")
                record = "" if entry.record is None else _json_attr(entry.record.to_attrs())
                rows[key] = (key, entry.name, record)
                rel = os.path.relpath(Path(entry.file).resolve(), folder)
                group[key] = h5py.ExternalLink(rel, entry.h5_path)
            table = np.array(list(rows.values()), dtype=object).reshape(-1, 3)
            f.create_dataset("slide_names", data=table, dtype=h5py.string_dtype())
    return index_path


# --- writing one slide file -----------------------------------------------------------------


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
        self._file = h5py.File(self.tmp_path, "w")
        root = self._file
        _write_header(root, kind=SLIDE_FILE_FORMAT)
        for key, value in data.attrs.items():
            root.attrs[key] = value
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
        self._file.attrs["complete"] = True  # last: readers trust nothing without it
        self._file.flush()
        self._file.close()
        return commit_path(self.tmp_path, self.final_path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def read_slide_record(path: str | Path) -> SlideRecord | None:
    """The record of a complete slide file, or None (missing, truncated, incomplete)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != SLIDE_FILE_FORMAT or not bool(
                f.attrs.get("complete", False)
            ):
                return None
            return SlideRecord.from_attrs(dict(f.attrs), dict(f["coords"].attrs))
    except (OSError, KeyError, TypeError, ValueError):
        return None


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
            _write_header(dst, kind=SLIDE_FILE_FORMAT)
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
            dst.attrs["complete"] = True
    return dest


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


def complete_slides(path: Path) -> dict[str, SlideRecord]:
    """Names and records of the complete slides of a store (either format) or slide file.

    Used for resume: an unreadable or truncated file counts as holding nothing, and so does
    a listed slide whose file is missing or incomplete.
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
        # Files at their final names are complete by construction: the index's copy of the
        # record is enough, and resuming a store of N slides opens none of them.
        if entry.record is not None and entry.file.exists():
            record: SlideRecord | None = entry.record
        elif entry.h5_path == "/":
            record = read_slide_record(entry.file)
        else:
            record = _v1_complete(entry.file).get(name)
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


def _store_files(index_path: Path) -> Iterator[tuple[Path, str]]:
    """(path, slide key or None for a temporary file) of the files in the store's folder."""
    for folder, suffix in (
        (clam_dir(index_path) / "patches", ".h5"),
        (trident_dir(index_path) / "patches", "_patches.h5"),
    ):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                yield path, ""
            elif path.name.endswith(suffix):
                yield path, path.name[: -len(suffix)]


def remove_temporary(index_path: Path) -> int:
    """Delete the temporary files a killed writer left in the store's folder (never trusted:
    complete files are renamed to their final names)."""
    stale = [path for path, key in _store_files(index_path) if not key]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def remove_unlisted(index_path: Path, keep: Iterable[IndexEntry]) -> int:
    """Delete slide and TRIDENT files in the store's folder that the index does not list
    (slides an --overwrite dropped) and temporary files; returns the count."""
    kept = {group_key(e.name) for e in keep}
    gone = [path for path, key in _store_files(index_path) if key not in kept]
    for path in gone:
        path.unlink(missing_ok=True)
    return len(gone)


def orphan_slides(index_path: Path, listed: Iterable[str]) -> dict[str, SlideRecord]:
    """Complete slide files in the store's folder that the index does not list yet (a run
    killed after a slide's rename and before the next index write): they are kept."""
    folder = clam_dir(index_path) / "patches"
    if not folder.is_dir():
        return {}
    listed_keys = {group_key(n) for n in listed}
    found = {}
    for path in sorted(folder.glob("*.h5")):
        if path.stem in listed_keys:
            continue
        record = read_slide_record(path)
        if record is not None and group_key(record.name) == path.stem:
            found[record.name] = record
    return found


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


def _store_entries(path: Path) -> tuple[dict[str, IndexEntry], list[str], int]:
    version = store_version(path)
    if version is None:
        if not path.exists():
            raise StoreError(path, "tile store not found")
        raise StoreError(path, "not a histoduo tile store")
    if version < 2:
        entries = {
            name: IndexEntry(name, path.resolve(), f"/{SLIDES_GROUP}/{group_key(name)}")
            for name in _v1_complete(path)
        }
        class_names = store_class_names(path) or []
        return entries, class_names, version
    entries, class_names = read_index(path)
    return entries, class_names, version


def merge_stores(
    inputs: Sequence[Path], out_path: Path, *, link: bool = False, overwrite: bool = False
) -> list[str]:
    """Combine complete slides of several stores into one; returns the slide names.

    Slide files are hard-linked into the output's folder (copied only across file systems),
    so merging costs O(slides added), not O(store). ``out_path`` may be one of the inputs:
    the other inputs' slides are then added to it in place. ``link=True`` lists the input
    files in the index instead (the inputs must then stay where they are relative to it).
    Format-1 inputs are converted slide by slide. Names must be unique; vocabularies agree.
    """
    out_path = Path(out_path)
    inputs = [Path(p) for p in inputs]
    into = [p for p in inputs if p.exists() and out_path.exists() and os.path.samefile(p, out_path)]
    if out_path.exists() and not overwrite and not into:
        raise StoreError(out_path, "output exists; pass --overwrite to replace it")
    if into and store_version(out_path) == 1:
        raise StoreUpgradeNeeded(out_path, upgrade_hint(out_path))
    entries: dict[str, IndexEntry] = {}
    class_names: list[str] | None = None
    plan: list[tuple[Path, IndexEntry, int]] = []
    for path in inputs:
        found, names, version = _store_entries(path)
        if names:
            if class_names is not None and class_names != names:
                raise StoreError(path, f"class names {names} differ from {class_names}")
            class_names = names
        for name, entry in found.items():
            if name in entries or any(e.name == name for _, e, _ in plan):
                raise StoreError(path, f"slide {name!r} appears in more than one input")
            if into and path == into[0]:
                entries[name] = entry
            else:
                plan.append((path, entry, version))
    for path, entry, version in plan:
        if link:
            entries[entry.name] = entry
        elif version < 2:
            dest = convert_v1_slide(path, entry.name, slide_file_path(out_path, entry.name))
            entries[entry.name] = install_slide_file(out_path, dest, entry.name)
        else:
            entries[entry.name] = install_slide_file(out_path, entry.file, entry.name, how="link")
    write_index(out_path, entries.values(), class_names)
    if not into:
        remove_unlisted(out_path, [e for e in entries.values() if _inside(out_path, e.file)])
    return sorted(entries)


def _inside(index_path: Path, file: Path) -> bool:
    try:
        Path(file).resolve().relative_to(store_folder(index_path).resolve())
    except ValueError:
        return False
    return True


def upgrade_store(path: str | Path) -> list[str]:
    """Rewrite a format-1 store as format 2 at the same path; returns the slide names.

    Slide files are written first, the index replaces the old file last (atomically), so a
    killed upgrade leaves the format-1 store readable and can simply be run again.
    """
    path = Path(path)
    version = store_version(path)
    if version is None:
        raise StoreError(path, "not a histoduo tile store")
    if version >= 2:
        return sorted(read_index(path)[0])
    class_names = store_class_names(path)
    entries = []
    for name in sorted(_v1_complete(path)):
        dest = convert_v1_slide(path, name, slide_file_path(path, name))
        entries.append(install_slide_file(path, dest, name))
    write_index(path, entries, class_names)
    remove_unlisted(path, entries)
    return [e.name for e in entries]


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
                self.version = _check_header(f, self.path)
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
        self._entries = entries
        self._slides = sorted(entries)

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
        if entry.h5_path == "/" and not bool(group.attrs.get("complete", False)):
            raise StoreError(entry.file, f"slide file of {slide!r} is not complete")
        return group

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
