"""Where a format-2 store keeps its files, and its index (``tiles.h5``) of external links."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from histoduo.runtime.files import atomic_path
from histoduo.runtime.locks import LockParams, WriterLock, lock_path_for
from histoduo.store.record import (
    SLIDE_FILE_FORMAT,
    SLIDES_GROUP,
    SlideRecord,
    StoreError,
    _json_attr,
    check_header,
    group_key,
    write_store_header,
)


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


def store_lock(
    index_path: str | Path, lock: LockParams | None = None, log: Any = None
) -> WriterLock:
    """The writer lock of a store (``tiles.h5.lock`` beside the index); every command that
    changes the store holds it, readers never look at it."""
    lock = lock or LockParams()
    return WriterLock(
        lock_path_for(index_path),
        what=f"tile store {index_path}",
        wait_s=lock.wait_s,
        clear_dead=lock.clear_dead,
        log=log,
    )


def slide_file_path(index_path: str | Path, name: str) -> Path:
    return clam_dir(index_path) / "patches" / f"{group_key(name)}.h5"


def trident_file_path(index_path: str | Path, name: str) -> Path:
    return trident_dir(index_path) / "patches" / f"{group_key(name)}_patches.h5"


@dataclass(frozen=True)
class IndexEntry:
    """One slide of an index: its name, the file holding it and the object path in there."""

    name: str
    file: Path  # absolute, resolved from the index's own folder
    h5_path: str = "/"  # "/" for a slide file; "/slides/<key>" for a group of a format-1 file
    record: SlideRecord | None = None  # a copy of the file's record, so resume opens no file
    file_size: int | None = None  # bytes of the complete file (None: an older index)

    @classmethod
    def of(cls, record: SlideRecord, file: Path) -> IndexEntry:
        """The entry of a slide file just written or verified (its size is recorded now)."""
        file = Path(file).resolve()
        return cls(record.name, file, "/", record, file.stat().st_size)

    def problem(self, *, open_file: bool = True) -> str | None:
        """Why the file is not the one this entry recorded (None: it is).

        Checks, cheapest first: the file exists; its size is the recorded one (a truncated
        or half-copied file, or another slide's); with ``open_file``, its ``file_id`` (a
        random id written into the file when it was made) and its slide name are the
        recorded ones (a file swapped for another one of the same size). Entries of older
        indexes without an identity are checked by name and completion marker only.
        """
        if not self.file.exists():
            return "is missing"
        if self.h5_path != "/":
            return None  # a format-1 group: no identity
        size = self.file.stat().st_size
        if self.file_size is not None and size != self.file_size:
            return (
                f"is {size:,} bytes but the index recorded {self.file_size:,} for slide "
                f"{self.name!r} (truncated, half-copied or replaced)"
            )
        if not open_file:
            return None
        try:
            with h5py.File(self.file, "r") as f:
                attrs = {k: f.attrs.get(k) for k in ("name", "file_id", "complete")}
        except OSError as exc:
            return f"cannot be opened as HDF5 ({exc})"
        return identity_problem(self, attrs)


def identity_problem(entry: IndexEntry, attrs: dict) -> str | None:  # type: ignore[type-arg]
    """Why a slide file's root attributes are not those of ``entry`` (None: they are)."""

    def text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    if not bool(attrs.get("complete", False)):
        return f"is not a complete slide file (slide {entry.name!r})"
    if attrs.get("name") is not None and text(attrs["name"]) != entry.name:
        return f"holds slide {text(attrs['name'])!r}, not {entry.name!r} as the index says"
    expected = entry.record.file_id if entry.record is not None else ""
    found = text(attrs.get("file_id") or "")
    if expected and found != expected:
        return (
            f"is not the file the index recorded for slide {entry.name!r} (file id "
            f"{found or 'none'}, expected {expected}): replaced by another file"
        )
    return None


def read_index(index_path: str | Path) -> tuple[dict[str, IndexEntry], list[str]]:
    """(entries by slide name, class names) of a format-2 index.

    Link targets are relative to the index's folder (so the store moves as a whole) and are
    resolved here, not by HDF5, so the current directory never matters.
    """
    index_path = Path(index_path)
    with h5py.File(index_path, "r") as f:
        check_header(f, index_path)
        names: dict[str, str] = {}
        records: dict[str, SlideRecord] = {}
        sizes: dict[str, int] = {}
        if "slide_names" in f:  # a dataset: an attribute would cap the store at ~1,500 slides
            for key, name, record in f["slide_names"].asstr()[()]:
                names[str(key)] = str(name)
                if record:
                    row = json.loads(record)
                    records[str(key)] = SlideRecord.from_attrs(row)
                    if row.get("file_size") is not None:
                        sizes[str(key)] = int(row["file_size"])
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
            entries[name] = IndexEntry(name, file, link.path, records.get(key), sizes.get(key))
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
            write_store_header(f, class_names)
            group = f.create_group(SLIDES_GROUP)
            rows: dict[str, tuple[str, str, str]] = {}
            for entry in sorted(entries, key=lambda e: e.name):
                key = group_key(entry.name)
                if key in rows:
                    raise StoreError(index_path, f"slide {entry.name!r} listed twice")
                row = {} if entry.record is None else entry.record.to_attrs()
                if row and entry.file_size is not None:
                    row["file_size"] = entry.file_size  # the slide file's identity: size
                record = _json_attr(row) if row else ""
                rows[key] = (key, entry.name, record)
                rel = os.path.relpath(Path(entry.file).resolve(), folder)
                group[key] = h5py.ExternalLink(rel, entry.h5_path)
            table = np.array(list(rows.values()), dtype=object).reshape(-1, 3)
            f.create_dataset("slide_names", data=table, dtype=h5py.string_dtype())
    return index_path


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


def rebuild_index(index_path: str | Path, log: Any = None) -> list[IndexEntry]:
    """Rewrite a damaged or lost index from the slide files in the store's folder.

    Every complete slide file describes itself fully (its :class:`SlideRecord`, the class
    names included since identities exist), so nothing but the index is rewritten; files that
    are incomplete or unreadable are left where they are and not listed. Returns the entries.
    """
    index_path = Path(index_path)
    found = orphan_slides(index_path, [])
    entries = [
        IndexEntry.of(record, slide_file_path(index_path, name)) for name, record in found.items()
    ]
    vocabularies = {tuple(r.class_names) for r in found.values() if r.class_names}
    if len(vocabularies) > 1:
        raise StoreError(index_path, "its slide files disagree on the class names; cannot rebuild")
    class_names = list(vocabularies.pop()) if vocabularies else None
    write_index(index_path, entries, class_names)
    if log is not None:
        log(
            f"rebuilt the index {index_path} from {len(entries)} slide file(s) in "
            f"{store_folder(index_path)}/"
        )
    return entries


def has_slide_files(index_path: str | Path) -> bool:
    """Whether the store's folder holds any slide file (a damaged index can be rebuilt)."""
    folder = clam_dir(index_path) / "patches"
    return folder.is_dir() and any(folder.glob("*.h5"))


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
