"""Existing patch datasets (folders of labelled images) -> a tile store.

Public patch datasets come as class-per-subfolder image folders, ``FOLDER/<class>/*.png``
(``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``), sometimes with a CSV that names each image's class,
slide or patient, and resolution. ``import_images`` writes them in the tile-store layout of
docs/tile-store.md, so ``train``, ``evaluate`` and ``predict`` treat them like tiled slides.

Choices, and why:

- **Groups.** One slide group per slide id (or patient id, when the CSV has only that): splits
  are made over groups, so images of one slide never straddle train and validation. Without
  ids every image is its own group and splits are per image (tile-level in effect) - fine for
  datasets that were split that way, optimistic otherwise; a warning says so.
- **Tile size.** Each image is centre-cropped to a square (its shorter side) and resized to
  ``tile_size_px``: cropping keeps the pixels isotropic, which matters more for histology
  than the lost border. The default keeps the images' own size when they are all square and
  the same size; otherwise ``tile_size_px`` must be given.
- **Resolution.** ``target_mpp`` is the resolution of the stored tiles: the images' own mpp
  (``--mpp`` or a CSV ``mpp`` column) scaled by source side / tile size, so it stays true when
  images are resized. Images of different sizes cannot all land on one resolution; the store
  then records the median and the run warns with the spread. Prediction needs ``target_mpp``
  to tile slides at the training resolution, so an unknown mpp is an error.
- **Coordinates.** Images have no position on a slide, so each group is laid out as a
  synthetic mosaic: image ``i`` of a group sits at grid cell ``(i % cols, i // cols)`` with
  ``cols = ceil(sqrt(n))``, i.e. ``x = (i % cols) * tile_size_px``; level 0 is the tile grid
  (``slide_mpp`` = ``target_mpp``). The group's thumbnail is that mosaic, shrunk, and its
  tissue mask is 1 wherever an image sits, so prediction heatmaps draw over the mosaic.
  ``tissue_fraction`` is 1.0 for every image.
- **Encoding.** JPEG (quality 90) by default; JPEG inputs that need no resize are stored
  byte for byte (no second lossy pass). ``raw`` stores exact pixels.

Bad inputs fail with the file named: unknown class names (a CSV label that is not a class
folder or in ``class_names``), images that do not decode, an empty folder. With
``skip_errors`` unreadable images are left out and listed in ``<out>.report.json``.
The store is written atomically (part files, then ``assemble_store``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.run.errors import HistoduoError
from histoduo.run.files import atomic_write_text
from histoduo.run.pool import pool_context
from histoduo.store import (
    SlideGroupData,
    SlidePartWriter,
    SlideRecord,
    StoreError,
    assemble_store,
    group_key,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ENCODINGS = ("jpeg", "raw")
_IMAGE_COLUMNS = ("image", "path", "file", "filename")
_LABEL_COLUMNS = ("label", "class")
_THUMBNAIL_MAX_PX = 256  # long side of a group's mosaic thumbnail
_CHUNK_IMAGES = 32  # images per worker task
_MPP_SPREAD_WARNING = 1.10  # warn when stored resolutions differ by more than 10%


class ImageImportError(HistoduoError):
    """An image folder, image or label CSV is unusable; names the file."""


@dataclass(frozen=True)
class ImportParams:
    """How images become tiles; recorded in every group's ``params`` attribute."""

    tile_size_px: int | None = None  # None: the images' own size (all square and equal)
    mpp: float | None = None  # the images' resolution (um/px) when the CSV has no mpp column
    encoding: str = "jpeg"
    jpeg_quality: int = 90
    class_names: tuple[str, ...] | None = None  # label order; None: sorted class folders

    def __post_init__(self) -> None:
        if self.tile_size_px is not None and self.tile_size_px < 8:
            raise ValueError(f"tile size must be at least 8 px, got {self.tile_size_px}")
        if self.mpp is not None and not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise ValueError(f"--mpp must be positive, got {self.mpp}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be 1-100, got {self.jpeg_quality}")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"duplicate names in the class list {list(self.class_names)}")


@dataclass
class ImageEntry:
    """One image to import: where it is, its class and group, and (after probing) its size."""

    path: Path
    name: str  # path relative to the folder (posix), the image's name in reports
    label: int
    group: str
    patient: str | None = None
    mpp: float | None = None
    size_px: tuple[int, int] | None = None  # (width, height) from the file header


@dataclass
class ImportReport:
    """What an import did: written to ``<out>.report.json``."""

    store: str
    params: dict[str, Any]
    class_names: list[str]
    tile_size_px: int
    target_mpp: float
    groups: dict[str, list[str]]  # group -> its images, in tile order
    skipped: list[dict[str, str]] = field(default_factory=list)  # image, error
    warnings: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(len(images) for images in self.groups.values())

    def write(self, out_path: Path) -> Path:
        path = out_path.with_name(out_path.name + ".report.json")
        payload = {"histoduo_version": _version(), "n_images": self.n_images, **asdict(self)}
        return atomic_write_text(path, json.dumps(payload, indent=2))


def _version() -> str:
    from histoduo import __version__

    return __version__


# --- finding images and labels ---------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Subfolder name -> its images (searched recursively), for subfolders holding images."""
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.rglob("*") if _is_image(p))
        if images:
            found[sub.name] = images
    return found


def _vocabulary(
    folder: Path, folder_classes: Sequence[str], given: Sequence[str] | None
) -> list[str]:
    if given is None:
        return sorted(folder_classes)
    unknown = sorted(set(folder_classes) - set(given))
    if unknown:
        raise ImageImportError(
            folder / unknown[0],
            f"class folder(s) {unknown} not among the given classes {list(given)}",
        )
    return list(given)


def scan_folder(
    folder: Path, class_names: Sequence[str] | None
) -> tuple[list[ImageEntry], list[str]]:
    """Images of a class-per-subfolder folder, each its own group, and the class names."""
    classes = _class_folders(folder)
    if not classes:
        loose = [p for p in folder.iterdir() if _is_image(p)]
        hint = (
            "images lie directly in the folder; put them in one subfolder per class or pass "
            "--labels CSV"
            if loose
            else f"expected {folder}/<class>/*{{{','.join(IMAGE_SUFFIXES)}}}"
        )
        raise ImageImportError(folder, f"no images in class subfolders ({hint})")
    names = _vocabulary(folder, list(classes), class_names)
    entries = []
    for class_name, images in classes.items():
        for path in images:
            rel = path.relative_to(folder).as_posix()
            entries.append(ImageEntry(path, rel, names.index(class_name), rel))
    return entries, names


def _column(columns: Sequence[str], choices: Sequence[str]) -> str | None:
    return next((c for c in choices if c in columns), None)


def read_labels_csv(
    csv_path: Path, folder: Path, class_names: Sequence[str] | None
) -> tuple[list[ImageEntry], list[str], int]:
    """Images listed in a CSV (the manifest), their classes and groups.

    Columns: ``image`` (or path/file/filename: relative to the folder, absolute, or a bare
    file name that is unique in the folder), ``label`` (or class; empty = the image's class
    folder), optional ``slide`` and/or ``patient`` (the group), optional ``mpp``. Returns the
    entries, the class names and how many images in the folder the CSV leaves out.
    """
    import pandas as pd

    if not csv_path.is_file():
        raise ImageImportError(csv_path, "label CSV not found")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageImportError(csv_path, f"cannot read as CSV ({exc})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    image_col = _column(frame.columns, _IMAGE_COLUMNS)
    if image_col is None:
        raise ImageImportError(
            csv_path, f"needs an image column (one of {', '.join(_IMAGE_COLUMNS)})"
        )
    label_col = _column(frame.columns, _LABEL_COLUMNS)
    folder_classes = _class_folders(folder)
    on_disk = sorted({p for images in folder_classes.values() for p in images})
    on_disk += sorted(p for p in folder.iterdir() if _is_image(p))
    by_file_name: dict[str, list[Path]] = {}
    for path in on_disk:
        by_file_name.setdefault(path.name, []).append(path)
    if class_names is not None:
        names = list(class_names)
    elif folder_classes:
        names = sorted(folder_classes)
    else:  # a flat folder: the CSV's labels are the vocabulary
        names = sorted({v.strip() for v in frame[label_col]} - {""}) if label_col else []

    entries: list[ImageEntry] = []
    seen: set[Path] = set()
    for row_number, row in enumerate(frame.to_dict("records"), start=2):  # 1 = header
        where = f"{csv_path} (line {row_number})"
        value = row[image_col].strip()
        if not value:
            raise ImageImportError(where, "empty image name")
        path = _resolve_image(value, folder, by_file_name, where)
        rel = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)
        if path in seen:
            raise ImageImportError(where, f"image {value!r} is listed twice")
        seen.add(path)
        label_name = row[label_col].strip() if label_col else ""
        if not label_name:
            parts = Path(rel).parts
            label_name = parts[0] if len(parts) > 1 and parts[0] in folder_classes else ""
        if not label_name:
            raise ImageImportError(where, f"no label for {value!r} (no label column value and "
                                   "not in a class folder)")  # fmt: skip
        if label_name not in names:
            raise ImageImportError(
                csv_path,
                f"unknown class name {label_name!r} (line {row_number}, image {value!r}); "
                f"the classes are {names}" + ("" if class_names else " (the class folders)"),
            )
        slide = row.get("slide", "").strip()
        patient = row.get("patient", "").strip() or None
        mpp = _parse_mpp(row.get("mpp", ""), where)
        entries.append(
            ImageEntry(path, rel, names.index(label_name), slide or patient or rel, patient, mpp)
        )
    if not entries:
        raise ImageImportError(csv_path, "lists no images")
    return entries, names, len(set(on_disk) - seen)


def _resolve_image(
    value: str, folder: Path, by_file_name: dict[str, list[Path]], where: str
) -> Path:
    candidate = Path(value)
    for path in (folder / candidate, candidate):
        if path.is_file():
            return path
    matches = by_file_name.get(candidate.name, []) if len(candidate.parts) == 1 else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ImageImportError(
            where, f"image name {value!r} is ambiguous ({len(matches)} files); give its path"
        )
    raise ImageImportError(where, f"image {value!r} not found in {folder}")


def _parse_mpp(text: str, where: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise ImageImportError(where, f"mpp must be a positive number, got {text!r}")
    return value


# --- geometry --------------------------------------------------------------------------------


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


# --- reading images (in worker processes) ----------------------------------------------------


@dataclass(frozen=True)
class _LoadTask:
    paths: tuple[str, ...]
    tile_size_px: int
    cell_px: int
    encoding: str
    jpeg_quality: int


@dataclass
class _Loaded:
    tile: np.ndarray | None  # JPEG bytes or (T, T, 3) uint8
    cell: np.ndarray | None  # (c, c, 3) uint8 thumbnail cell
    error: str = ""


def square_tile(image: np.ndarray, tile_size_px: int) -> np.ndarray:
    """Centre-crop an RGB array to a square (its shorter side) and resize it to the tile."""
    from histoduo.slide import resize_rgb

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(image[top : top + side, left : left + side])
    return resize_rgb(square, (tile_size_px, tile_size_px))


def _load_one(path: str, task: _LoadTask) -> _Loaded:
    from PIL import Image

    from histoduo.slide import resize_rgb
    from histoduo.tileio import encode_jpeg

    try:
        with Image.open(path) as image:
            image.load()  # the full decode: a truncated file fails here, not in training
            keep_bytes = (
                task.encoding == "jpeg"
                and image.format == "JPEG"
                and image.mode == "RGB"
                and image.size == (task.tile_size_px, task.tile_size_px)
            )
            rgb = np.asarray(image.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
        return _Loaded(None, None, f"cannot decode ({type(exc).__name__}: {exc})")
    tile = square_tile(rgb, task.tile_size_px)
    cell = resize_rgb(tile, (task.cell_px, task.cell_px))
    if keep_bytes:  # already the right size: no second lossy JPEG pass
        return _Loaded(np.fromfile(path, dtype=np.uint8), cell)
    if task.encoding == "jpeg":
        return _Loaded(encode_jpeg(tile, task.jpeg_quality), cell)
    return _Loaded(tile, cell)


def _load_chunk(task: _LoadTask) -> list[_Loaded]:
    return [_load_one(path, task) for path in task.paths]


def _pool(workers: int) -> Any:
    # Workers start clean (never a fork of a parent holding HDF5 handles).
    return pool_context(["histoduo.importer", "PIL.Image", "imagecodecs"]).Pool(workers)


# --- writing ---------------------------------------------------------------------------------


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
        histoduo_version=_version(),
        level0_magnification=10.0 / target_mpp,
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


def import_images(
    folder: str | Path,
    out_path: str | Path,
    params: ImportParams | None = None,
    *,
    labels_csv: str | Path | None = None,
    skip_errors: bool = False,
    overwrite: bool = False,
    workers: int = 0,
    log: Callable[[str], None] | None = None,
) -> ImportReport:
    """Write the images of ``folder`` as a tile store at ``out_path``; returns the report
    (also written to ``<out>.report.json``). See the module docstring for the choices."""
    say = log or (lambda message: None)
    params = params or ImportParams()
    folder = Path(folder)
    out_path = Path(out_path)
    if not folder.is_dir():
        raise ImageImportError(folder, "image folder not found")
    if out_path.exists() and not overwrite:
        raise StoreError(out_path, "output exists; pass --overwrite to replace it")
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        say(f"warning: {message}")

    if labels_csv is not None:
        entries, class_names, unlisted = read_labels_csv(
            Path(labels_csv), folder, params.class_names
        )
        if unlisted:
            warn(f"{unlisted} image(s) in {folder} are not in {labels_csv} and were not imported")
    else:
        entries, class_names = scan_folder(folder, params.class_names)

    skipped: list[dict[str, str]] = []

    def bad(entry: ImageEntry, reason: str) -> None:
        if not skip_errors:
            raise ImageImportError(entry.path, f"{reason} (--skip-errors leaves it out)")
        skipped.append({"image": entry.name, "error": reason})
        say(f"skipped {entry.name}: {reason}")

    usable = []
    for entry in entries:  # header only: sizes decide the tile size and resolution
        try:
            entry.size_px = _probe_size(entry.path)
            usable.append(entry)
        except ValueError as exc:
            bad(entry, str(exc))
    if not usable:
        raise ImageImportError(folder, "no readable images")

    tile_size_px = choose_tile_size(usable, params.tile_size_px)
    missing_mpp = [e for e in usable if e.mpp is None]
    if missing_mpp and params.mpp is None:
        raise ImageImportError(
            missing_mpp[0].path,
            "the images' resolution is unknown: pass --mpp (um/px of the images, e.g. 0.5 "
            "for 20x) or an mpp column in the CSV; prediction on slides needs it",
        )
    for entry in missing_mpp:
        entry.mpp = params.mpp
    mpp_source = "csv" if not missing_mpp else "override"
    target_mpp, spread = tile_mpp(usable, tile_size_px)
    if spread > _MPP_SPREAD_WARNING:
        warn(
            f"after resizing to {tile_size_px} px the images' resolutions differ by up to "
            f"{spread:.2f}x; the store records the median {target_mpp:.4g} um/px"
        )
    groups = _group_entries(usable)
    if labels_csv is None or all(e.group == e.name for e in usable):
        warn(
            "no slide or patient ids: each image is its own group, so train/val/test splits "
            "are per image (tile-level in effect); give a --labels CSV with a slide or "
            "patient column to keep a slide's images in one split"
        )
    for index, name in enumerate(class_names):
        if not any(e.label == index for e in usable):
            warn(f"class {name!r} has no images")

    parts_dir = out_path.with_name(out_path.name + ".parts")
    if parts_dir.exists():
        shutil.rmtree(parts_dir)  # left by a killed import: nothing in it is trusted
    parts_dir.mkdir(parents=True)
    written: dict[str, list[str]] = {}
    parts: list[tuple[Path, str]] = []
    pool = _pool(workers) if workers > 0 else None
    try:
        for name, members, loaded in _load_groups(groups, tile_size_px, params, pool):
            kept = []
            for entry, result in zip(members, loaded):
                if result.error:
                    bad(entry, result.error)
                else:
                    kept.append((entry, result))
            if not kept:
                continue
            data = _group_data(
                name,
                folder,
                [e for e, _ in kept],
                [r.tile for _, r in kept],  # type: ignore[misc]
                [r.cell for _, r in kept],  # type: ignore[misc]
                tile_size_px,
                target_mpp,
                params,
                mpp_source,
            )
            part = parts_dir / f"{group_key(name)}.h5"
            writer = SlidePartWriter(part, data, params.encoding, tile_size_px)
            try:
                writer.append([r.tile for _, r in kept])  # type: ignore[misc]
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            parts.append((part, name))
            written[name] = [e.name for e, _ in kept]
        if not parts:
            raise ImageImportError(folder, "no image could be decoded")
        assemble_store(out_path, parts, class_names=class_names)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(parts_dir, ignore_errors=True)

    report = ImportReport(
        store=str(out_path),
        params=asdict(params),
        class_names=class_names,
        tile_size_px=tile_size_px,
        target_mpp=target_mpp,
        groups=written,
        skipped=skipped,
        warnings=warnings,
    )
    report.write(out_path)
    return report


def _load_groups(
    groups: dict[str, list[ImageEntry]], tile_size_px: int, params: ImportParams, pool: Any
) -> Iterator[tuple[str, list[ImageEntry], list[_Loaded]]]:
    """(group, its images, their decoded tiles), group by group, in order.

    Tasks of all groups go to the pool as one ordered stream, so workers stay busy across
    group boundaries while the single writer stores the previous group.
    """
    tasks: list[tuple[str, _LoadTask]] = []
    for name, members in groups.items():
        cell = _cell_px(len(members), tile_size_px)
        for start in range(0, len(members), _CHUNK_IMAGES):
            paths = tuple(str(e.path) for e in members[start : start + _CHUNK_IMAGES])
            task = _LoadTask(paths, tile_size_px, cell, params.encoding, params.jpeg_quality)
            tasks.append((name, task))
    only_tasks = (task for _, task in tasks)
    results = pool.imap(_load_chunk, only_tasks) if pool else map(_load_chunk, only_tasks)
    current: str | None = None
    loaded: list[_Loaded] = []
    for (name, _), chunk in zip(tasks, results):
        if name != current and current is not None:
            yield current, groups[current], loaded
            loaded = []
        current = name
        loaded.extend(chunk)
    if current is not None:
        yield current, groups[current], loaded
