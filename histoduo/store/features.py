"""Tile feature files in TRIDENT's layout: ``DIR/features_<encoder>/<slide>.h5``.

One file per slide holds ``features`` (N, D) and ``coords`` (N, 2) int64 level-0 top-left
corners, in the same row order. ``coords`` carries the tile store's TRIDENT attributes, so
TRIDENT's and CLAM's slide-level code read the file unchanged; the file's own attributes say
which encoder (and which weights file, by hash) made the features, at what resolution and
with what normalisation. ``complete`` is written last: a file without it is a killed write.

Embedding writes these files; heads on cached features and MIL read them, one bag at a time,
so a cohort never has to fit in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo.qc.params import excluded_tiles
from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.files import atomic_path
from histoduo.store.record import group_key

FEATURE_FILE_FORMAT = "histoduo-features"
FEATURE_FILE_VERSION = 1


class FeatureFileError(HistoduoError):
    """A feature file that is missing, incomplete or not in the expected layout."""


def feature_dir(out_dir: str | Path, encoder: str) -> Path:
    """``out_dir/features_<encoder>``: where ``embed`` writes, what ``train-mil`` reads."""
    return Path(out_dir) / f"features_{group_key(encoder)}"


def feature_file_path(features_dir: str | Path, slide: str) -> Path:
    """The file of one slide; slide names with ``/`` or spaces map to safe file names."""
    return Path(features_dir) / f"{group_key(slide)}.h5"


@dataclass(frozen=True, kw_only=True)
class FeatureInfo:
    """What made a feature file: the provenance every reader can check."""

    slide: str
    encoder: str
    weights_sha256: str = ""  # empty for encoders without a weights file
    embedding_dim: int
    mpp: float  # resolution of the tiles that were embedded
    input_size_px: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra"] = json.dumps(dict(self.extra), sort_keys=True)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], path: Path) -> FeatureInfo:
        try:
            return cls(
                slide=str(attrs["slide"]),
                encoder=str(attrs["encoder"]),
                weights_sha256=str(attrs.get("weights_sha256", "")),
                embedding_dim=int(attrs["embedding_dim"]),
                mpp=float(attrs["mpp"]),
                input_size_px=int(attrs["input_size_px"]),
                mean=tuple(float(v) for v in attrs["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in attrs["std"]),  # type: ignore[arg-type]
                extra=json.loads(str(attrs.get("extra", "{}"))),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise FeatureFileError(path, f"feature file attributes are incomplete ({exc})") from exc


@dataclass(frozen=True)
class FeatureBag:
    """One slide's features and tile coordinates (level-0 px), rows aligned."""

    info: FeatureInfo
    features: np.ndarray  # (N, D)
    coords: np.ndarray  # (N, 2) int64
    qc_flags: np.ndarray | None = None  # uint8 (N,) from the tile store; None: never checked
    qc_mode: str | None = None  # the --qc the slide was tiled with
    rows: np.ndarray | None = None  # the rows' tile numbers in the file; None: all, in order

    @property
    def slide(self) -> str:
        return self.info.slide

    @property
    def tile_numbers(self) -> np.ndarray:
        """Each row's tile number in the slide (the store's and the file's row), also after
        :meth:`kept` dropped some."""
        return np.arange(len(self.coords)) if self.rows is None else self.rows

    def kept(self, qc: str | None = None) -> FeatureBag:
        """The bag without the tiles QC policy leaves out (``qc`` exclude / flag / off; None
        follows the mode the slide was tiled with), as tile training and the grade do.

        A bag whose every tile is flagged is returned whole: a slide model needs tiles to
        call, and the slide's QC burden in the tile store says why it is doubtful."""
        excluded = excluded_tiles(self.qc_flags, qc, self.qc_mode)
        if excluded is None or not excluded.any() or excluded.all():
            return self
        keep = ~excluded
        return replace(
            self,
            features=self.features[keep],
            coords=self.coords[keep],
            qc_flags=None if self.qc_flags is None else self.qc_flags[keep],
            rows=self.tile_numbers[keep],
        )


def write_feature_file(
    path: str | Path,
    info: FeatureInfo,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: Mapping[str, Any] | None = None,
    *,
    dtype: str = "float16",
    qc_flags: np.ndarray | None = None,
    qc_mode: str | None = None,
) -> Path:
    """Write one slide's features atomically (a reader never sees half a file).

    ``qc_flags``: the tile store's per-tile QC flags (row for row), kept so slide-level
    training can leave flagged tiles out as tile training does; an extra dataset, which
    TRIDENT- and CLAM-style readers of ``features``/``coords`` never look at."""
    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise FeatureFileError(
            path, f"features {features.shape} and coords {coords.shape} do not match row for row"
        )
    if features.shape[1] != info.embedding_dim:
        raise FeatureFileError(
            path, f"features have {features.shape[1]} dims, the encoder says {info.embedding_dim}"
        )
    if qc_flags is not None and len(qc_flags) != len(coords):
        raise FeatureFileError(path, f"{len(qc_flags)} QC flags for {len(coords)} tiles")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FEATURE_FILE_FORMAT
        f.attrs["format_version"] = FEATURE_FILE_VERSION
        for key, value in info.to_attrs().items():
            f.attrs[key] = value
        f.create_dataset("features", data=features.astype(dtype))
        ds = f.create_dataset("coords", data=coords)
        for key, value in (coords_attrs or {}).items():
            ds.attrs[key] = value
        if qc_flags is not None:
            flags = f.create_dataset("qc_flags", data=np.asarray(qc_flags, np.uint8))
            flags.attrs["mode"] = qc_mode or "flag"
        f.attrs["complete"] = True
    return path


def _open_checked(path: Path) -> h5py.File:
    if not path.is_file():
        raise FeatureFileError(path, "feature file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(path, f"not a readable HDF5 feature file ({exc})") from exc
    if f.attrs.get("format") != FEATURE_FILE_FORMAT or not f.attrs.get("complete", False):
        f.close()
        raise FeatureFileError(path, "not a complete histoduo feature file (rerun embed)")
    if "features" not in f or "coords" not in f:
        f.close()
        raise FeatureFileError(path, "feature file lacks its 'features' or 'coords' dataset")
    return f


def read_feature_info(path: str | Path) -> FeatureInfo:
    """The provenance of a feature file, without reading its features."""
    path = Path(path)
    with _open_checked(path) as f:
        return FeatureInfo.from_attrs(dict(f.attrs), path)


def read_feature_bag(path: str | Path, *, dtype: str = "float32") -> FeatureBag:
    """One slide's features (as ``dtype``) and coordinates."""
    path = Path(path)
    with _open_checked(path) as f:
        info = FeatureInfo.from_attrs(dict(f.attrs), path)
        features = f["features"][()].astype(dtype, copy=False)
        coords = f["coords"][()].astype(np.int64, copy=False)
        qc_flags, qc_mode = None, None
        if "qc_flags" in f:
            qc_flags = f["qc_flags"][()].astype(np.uint8, copy=False)
            qc_mode = str(f["qc_flags"].attrs.get("mode", "flag"))
    shape_ok = features.ndim == 2 and features.shape[1] == info.embedding_dim
    if not shape_ok or len(features) != len(coords):
        raise FeatureFileError(path, f"features {features.shape} disagree with coords/attributes")
    if qc_flags is not None and len(qc_flags) != len(coords):
        raise FeatureFileError(path, f"{len(qc_flags)} QC flags for {len(coords)} tiles")
    return FeatureBag(info, features, coords, qc_flags, qc_mode)


def feature_files(features_dir: str | Path) -> dict[str, Path]:
    """Slide name -> feature file for every complete file in a ``features_<encoder>`` folder."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FeatureFileError(features_dir, "feature folder not found")
    found: dict[str, Path] = {}
    for path in sorted(features_dir.glob("*.h5")):
        found[read_feature_info(path).slide] = path
    return found


def iter_feature_bags(files: Mapping[str, Path]) -> Iterator[FeatureBag]:
    """Bags one at a time, in the mapping's order."""
    for path in files.values():
        yield read_feature_bag(path)
