"""The ``import`` run: images -> groups -> part files -> one tile store, and its report."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histoduo import __version__
from histoduo.runtime.files import atomic_write_text
from histoduo.runtime.locks import LockParams
from histoduo.store import (
    SlideGroupData,
    SlidePartWriter,
    StoreError,
    assemble_store,
    group_key,
    store_lock,
)
from histoduo.tiling.importer.load import _load_groups, _pool
from histoduo.tiling.importer.mosaic import (
    _group_data,
    _group_entries,
    _probe_size,
    choose_tile_size,
    tile_mpp,
)
from histoduo.tiling.importer.scan import (
    ImageEntry,
    ImageImportError,
    ImportParams,
    read_labels_csv,
    scan_folder,
)

_MPP_SPREAD_WARNING = 1.10  # warn when stored resolutions differ by more than 10%


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
        payload = {"histoduo_version": __version__, "n_images": self.n_images, **asdict(self)}
        return atomic_write_text(path, json.dumps(payload, indent=2))


@dataclass
class _ImportRun:
    """One import's decisions and what it has kept, skipped and warned about."""

    folder: Path
    params: ImportParams
    skip_errors: bool
    say: Callable[[str], None]
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.say(f"warning: {message}")

    def bad(self, entry: ImageEntry, reason: str) -> None:
        """An unusable image: an error, or (with --skip-errors) a skipped row."""
        if not self.skip_errors:
            raise ImageImportError(entry.path, f"{reason} (--skip-errors leaves it out)")
        self.skipped.append({"image": entry.name, "error": reason})
        self.say(f"skipped {entry.name}: {reason}")


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
    lock: LockParams | None = None,
) -> ImportReport:
    """Write the images of ``folder`` as a tile store at ``out_path``; returns the report
    (also written to ``<out>.report.json``). See the module docstring for the choices."""
    params = params or ImportParams()
    folder = Path(folder)
    out_path = Path(out_path)
    if not folder.is_dir():
        raise ImageImportError(folder, "image folder not found")
    _refuse_existing(out_path, overwrite)
    run = _ImportRun(folder, params, skip_errors, log or (lambda message: None))
    if labels_csv is not None:
        entries, class_names, unlisted = read_labels_csv(
            Path(labels_csv), folder, params.class_names
        )
        if unlisted:
            run.warn(
                f"{unlisted} image(s) in {folder} are not in {labels_csv} and were not imported"
            )
    else:
        entries, class_names = scan_folder(folder, params.class_names)
    if len(class_names) < 2:
        raise ImageImportError(
            labels_csv or folder,
            f"only one class ({', '.join(class_names) or 'none'}): a classifier needs at least "
            "two; add a folder per class, or list every class of the cohort with --classes",
        )
    usable = _probe_entries(run, entries)
    tile_size_px, target_mpp, mpp_source = _resolution(run, usable)
    _warn_about_groups(run, usable, class_names, labels_csv is not None)
    with store_lock(out_path, lock, run.say):  # one writer; checked again under the lock
        _refuse_existing(out_path, overwrite)
        written = _write_store(
            run=run,
            out_path=out_path,
            groups=_group_entries(usable),
            class_names=class_names,
            tile_size_px=tile_size_px,
            target_mpp=target_mpp,
            mpp_source=mpp_source,
            workers=workers,
        )
        report = _report(run, out_path, class_names, tile_size_px, target_mpp, written)
    return report


def _refuse_existing(out_path: Path, overwrite: bool) -> None:
    if out_path.exists() and not overwrite:
        raise StoreError(
            out_path,
            "output exists; choose a new --out (`histoduo merge` adds the imported store to "
            "this one afterwards)",
        )


def _report(
    run: _ImportRun,
    out_path: Path,
    class_names: list[str],
    tile_size_px: int,
    target_mpp: float,
    written: dict[str, list[str]],
) -> ImportReport:
    params = run.params
    report = ImportReport(
        store=str(out_path),
        params=asdict(params),
        class_names=class_names,
        tile_size_px=tile_size_px,
        target_mpp=target_mpp,
        groups=written,
        skipped=run.skipped,
        warnings=run.warnings,
    )
    report.write(out_path)
    return report


def _probe_entries(run: _ImportRun, entries: Sequence[ImageEntry]) -> list[ImageEntry]:
    """The entries whose header reads; sizes decide the tile size and resolution."""
    usable = []
    for entry in entries:
        try:
            entry.size_px = _probe_size(entry.path)
            usable.append(entry)
        except ValueError as exc:
            run.bad(entry, str(exc))
    if not usable:
        raise ImageImportError(run.folder, "no readable images")
    return usable


def _resolution(run: _ImportRun, usable: list[ImageEntry]) -> tuple[int, float, str]:
    """(tile size, the tiles' target mpp, where the images' mpp came from)."""
    params = run.params
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
        run.warn(
            f"after resizing to {tile_size_px} px the images' resolutions differ by up to "
            f"{spread:.2f}x; the store records the median {target_mpp:.4g} um/px"
        )
    return tile_size_px, target_mpp, mpp_source


def _warn_about_groups(
    run: _ImportRun, usable: list[ImageEntry], class_names: list[str], from_csv: bool
) -> None:
    if not from_csv or all(e.group == e.name for e in usable):
        run.warn(
            "no slide or patient ids: each image is its own group, so train/val/test splits "
            "are per image (tile-level in effect); give a --labels CSV with a slide or "
            "patient column to keep a slide's images in one split"
        )
    for index, name in enumerate(class_names):
        if not any(e.label == index for e in usable):
            run.warn(f"class {name!r} has no images")


def _write_store(
    run: _ImportRun,
    out_path: Path,
    groups: dict[str, list[ImageEntry]],
    class_names: list[str],
    tile_size_px: int,
    target_mpp: float,
    mpp_source: str,
    workers: int,
) -> dict[str, list[str]]:
    """One part file per group, then the store; returns group -> its images, in tile order."""
    params = run.params
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
                    run.bad(entry, result.error)
                else:
                    kept.append((entry, result))
            if not kept:
                continue
            data = _group_data(
                name=name,
                folder=run.folder,
                entries=[e for e, _ in kept],
                tiles=[r.tile for _, r in kept],  # type: ignore[misc]
                cells=[r.cell for _, r in kept],  # type: ignore[misc]
                tile_size_px=tile_size_px,
                target_mpp=target_mpp,
                params=params,
                mpp_source=mpp_source,
            )
            part = parts_dir / f"{group_key(name)}.h5"
            _write_part(part, data, params.encoding, tile_size_px, [r.tile for _, r in kept])
            parts.append((part, name))
            written[name] = [e.name for e, _ in kept]
        if not parts:
            raise ImageImportError(run.folder, "no image could be decoded")
        assemble_store(out_path, parts, class_names=class_names)
    finally:
        if pool is not None:
            pool.close(cancel=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
    return written


def _write_part(
    part: Path, data: SlideGroupData, encoding: str, tile_size_px: int, tiles: list[Any]
) -> None:
    writer = SlidePartWriter(part, data, encoding, tile_size_px)
    try:
        writer.append(tiles)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
