"""The store schema in code: format constants, the headers, and :class:`SlideRecord`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo import __version__
from histoduo.runtime.errors import HistoduoError
from histoduo.slide import mpp_to_magnification

FORMAT_NAME = "histoduo-tilestore"
FORMAT_VERSION = 2
SLIDE_FILE_FORMAT = "histoduo-slide"  # the root of a per-slide file
SLIDES_GROUP = "slides"
UNLABELLED = -1
# Per-tile artefact QC beside tissue_fraction (histoduo.qc); absent = not checked.
QC_DATASETS = ("qc_pen", "qc_blur", "qc_fold", "qc_flags")


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
    # The scanner's nominal objective power (metadata); kept for the record only, because
    # TRIDENT derives its read area from level0_magnification / target_magnification and
    # those must be 10 / the mpp actually used (override included) to land on our read.
    scanner_magnification: float | None = None
    read_size_px: int | None = None  # side of the square read at read_level; None: derived
    # The slide file's identity: a random id written into the file when it is created and
    # copied into the index, so a file swapped for another one is told apart ("" in files
    # written before it existed).
    file_id: str = ""
    class_names: list[str] | None = None  # the store's label vocabulary, so a lost index
    # can be rebuilt from the slide files alone

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
        attrs["level0_magnification"] = self.level0_magnification
        attrs["scanner_magnification"] = (
            float("nan") if self.scanner_magnification is None else self.scanner_magnification
        )
        if self.file_id:
            attrs["file_id"] = self.file_id
        if self.class_names is not None:
            attrs["class_names"] = _json_attr(list(self.class_names))
        return attrs

    @property
    def level0_magnification(self) -> float:
        """10 / the slide mpp actually used: with ``target_magnification`` (10 / target mpp)
        TRIDENT's ratio is target mpp / slide mpp, the scale histoduo tiled at."""
        return mpp_to_magnification(self.slide_mpp)

    @property
    def target_magnification(self) -> float:
        return mpp_to_magnification(self.target_mpp)

    def legacy_imgs_attrs(self) -> dict[str, Any]:
        """Attributes of a raw store's ``imgs`` dataset as CLAM's legacy patch files had them.

        They describe the stored pixels: each tile covers ``tile_size_level0`` level-0 px in
        ``tile_size_px`` px, so a stitcher that divides level-0 coords by ``downsample``
        places every tile on a canvas of ``downsampled_level_dim``.
        """
        scale = self.tile_size_level0 / self.tile_size_px
        dim = np.array(
            [round(self.level0_width / scale), round(self.level0_height / scale)], dtype=np.int64
        )
        return {
            "patch_level": self.read_level,
            "wsi_name": self.name,
            "downsample": np.array([scale, scale], dtype=np.float64),
            "level_dim": dim,
            "downsampled_level_dim": dim.copy(),
        }

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
            "level0_magnification": self.level0_magnification,
            "target_magnification": self.target_magnification,
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
        # Before scanner_magnification existed, level0_magnification held the scanner's power.
        magnification = a.get("scanner_magnification", a.get("level0_magnification"))
        if magnification is not None and not np.isfinite(magnification):
            magnification = None
        names = a.get("class_names")
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
            scanner_magnification=float(magnification) if magnification is not None else None,
            read_size_px=int(a["read_size_px"]) if "read_size_px" in a else None,
            file_id=str(a.get("file_id", "")),
            class_names=json.loads(names) if isinstance(names, str) else names,
        )


def write_store_header(
    f: h5py.File, class_names: Sequence[str] | None = None, *, kind: str = FORMAT_NAME
) -> None:
    f.attrs["format"] = kind
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["histoduo_version"] = __version__
    if class_names is not None:
        f.attrs["class_names"] = _json_attr(list(class_names))


def check_header(f: h5py.File, path: Path, kind: str = FORMAT_NAME) -> int:
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


def not_a_store_error(path: str | Path) -> StoreError:
    """Why ``path`` (for which :func:`store_version` gave None) is not a store, in words."""
    path = Path(path)
    if not path.exists():
        return StoreError(path, "tile store not found")
    try:
        with h5py.File(path, "r"):
            pass
    except OSError as exc:  # truncated, random bytes, another format
        return StoreError(path, f"cannot open as HDF5 ({exc})")
    return StoreError(path, "an HDF5 file but not a histoduo tile store")


def upgrade_hint(path: str | Path) -> str:
    """Why a format-1 store cannot be added to, and the command that fixes it."""
    return (
        f"it is a format-1 tile store; run `histoduo upgrade-store {path}` once to rewrite it "
        f"as format 2 (per-slide files CLAM and TRIDENT read; every slide is kept)"
    )
