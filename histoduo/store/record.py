"""The store schema in code: format constants, the header, and :class:`SlideRecord`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo import __version__
from histoduo.run.errors import HistoduoError
from histoduo.slide import mpp_to_magnification

FORMAT_NAME = "histoduo-tilestore"
FORMAT_VERSION = 1
SLIDES_GROUP = "slides"
UNLABELLED = -1


class StoreError(HistoduoError):
    """A tile store is missing, corrupt, or not a histoduo store; names the file."""


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
    # Where the pixels were read (CLAM's patch_level / downsample / level_dim).
    read_level: int = 0
    read_level_downsample: float = 1.0
    read_level_width: int | None = None  # None: level 0's
    read_level_height: int | None = None
    level0_magnification: float | None = None  # None: from slide_mpp

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
        return attrs

    def coords_attrs(self) -> dict[str, Any]:
        """TRIDENT and CLAM attributes of the ``coords`` dataset."""
        level_w = self.read_level_width if self.read_level_width is not None else self.level0_width
        level_h = (
            self.read_level_height if self.read_level_height is not None else self.level0_height
        )
        level_dim = np.array([level_w, level_h], dtype=np.int64)
        return {
            # TRIDENT
            "patch_size": self.tile_size_px,
            "patch_size_level0": self.tile_size_level0,
            "level0_magnification": float(
                self.level0_magnification or mpp_to_magnification(self.slide_mpp)
            ),
            "target_magnification": mpp_to_magnification(self.target_mpp),
            "overlap": max(0, self.tile_size_px - self.stride_px),
            "name": self.name,
            "level0_width": self.level0_width,
            "level0_height": self.level0_height,
            # CLAM (patch_level/downsample: the pyramid level the tiles were read from)
            "patch_level": self.read_level,
            "downsample": np.array([self.read_level_downsample] * 2, dtype=np.float64),
            "downsampled_level_dim": level_dim,
            "level_dim": level_dim.copy(),
        }

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
            read_level=int(c.get("patch_level", 0)),
            read_level_downsample=float(np.ravel(c.get("downsample", [1.0]))[0]),
            read_level_width=int(level_dim[0]) if level_dim is not None else None,
            read_level_height=int(level_dim[1]) if level_dim is not None else None,
            level0_magnification=(
                float(c["level0_magnification"]) if "level0_magnification" in c else None
            ),
        )


def write_store_header(f: h5py.File, class_names: Sequence[str] | None = None) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["histoduo_version"] = __version__
    if class_names is not None:
        f.attrs["class_names"] = _json_attr(list(class_names))


def check_header(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT_NAME:
        raise StoreError(path, "not a histoduo tile store (no 'format' attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            path,
            f"store format version {version} is newer than this histoduo reads "
            f"({FORMAT_VERSION}); upgrade histoduo",
        )
