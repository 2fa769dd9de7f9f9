"""The ``tile`` run: slides -> tissue -> tiles -> one HDF5 store, resumable slide by slide.

Worker processes open the slide themselves, read each tile from the pyramid level just finer
than the target, resize and encode it; the parent process is the single HDF5 writer. Each slide
goes to its own part file first, so a killed run loses at most the slide it was on.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo import __version__, tileio
from histoduo.run.errors import HistoduoError
from histoduo.run.pool import LazyPool, default_workers
from histoduo.run.progress import SlideProgress
from histoduo.run.slides import run_slides
from histoduo.slide import SlideError
from histoduo.sources import SlideSource
from histoduo.store import (
    SlideGroupData,
    SlidePartWriter,
    SlideRecord,
    StoreError,
    assemble_store,
    complete_slides,
    group_key,
    is_store,
    store_class_names,
)
from histoduo.tiling.geometry import TileGeometry, open_overview, plan_tiles, require_tiles
from histoduo.tiling.labels import Labeller
from histoduo.tiling.params import TilingParams
from histoduo.tiling.report import SlideResult, TilingReport
from histoduo.tissue import NoTissueError, detect_tissue

_CHUNK_TILES = 16  # small enough that the last chunks balance across workers


def parts_dir_for(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".parts")


def _slide_extra(source: SlideSource, labels: Any) -> dict[str, Any]:
    return {"mpp_override": source.mpp, "labels": labels}


@dataclass
class _TileRun:
    """One ``tile_slides`` call's state: what exists, what this run finished, its settings."""

    out_path: Path
    params: TilingParams
    backend: str
    overwrite: bool
    labeller: Labeller | None
    labelled_only: bool
    class_names: list[str] | None
    existing: dict[str, SlideRecord]
    pool: LazyPool
    bars: Any = None
    log: Any = None
    results: list[SlideResult] = field(default_factory=list)
    done_parts: list[tuple[Path, str]] = field(default_factory=list)

    def part_path(self, source: SlideSource) -> Path:
        return parts_dir_for(self.out_path) / f"{group_key(source.name)}.h5"

    def fingerprint(self, source: SlideSource) -> str:
        return self.params.fingerprint(_slide_extra(source, self.class_names))

    def resumed(self, source: SlideSource) -> bool:
        """Records a skip when the store (or a part file) already holds this slide."""
        fingerprint = self.fingerprint(source)
        record = self.existing.get(source.name)
        if not self.overwrite and record is not None and record.fingerprint == fingerprint:
            self.results.append(_skipped(source, record))
            return True
        part_path = self.part_path(source)
        record = None if self.overwrite else complete_slides(part_path).get(source.name)
        if record is not None and record.fingerprint == fingerprint:
            self.done_parts.append((part_path, source.name))
            self.results.append(_skipped(source, record))
            return True
        return False

    def process(self, source: SlideSource) -> None:
        pool = None if self.params.dry_run else self.pool.get()
        result = _tile_one_slide(source, self.part_path(source), self, pool)
        self.results.append(result)
        self.done_parts.append((self.part_path(source), source.name))

    def failed(self, source: SlideSource, exc: HistoduoError, status: str, seconds: float) -> None:
        self.results.append(
            SlideResult(source.name, str(source.path), status, error=exc.reason, seconds=seconds)
        )
        if self.log is not None:
            self.log(f"[red]{exc}[/]")


def tile_slides(
    sources: Sequence[SlideSource],
    out_path: str | Path,
    params: TilingParams,
    *,
    backend: str = "auto",
    workers: int | None = None,
    overwrite: bool = False,
    skip_errors: bool = False,
    annotations_dir: str | Path | None = None,
    labelled_only: bool = False,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    log: Any = None,
) -> TilingReport:
    """Tile every slide into one store at ``out_path``; returns (and writes) the run report.

    Complete slides already in the store with the same parameters are skipped (unless
    ``overwrite``); slides whose previous run was interrupted are redone. Without
    ``skip_errors`` the first failing slide stops the run after the slides finished so far
    have been saved, and a SlideError is raised.
    """
    out_path = Path(out_path)
    workers = default_workers() if workers is None else workers
    parts_dir = parts_dir_for(out_path)
    parts_dir.mkdir(parents=True, exist_ok=True)
    labeller = Labeller.from_dir(annotations_dir, params, class_names) if annotations_dir else None
    names = labeller.class_names if labeller else None

    snapshot = out_path.with_name(out_path.name + ".prev")
    if snapshot.exists() and not out_path.exists():
        os.replace(snapshot, out_path)  # a run killed mid-replace: the old store is intact
    existing = {} if overwrite or not out_path.exists() else complete_slides(out_path)
    if names is None and existing:
        names = store_class_names(out_path)
    if out_path.exists() and not overwrite and not existing and not is_store(out_path):
        raise StoreError(out_path, "exists and is not a histoduo tile store; pass --overwrite")
    pool = LazyPool(workers, tileio.WORKER_PRELOAD, initializer=tileio.warm_up)
    run = _TileRun(
        out_path, params, backend, overwrite, labeller, labelled_only, names, existing, pool
    )
    run.log = log
    with pool, SlideProgress(progress, len(sources)) as bars:
        run.bars = bars
        first_error = run_slides(
            sources,
            process=run.process,
            failed=run.failed,
            resumed=run.resumed,
            skip_errors=skip_errors,
            finished=lambda source: bars.slide_done(),
            errors=(SlideError,),
        )
    _finish_store(run)
    report = TilingReport(str(out_path), params.to_dict(), run.results)
    report.write(out_path)
    if first_error is not None:
        raise first_error
    return report


def _finish_store(run: _TileRun) -> None:
    """The new store: the complete slides it keeps plus this run's parts, written atomically.

    --overwrite rebuilds it from this run's slides only.
    """
    out_path = run.out_path
    redone = {name for _, name in run.done_parts}
    kept = [] if run.overwrite else [n for n in run.existing if n not in redone]
    if run.done_parts or set(kept) != set(run.existing) or not out_path.exists():
        _replace_store(out_path, kept, run.done_parts, run.class_names)
    for part_path, _ in run.done_parts:
        part_path.unlink(missing_ok=True)
    parts_dir = parts_dir_for(out_path)
    if parts_dir.exists() and not any(parts_dir.iterdir()):
        shutil.rmtree(parts_dir, ignore_errors=True)


def _replace_store(
    out_path: Path,
    kept: list[str],
    parts: list[tuple[Path, str]],
    class_names: list[str] | None,
) -> None:
    """Assemble kept slides of the current store and new parts into a new store, atomically.

    The current store is renamed aside first (so it is never read while being replaced) and
    put back if assembly fails.
    """
    if not kept:
        assemble_store(out_path, parts, class_names=class_names)
        return
    snapshot = out_path.with_name(out_path.name + ".prev")
    os.replace(out_path, snapshot)
    try:
        assemble_store(out_path, [(snapshot, n) for n in kept] + parts, class_names=class_names)
    except BaseException:
        os.replace(snapshot, out_path)
        raise
    snapshot.unlink()


def _skipped(source: SlideSource, record: SlideRecord) -> SlideResult:
    return SlideResult(
        source.name,
        str(source.path),
        "skipped",
        n_tiles=record.n_tiles,
        tissue_area_mm2=record.tissue_area_mm2,
    )


@dataclass
class _PlannedSlide:
    """What the parent learns from a slide before any tile is read."""

    geometry: TileGeometry
    mask: Any
    coords: np.ndarray
    fractions: np.ndarray
    labels: np.ndarray | None
    record: SlideRecord


def _plan_slide(source: SlideSource, run: _TileRun) -> _PlannedSlide:
    params = run.params
    with open_overview(source.path, run.backend, source.mpp) as slide:
        geometry = TileGeometry.for_slide(slide, params)
        mask = detect_tissue(slide, params.tissue)
        width0, height0 = slide.dimensions
        coords, fractions = plan_tiles(mask, geometry, width0, height0, params.min_tissue_fraction)
        if not mask.mask.any():
            raise NoTissueError(
                source.path, "no tissue found (try a lower --min-tissue or check the slide)"
            )
        labels = None
        if run.labeller is not None:
            labels = run.labeller.labels_for(source, mask, coords, geometry.tile_size_level0)
            if run.labelled_only:
                keep = labels >= 0
                coords, fractions, labels = coords[keep], fractions[keep], labels[keep]
        detail = " with a label" if run.labelled_only else ""
        require_tiles(coords, source.path, params.min_tissue_fraction, detail)
        info = slide.info()
        level_w, level_h = slide.level_dimensions[geometry.read_level]
        record = SlideRecord(
            name=source.name,
            source_path=str(source.path),
            fingerprint=run.fingerprint(source),
            params=params.to_dict(),
            slide_info=info.to_dict(),
            slide_mpp=geometry.slide_mpp,
            mpp_source=info.mpp_source,
            target_mpp=params.target_mpp,
            tile_size_px=params.tile_size_px,
            tile_size_level0=geometry.tile_size_level0,
            stride_px=params.effective_stride_px,
            stride_level0=geometry.stride_level0,
            min_tissue_fraction=params.min_tissue_fraction,
            tissue_area_mm2=mask.area_mm2(),
            level0_width=width0,
            level0_height=height0,
            histoduo_version=__version__,
            read_level=geometry.read_level,
            read_level_downsample=geometry.read_level_downsample,
            read_level_width=level_w,
            read_level_height=level_h,
            level0_magnification=slide.magnification,
        )
    return _PlannedSlide(geometry, mask, coords, fractions, labels, record)


def _tile_one_slide(source: SlideSource, part_path: Path, run: _TileRun, pool: Any) -> SlideResult:
    started = time.perf_counter()
    plan = _plan_slide(source, run)
    data = SlideGroupData.from_record(
        plan.record,
        coords=plan.coords,
        tissue_fraction=plan.fractions,
        thumbnail=plan.mask.thumbnail,
        tissue_mask=plan.mask.mask,
        mask_downsample=plan.mask.downsample,
        labels=plan.labels,
    )
    params = run.params
    encoding = None if params.dry_run else params.encoding
    writer = SlidePartWriter(part_path, data, encoding, params.tile_size_px)
    try:
        run.bars.start_slide(source.name, len(plan.coords))
        if encoding is not None:
            written = 0
            t0 = time.perf_counter()
            blocks = _tile_blocks(source, plan.coords, plan.geometry, params, run.backend, pool)
            for block in blocks:
                writer.append(block)
                written += len(block)
                run.bars.advance_tiles(len(block), written / max(time.perf_counter() - t0, 1e-9))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return SlideResult(
        source.name,
        str(source.path),
        "done",
        n_tiles=len(plan.coords),
        tissue_area_mm2=plan.record.tissue_area_mm2,
        seconds=time.perf_counter() - started,
    )


def _tile_blocks(
    source: SlideSource,
    coords: np.ndarray,
    geometry: TileGeometry,
    params: TilingParams,
    backend: str,
    pool: Any,
) -> Iterator[list[np.ndarray] | np.ndarray]:
    tasks = (
        tileio.ChunkTask(
            str(source.path),
            backend,
            source.mpp,
            coords[start : start + _CHUNK_TILES],
            geometry.tile_size_level0,
            params.tile_size_px,
            params.encoding,
            params.jpeg_quality,
        )
        for start in range(0, len(coords), _CHUNK_TILES)
    )
    if pool is not None:
        yield from pool.imap(tileio.read_chunk, tasks)
        return
    try:
        for task in tasks:
            yield tileio.read_chunk(task)
    finally:
        tileio.close_cached_slide()
