"""Finding the images of an import: class folders, a labels CSV, and their parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from histoduo.runtime.errors import HistoduoError
from histoduo.slide import unsafe_name_reason

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ENCODINGS = ("jpeg", "raw")
_IMAGE_COLUMNS = ("image", "path", "file", "filename")
_LABEL_COLUMNS = ("label", "class")


class ImageImportError(HistoduoError):
    """An image folder, image or label CSV is unusable; names the file."""


@dataclass(frozen=True, kw_only=True)
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
        group = slide or patient or rel
        if slide or patient:
            reason = unsafe_name_reason(group)
            if reason is not None:  # the group becomes a slide name, and predict's OUT/<slide>
                raise ImageImportError(where, f"slide/patient id {group!r} {reason}")
        entries.append(ImageEntry(path, rel, names.index(label_name), group, patient, mpp))
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
