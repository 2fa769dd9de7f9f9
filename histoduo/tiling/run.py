"""The ``tile`` run: slides -> tissue -> tiles -> a format-2 tile store, resumable slide by slide.

Worker processes open the slide themselves, read each tile from the pyramid level just finer
than the target, resize and encode it; the parent process is the single HDF5 writer. Slides
flow through the workers as one stream (see ``_run_pipeline``): while the parent writes one
slide, the next slide's tiles are already queued behind it and the one after is being opened
and its tissue detected in a planner thread, so no worker waits at a slide boundary.

Each slide is written to its own file under a temporary name and renamed when complete; the
index is rewritten (atomically) every few seconds and at the end. A kill -9 therefore loses at
most the slides in progress, and a rerun adopts finished slides the index did not list yet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from histoduo import __version__
from histoduo.qc import DEFAULT_QC_MODE, ArtefactMasks, QCParams, check_mode, detect_artefacts
from histoduo.runtime.errors import HistoduoError, OutputError, output_error
from histoduo.runtime.locks import LockParams
from histoduo.runtime.pool import LazyPool, default_workers
from histoduo.runtime.progress import SlideProgress
from histoduo.runtime.slides import failure_text, per_slide_errors, status_of
from histoduo.slide import SlideError
from histoduo.slide.sources import SlideSource
from histoduo.store import (
    IndexEntry,
    SlideGroupData,
    SlidePartWriter,
    SlideRecord,
    slide_file_path,
    store_class_names,
    store_lock,
    trident_file_path,
    write_index,
    write_trident_coords,
)
from histoduo.tiling import read as tileio
from histoduo.tiling.chunks import BlurCollector, store_slide_qc, tile_blocks
from histoduo.tiling.geometry import TileGeometry, open_overview, plan_tiles, require_tiles
from histoduo.tiling.labels import Labeller
from histoduo.tiling.params import TilingParams
from histoduo.tiling.report import SlideResult, TilingReport
from histoduo.tiling.resume import check_out_path, existing_slides, skipped
from histoduo.tissue import detect_tissue, require_tissue

# Options of `tile` that change what counts as tissue (--min-tissue only filters tiles).
NO_TISSUE_HINT = (
    "check the slide's mpp (--slide-mpp), try a finer --mask-mpp, leave out --exclude-pen, "
    "or look at the mask with `histoduo tissue` (which takes --min-object-area-um2 and --roi)"
)

_INDEX_EVERY_S = 5.0  # finished slides reach the index at least this often


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
    entries: dict[str, IndexEntry]  # what the index will list
    pool: LazyPool
    qc: QCParams | None = None  # None: --qc off
    qc_mode: str = "off"
    bars: Any = None
    log: Any = None
    results: list[SlideResult] = field(default_factory=list)
    index_written: float = 0.0
    changed: bool = False

    def fingerprint(self, source: SlideSource) -> str:
        return self.params.fingerprint(_slide_extra(source, self.class_names))

    def resumed(self, source: SlideSource) -> bool:
        """Records a skip when the store already holds this slide with these parameters."""
        record = self.existing.get(source.name)
        if self.overwrite or record is None or record.fingerprint != self.fingerprint(source):
            return False
        self.results.append(skipped(source, record))
        return True

    def failed(self, source: SlideSource, exc: Exception, status: str, seconds: float) -> None:
        # Not logged here: the caller prints the error that stops a run, and the summary
        # lists skipped ones, so each error is printed once.
        text = failure_text(exc)
        self.results.append(
            SlideResult(source.name, str(source.path), status, error=text, seconds=seconds)
        )

    def add(self, entry: IndexEntry) -> None:
        """A committed slide: listed by the next index write (soon, or at the end)."""
        self.entries[entry.name] = entry
        self.changed = True
        if time.monotonic() - self.index_written >= _INDEX_EVERY_S:
            self.write_index()

    def write_index(self) -> None:
        write_index(self.out_path, self.entries.values(), self.class_names)
        self.index_written = time.monotonic()
        self.changed = False


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
    qc: QCParams | None = None,
    qc_mode: str = DEFAULT_QC_MODE,
    lock: LockParams | None = None,
) -> TilingReport:
    """Tile every slide into the store at ``out_path``; returns (and writes) the run report.

    Complete slides already in the store with the same parameters are skipped (unless
    ``overwrite``); slides whose previous run was interrupted are redone. Without
    ``skip_errors`` the first failing slide stops the run after the slides finished so far
    have been saved, and a SlideError is raised. Only the slides tiled and the index are
    ``qc_mode``/``qc``: artefact QC per tile, stored with the mode (tiling/chunks.py).
    The other slides' files are not touched, with ``overwrite`` too (it redoes the
    slides given, each new file replacing the old one by a rename once complete). The run
    holds the store's writer lock (``<out>.lock``) throughout; ``lock`` says whether to
    wait for another writer's and whether to clear one left by a dead run.
    """
    out_path = Path(out_path)
    check_mode(qc_mode)
    check_out_path(out_path, sources)
    with store_lock(out_path, lock, log):
        report, first_error = _tile_locked(
            sources=sources,
            out_path=out_path,
            params=params,
            backend=backend,
            workers=workers,
            overwrite=overwrite,
            skip_errors=skip_errors,
            annotations_dir=annotations_dir,
            labelled_only=labelled_only,
            class_names=class_names,
            progress=progress,
            log=log,
            qc=qc,
            qc_mode=qc_mode,
        )
    if first_error is not None:
        raise first_error
    return report


def _tile_locked(  # noqa: PLR0913 - tile_slides' arguments, passed on under the lock
    *,
    sources: Sequence[SlideSource],
    out_path: Path,
    params: TilingParams,
    backend: str,
    workers: int | None,
    overwrite: bool,
    skip_errors: bool,
    annotations_dir: str | Path | None,
    labelled_only: bool,
    class_names: Sequence[str] | None,
    progress: bool,
    log: Any,
    qc: QCParams | None,
    qc_mode: str,
) -> tuple[TilingReport, HistoduoError | None]:
    workers = default_workers() if workers is None else workers
    labeller = Labeller.from_dir(annotations_dir, params, class_names) if annotations_dir else None
    names = labeller.class_names if labeller else None
    names_given = {source.name for source in sources}
    existing, entries = existing_slides(out_path, log or (lambda message: None), names_given)
    if names is None and existing and out_path.exists():
        names = store_class_names(out_path)
    pool = LazyPool(workers, tileio.WORKER_PRELOAD, initializer=tileio.warm_up)
    run = _TileRun(
        out_path=out_path, params=params, backend=backend, overwrite=overwrite,
        labeller=labeller, labelled_only=labelled_only, class_names=names, existing=existing,
        entries=entries, pool=pool,
    )  # fmt: skip
    run.log = log
    if qc_mode != "off":
        run.qc, run.qc_mode = qc or QCParams(), qc_mode
    first_error = None
    try:
        with pool, SlideProgress(progress, len(sources)) as bars:
            run.bars = bars
            first_error = _run_pipeline(sources, run, skip_errors)
    finally:
        # Every listed slide is complete, so the index is safe to write even when stopping;
        # it is always rewritten: slides this run found changed or adopted reach it too.
        # On a full or read-only disk the write fails and the previous index stays whole.
        try:
            run.write_index()
        except OSError as exc:
            index_error = output_error(exc, out_path)
            if index_error is None:
                raise
            first_error = first_error or index_error
    order = {source.name: i for i, source in reversed(list(enumerate(sources)))}
    results = sorted(run.results, key=lambda r: order.get(r.slide, len(order)))  # input order
    report = TilingReport(str(out_path), params.to_dict(), results)
    try:
        report.write(out_path)
    except OSError as exc:
        report_error = output_error(exc, out_path)
        if report_error is None:
            raise
        first_error = first_error or report_error
    if first_error is not None:
        tiled = sum(r.status == "done" for r in results)
        if log is not None and tiled:
            log(f"{tiled} finished slide(s) were saved in {out_path}; rerun to resume")
    return report, first_error


@dataclass
class _PlannedSlide:
    """What the parent learns from a slide before any tile is read."""

    geometry: TileGeometry
    mask: Any
    coords: np.ndarray
    fractions: np.ndarray
    labels: np.ndarray | None
    record: SlideRecord
    artefacts: ArtefactMasks | None = None


def _plan_slide(source: SlideSource, run: _TileRun) -> _PlannedSlide:
    params = run.params
    with open_overview(source.path, run.backend, source.mpp) as slide:
        geometry = TileGeometry.for_slide(slide, params)
        mask = detect_tissue(slide, params.tissue)
        width0, height0 = slide.dimensions
        coords, fractions = plan_tiles(mask, geometry, width0, height0, params.min_tissue_fraction)
        require_tissue(mask, source.path, NO_TISSUE_HINT)
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
            scanner_magnification=slide.magnification,
            read_size_px=geometry.read_size_px,
            class_names=run.class_names,
        )
    artefacts = detect_artefacts(mask, run.qc) if run.qc is not None else None
    return _PlannedSlide(geometry, mask, coords, fractions, labels, record, artefacts)


@dataclass
class _SlideJob:
    """A started slide: its file is open and its tiles are queued for the workers."""

    source: SlideSource
    plan: _PlannedSlide
    writer: SlidePartWriter
    blocks: Iterator[list[np.ndarray] | np.ndarray]
    started: float


def _run_pipeline(
    sources: Sequence[SlideSource], run: _TileRun, skip_errors: bool
) -> Exception | None:
    """Tile ``sources`` in order; returns the error that stopped the run, or None.

    Two slides are in the pool at once: the one being written and the next, whose chunks sit
    in the queue behind it; a planner thread meanwhile opens the slide after that and
    detects its tissue. On the first failure without ``skip_errors`` no further slide is
    started, the started ones are finished, and the error is returned.
    """
    planner = ThreadPoolExecutor(1, thread_name_prefix="histoduo-plan")
    todo = iter(sources)
    jobs: deque[_SlideJob] = deque()
    first_error: Exception | None = None
    caught = per_slide_errors(skip_errors, (SlideError, OutputError))

    def plan_next() -> tuple[SlideSource, Future[_PlannedSlide], float] | None:
        for source in todo:
            if run.resumed(source):
                run.bars.slide_done()
                continue
            return source, planner.submit(_plan_slide, source, run), time.perf_counter()
        return None

    def failed(source: SlideSource, exc: Exception, started: float) -> None:
        nonlocal first_error
        run.failed(source, exc, status_of(exc), time.perf_counter() - started)
        run.bars.slide_done()
        # A full or read-only disk fails every later slide too: stop even with skip_errors.
        if (not skip_errors or isinstance(exc, OutputError)) and first_error is None:
            first_error = exc

    ahead = plan_next()
    # Started while the first slide is planned: the fork server's imports take a second.
    pool = None if run.params.dry_run or ahead is None else run.pool.get()
    try:
        while jobs or (ahead is not None and first_error is None):
            while ahead is not None and first_error is None and len(jobs) < 2:
                source, future, started = ahead
                ahead = plan_next()  # planned while the workers read the slides before it
                try:
                    job = _start_slide(source, future.result(), run, pool, started)
                except caught as exc:
                    failed(source, exc, started)
                else:
                    jobs.append(job)
            if not jobs:
                continue
            job = jobs.popleft()
            try:
                run.results.append(_finish_slide(job, run))
            except caught as exc:
                failed(job.source, exc, job.started)
            else:
                run.bars.slide_done()
    except BaseException:
        for job in jobs:
            job.writer.abort()
        raise
    finally:
        planner.shutdown(wait=True, cancel_futures=True)
    return first_error


def _start_slide(
    source: SlideSource, plan: _PlannedSlide, run: _TileRun, pool: Any, started: float
) -> _SlideJob:
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
    path = slide_file_path(run.out_path, source.name)
    try:
        writer = SlidePartWriter(path, data, encoding, params.tile_size_px)
    except OSError as exc:
        raise output_error(exc, path) or exc from None
    if encoding is None:
        blocks: Iterator[Any] = iter(())
    else:
        blocks = tile_blocks(source, plan.coords, plan.geometry, params, run.backend, pool, run.qc)
    return _SlideJob(source, plan, writer, blocks, started)


def _finish_slide(job: _SlideJob, run: _TileRun) -> SlideResult:
    source, plan, writer = job.source, job.plan, job.writer
    try:
        run.bars.start_slide(source.name, len(plan.coords))
        written = 0
        t0 = time.perf_counter()
        blur = BlurCollector()  # blur scores ride with the tiles from QC workers
        for block in blur.tiles(job.blocks):
            writer.append(block)
            written += len(block)
            run.bars.advance_tiles(len(block), written / max(time.perf_counter() - t0, 1e-9))
        burdens = store_slide_qc(writer, plan, blur.scores, run.qc, run.qc_mode)
        path = writer.commit()
        write_trident_coords(trident_file_path(run.out_path, source.name), plan.coords, plan.record)
    except BaseException as exc:
        writer.abort()
        error = output_error(exc, slide_file_path(run.out_path, source.name))
        if error is not None:
            raise error from None
        raise
    encoding = "none" if run.params.dry_run else run.params.encoding
    record = replace(
        plan.record, n_tiles=len(plan.coords), tile_encoding=encoding, complete=True,
        file_id=writer.file_id,
    )  # fmt: skip
    run.add(IndexEntry.of(record, path))  # the record as the file now holds it
    return SlideResult(
        source.name,
        str(source.path),
        "done",
        n_tiles=len(plan.coords),
        tissue_area_mm2=plan.record.tissue_area_mm2,
        seconds=time.perf_counter() - job.started,
        **{f"qc_{k}": v for k, v in burdens.items()},
    )
