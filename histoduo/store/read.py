"""Reading stores: :class:`TileStore`, and what a resume needs to know about a file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo.store.record import (
    SLIDES_GROUP,
    UNLABELLED,
    SlideRecord,
    StoreError,
    check_header,
    group_key,
)
from histoduo.tileio import decode_jpeg


def complete_slides(path: Path) -> dict[str, SlideRecord]:
    """Names and records of the complete slides in a store or part file ({} if unreadable).

    Used for resume: an unreadable or truncated file counts as holding nothing.
    """
    try:
        with h5py.File(path, "r") as f:
            check_header(f, path)
            slides = f.get(SLIDES_GROUP)
            if slides is None:
                return {}
            records = {}
            for group in slides.values():
                if not bool(group.attrs.get("complete", False)):
                    continue
                try:
                    record = SlideRecord.from_attrs(dict(group.attrs), dict(group["coords"].attrs))
                except (KeyError, TypeError, ValueError):
                    continue  # a group this version cannot read is redone
                records[record.name] = record
            return records
    except (OSError, StoreError, KeyError):
        return {}


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
            check_header(self._file, self.path)
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
