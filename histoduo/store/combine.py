"""Whole stores: merge (hard links, no copy), upgrade a format-1 store, copy under a new name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histoduo.runtime.locks import LockParams
from histoduo.store.layout import (
    IndexEntry,
    has_slide_files,
    read_index,
    read_slide_record,
    rebuild_index,
    remove_unlisted,
    slide_file_path,
    store_folder,
    store_lock,
    write_index,
)
from histoduo.store.read import _v1_complete, store_class_names
from histoduo.store.record import (
    SLIDES_GROUP,
    StoreError,
    StoreUpgradeNeeded,
    group_key,
    not_a_store_error,
    store_version,
    upgrade_hint,
)
from histoduo.store.write import convert_v1_slide, install_slide_file


def _store_entries(path: Path) -> tuple[dict[str, IndexEntry], list[str], int]:
    version = store_version(path)
    if version is None:
        raise not_a_store_error(path)
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
    inputs: Sequence[Path],
    out_path: Path,
    *,
    link: bool = False,
    overwrite: bool = False,
    lock: LockParams | None = None,
    log: Any = None,
) -> list[str]:
    """Combine complete slides of several stores into one; returns the slide names.

    Slide files are hard-linked into the output's folder (copied only across file systems),
    so merging costs O(slides added), not O(store). ``out_path`` may be one of the inputs:
    the other inputs' slides are then added to it in place. ``link=True`` lists the input
    files in the index instead (the inputs must then stay where they are relative to it).
    Format-1 inputs are converted slide by slide. Names must be unique; vocabularies agree.
    The output's writer lock is held throughout (inputs are only read: no lock).
    """
    with store_lock(out_path, lock, log):
        return _merge(inputs, Path(out_path), link, overwrite)


def _merge(inputs: Sequence[Path], out_path: Path, link: bool, overwrite: bool) -> list[str]:
    out_path = Path(out_path)
    inputs = [Path(p) for p in inputs]
    into = [p for p in inputs if p.exists() and out_path.exists() and os.path.samefile(p, out_path)]
    if out_path.exists() and not overwrite and not into:
        raise StoreError(
            out_path,
            "output exists; to add to it, name it among the inputs too "
            f"(histoduo merge {out_path} ... -o {out_path}), or choose a new --out",
        )
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
    # Every input slide file must be there and whole before anything is written, so a
    # missing or truncated file fails the merge without a half-built output folder.
    for path, entry, version in plan:
        if version >= 2 and read_slide_record(entry.file) is None:
            why = "is missing" if not Path(entry.file).exists() else "is truncated or incomplete"
            raise StoreError(
                entry.file,
                f"slide {entry.name!r} of {path} {why}; retile that slide into {path} "
                "(histoduo tile reruns only what is missing) or leave that store out",
            )
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


def upgrade_store(
    path: str | Path, *, lock: LockParams | None = None, log: Any = None
) -> list[str]:
    """Rewrite a format-1 store as format 2 at the same path; returns the slide names.

    Slide files are written first, the index replaces the old file last (atomically), so a
    killed upgrade leaves the format-1 store readable and can simply be run again. A format-2
    store whose index is damaged or lost gets its index rebuilt from its slide files.
    """
    with store_lock(Path(path), lock, log):
        return _upgrade(Path(path), log)


def _upgrade(path: Path, log: Any) -> list[str]:
    version = store_version(path)
    if version is None and has_slide_files(path):
        return sorted(e.name for e in rebuild_index(path, log))
    if version is None:
        raise not_a_store_error(path)
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


def copy_store(src: str | Path, dst: str | Path) -> Path:
    """Copy a store under another name: its slide files into ``dst``'s folder and an index
    that lists the copies (a plain copy of ``tiles.h5`` alone would still point at the
    original's folder). Slides listed from other stores (``merge --link``) stay links to them.
    """
    src, dst = Path(src), Path(dst)
    found, class_names, version = _store_entries(src)
    if version < 2:
        raise StoreUpgradeNeeded(src, upgrade_hint(src))
    entries = []
    for name, entry in found.items():
        if not _inside(src, entry.file):
            entries.append(entry)
            continue
        install_slide_file(dst, entry.file, name, how="copy")
        entries.append(IndexEntry(name, slide_file_path(dst, name).resolve(), "/", entry.record))
    write_index(dst, entries, class_names or None)
    return dst
