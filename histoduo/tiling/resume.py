"""What a ``tile`` run finds in its output store before it starts: slides to keep, slides
to resume from, and what it must refuse to touch.

Nothing here deletes a slide file: a damaged index is rebuilt from the slide files, a slide
file that is not the one the index recorded is left where it is (and redone if the run tiles
that slide), and ``--overwrite`` only makes the run redo the slides it is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from histoduo.runtime.files import remove_stale_temporaries
from histoduo.slide.sources import SlideSource
from histoduo.store import (
    FORMAT_VERSION,
    IndexEntry,
    SlideRecord,
    StoreError,
    StoreUpgradeNeeded,
    complete_slides,
    is_store,
    orphan_slides,
    read_index,
    remove_temporary,
    slide_file_path,
    store_version,
    trident_file_path,
    upgrade_hint,
    write_trident_file,
)
from histoduo.store.layout import has_slide_files, rebuild_index
from histoduo.tiling.report import SlideResult


def check_out_path(out_path: Path, sources: Sequence[SlideSource]) -> None:
    """StoreError when ``--out`` is one of the input slides (it would be overwritten)."""
    if not out_path.exists():
        return
    for source in sources:
        if source.path.exists() and os.path.samefile(source.path, out_path):
            raise StoreError(out_path, "is one of the input slides; choose another --out")


def listed_slides(out_path: Path) -> dict[str, IndexEntry]:
    try:
        return read_index(out_path)[0] if store_version(out_path) == 2 else {}
    except (OSError, StoreError):
        return {}


def existing_slides(
    out_path: Path, log: Callable[[str], None], names: set[str] | None = None
) -> tuple[dict[str, SlideRecord], dict[str, IndexEntry]]:
    """(records of complete slides to resume from, index entries to keep).

    Runs under the store's writer lock: temporary files in the folder are a killed
    writer's. Every listed slide whose file checks out is kept, whatever this run tiles;
    the files of ``names`` (the run's slides, which it may skip as done) are opened to check
    their id, the others' sizes are checked.
    """
    version = store_version(out_path) if out_path.exists() else None
    if out_path.exists() and version is None:
        if has_slide_files(out_path):
            rebuild_index(out_path, log)  # damaged index: the slide files describe themselves
            version = 2
        elif is_store(out_path):
            raise StoreError(out_path, "a histoduo file but not a tile store; choose another --out")
        else:
            raise StoreError(
                out_path,
                "exists and is not a histoduo tile store (and no slide files are beside it); "
                "choose another --out, or delete or move that file yourself",
            )
    if version is not None and version > FORMAT_VERSION:
        raise StoreError(out_path, f"a newer tile store (format {version}); upgrade histoduo")
    if version == 1:
        raise StoreUpgradeNeeded(out_path, upgrade_hint(out_path))
    remove_temporary(out_path)  # a killed writer's; never trusted
    remove_stale_temporaries(out_path.parent, of=out_path.name)  # a killed index write
    listed = listed_slides(out_path) if version == 2 else {}
    problems: dict[str, str] = {}
    existing = complete_slides(out_path, problems, names) if version == 2 else {}
    for name, why in problems.items():
        log(f"[yellow]{why}: not listed any more; tiling slide {name!r} again redoes it[/]")
    entries = {}
    for name, record in existing.items():
        entry = replace(listed[name], record=record)
        if entry.file_size is None and entry.h5_path == "/":  # an older index: record the size
            entry = IndexEntry.of(record, entry.file)
        entries[name] = entry
    for name, record in orphan_slides(out_path, listed).items():
        path = slide_file_path(out_path, name)
        write_trident_file(path, trident_file_path(out_path, name))  # may have been cut short
        existing[name] = record
        entries[name] = IndexEntry.of(record, path)
    return existing, entries


def skipped(source: SlideSource, record: SlideRecord) -> SlideResult:
    return SlideResult(
        source.name,
        str(source.path),
        "skipped",
        n_tiles=record.n_tiles,
        tissue_area_mm2=record.tissue_area_mm2,
    )
