"""Slides -> tissue -> tiles in an HDF5 tile store.

Worker processes open the slide themselves, read each tile from the pyramid level just finer
than the target, resize and encode it; the parent process is the single HDF5 writer. Each slide
goes to its own part file first, so a killed run loses at most the slide it was on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from histoduo import tileio
from histoduo.slide import Slide, SlideError, mpp_to_magnification, open_slide
from histoduo.sources import SlideSource
from histoduo.store import (
    SlideGroupData,
    SlidePartWriter,
    StoreError,
    assemble_store,
    complete_slides,
    group_key,
)
from histoduo.tileio import read_tile  # noqa: F401 - part of this module's API
from histoduo.tissue import TissueMask, TissueParams, detect_tissue

ENCODINGS = ("jpeg", "raw")
_CHUNK_TILES = 16  # small enough that the last chunks balance across workers


@dataclass(frozen=True)
class TilingParams:
    """How tiles are cut; recorded in the store and compared on resume."""

    target_mpp: float = 0.5
    tile_size_px: int = 256
    stride_px: int | None = None  # at the target resolution; None = tile_size_px (no overlap)
    min_tissue_fraction: float = 0.25  # of the tile's area, 0-1
    encoding: str = "jpeg"
    jpeg_quality: int = 90
    tissue: TissueParams = field(default_factory=TissueParams)
    requested_magnification: float | None = None  # when the user asked with --mag
    dry_run: bool = False  # coordinates only, no pixels
    label_min_coverage: float = 0.5  # a tile takes a class covering at least this fraction

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"target mpp must be positive, got {self.target_mpp}")
        if self.tile_size_px < 8:
            raise ValueError(f"tile size must be at least 8 px, got {self.tile_size_px}")
        if self.stride_px is not None and self.stride_px < 1:
            raise ValueError(f"stride must be at least 1 px, got {self.stride_px}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min tissue fraction must be in 0-1, got {self.min_tissue_fraction}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be 1-100, got {self.jpeg_quality}")

    @property
    def effective_stride_px(self) -> int:
        return self.stride_px if self.stride_px is not None else self.tile_size_px

    @property
    def overlap_px(self) -> int:
        return max(0, self.tile_size_px - self.effective_stride_px)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilingParams:
        data = dict(data)
        data["tissue"] = TissueParams(**data.get("tissue", {}))
        return cls(**data)

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        """Identifies the parameters (plus per-slide extras) for resume decisions."""
        text = json.dumps({"params": self.to_dict(), "extra": extra or {}}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SlideResult:
    """One row of the run report."""

    slide: str
    path: str
    status: str  # done | skipped | no_tissue | error
    n_tiles: int = 0
    tissue_area_mm2: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class TilingReport:
    store: str
    params: dict[str, Any]
    results: list[SlideResult]

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status in ("error", "no_tissue")]

    def write(self, base: Path) -> tuple[Path, Path]:
        """``<base>.report.json`` and ``<base>.report.csv``, atomically."""
        json_path = base.with_name(base.name + ".report.json")
        csv_path = base.with_name(base.name + ".report.csv")
        payload = {
            "store": self.store,
            "histoduo_version": _version(),
            "params": self.params,
            "slides": [asdict(r) for r in self.results],
        }
        _atomic_write_text(json_path, json.dumps(payload, indent=2, default=str))
        fields = list(asdict(SlideResult("", "", "")).keys())
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for r in self.results:
                writer.writerow(asdict(r))
        os.replace(tmp, csv_path)
        return json_path, csv_path


def _version() -> str:
    from histoduo import __version__

    return __version__


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- geometry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileGeometry:
    """A slide's tile footprint: sizes in level-0 px and the level tiles are read from."""

    slide_mpp: float
    tile_size_level0: int
    stride_level0: int
    read_level: int
    read_level_downsample: float

    @classmethod
    def for_slide(cls, slide: Slide, params: TilingParams) -> TileGeometry:
        slide_mpp = slide.require_mpp()
        scale = params.target_mpp / slide_mpp
        if scale < 0.9:
            raise SlideError(
                slide.path,
                f"target resolution {params.target_mpp:g} um/px is finer than the slide's own "
                f"{slide_mpp:g} um/px; choose --mpp >= {slide_mpp:g} (or a lower --mag)",
            )
        size0 = max(1, round(params.tile_size_px * scale))
        stride0 = max(1, round(params.effective_stride_px * scale))
        level = slide.best_level_for_downsample(scale)
        return cls(slide_mpp, size0, stride0, level, slide.level_downsamples[level])


def tile_grid(width0: int, height0: int, size0: int, stride0: int) -> np.ndarray:
    """Level-0 top-left corners of every tile fully inside the slide, row-major.

    The grid starts at (0, 0) for every slide, so tiles align with the scanner's own JPEG
    tiles and no source tile is decoded twice by neighbouring tiles.
    """
    xs = np.arange(0, max(width0 - size0, -1) + 1, stride0, dtype=np.int64)
    ys = np.arange(0, max(height0 - size0, -1) + 1, stride0, dtype=np.int64)
    if len(xs) == 0 or len(ys) == 0:
        return np.empty((0, 2), dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def plan_tiles(
    mask: TissueMask, geometry: TileGeometry, width0: int, height0: int, min_tissue: float
) -> tuple[np.ndarray, np.ndarray]:
    """(coords, tissue fraction) of grid tiles with at least ``min_tissue`` tissue."""
    grid = tile_grid(width0, height0, geometry.tile_size_level0, geometry.stride_level0)
    if len(grid) == 0:
        return grid, np.empty(0, dtype=np.float32)
    fractions = mask.fractions_in_boxes(grid, float(geometry.tile_size_level0))
    # A tile with no tissue at all never qualifies, even when min_tissue is 0.
    keep = (fractions >= min_tissue) & (fractions > 0)
    return grid[keep], fractions[keep].astype(np.float32)


# --- worker pool ---------------------------------------------------------------------------


def _pool_context() -> mp.context.BaseContext:
    # forkserver: workers start from a clean process, never a fork of a parent that holds
    # open slide or HDF5 handles; spawn where forkserver does not exist. The server imports
    # the worker module once, so each worker starts without paying for tiffslide's imports.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["histoduo.tileio", "tiffslide", "openslide", "imagecodecs", "PIL.Image"]
        )
        return ctx
    return mp.get_context("spawn")


def open_overview(path: str | Path, backend: str, mpp_override: float | None) -> Slide:
    """The slide as the parent process needs it: metadata and a low-resolution read.

    With ``auto``, OpenSlide: it opens in milliseconds, while tiffslide (faster at decoding
    the many level-0 tiles the workers read) costs a second of imports. Any file OpenSlide
    does not take falls back to the normal choice.
    """
    if backend == "auto":
        try:
            return open_slide(path, "openslide", mpp_override)
        except SlideError:
            pass
    return open_slide(path, backend, mpp_override)


def default_workers() -> int:
    return max(
        1,
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
    )


# --- orchestration -------------------------------------------------------------------------


def parts_dir_for(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".parts")


def _slide_extra(source: SlideSource, labels: Any) -> dict[str, Any]:
    return {"mpp_override": source.mpp, "labels": labels}


@dataclass
class _Progress:
    """Rich progress bars (or nothing), kept out of the tiling logic."""

    enabled: bool
    total_slides: int
    _progress: Any = None
    _overall: Any = None
    _slide: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._overall = self._progress.add_task("slides", total=self.total_slides, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_slide(self, name: str, n_tiles: int) -> None:
        if self._progress is not None:
            if self._slide is not None:
                self._progress.remove_task(self._slide)
            self._slide = self._progress.add_task(name[:40], total=max(n_tiles, 1), rate="")

    def advance_tiles(self, n: int, rate: float) -> None:
        if self._progress is not None and self._slide is not None:
            self._progress.update(self._slide, advance=n, rate=f"{rate:,.0f} tiles/s")

    def slide_done(self) -> None:
        if self._progress is not None:
            self._progress.update(self._overall, advance=1)


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
    labeller = _Labeller.from_dir(annotations_dir, params, class_names) if annotations_dir else None
    parts_dir.mkdir(parents=True, exist_ok=True)  # after inputs check out
    class_names = labeller.class_names if labeller else None

    snapshot = out_path.with_name(out_path.name + ".prev")
    if snapshot.exists() and not out_path.exists():
        os.replace(snapshot, out_path)  # a run killed mid-replace: the old store is intact
    existing = {} if overwrite or not out_path.exists() else complete_slides(out_path)
    if class_names is None and existing:
        class_names = _store_class_names(out_path)
    if out_path.exists() and not overwrite and not existing and not _is_store(out_path):
        raise StoreError(out_path, "exists and is not a histoduo tile store; pass --overwrite")
    results: list[SlideResult] = []
    done_parts: list[tuple[Path, str]] = []
    first_error: SlideError | None = None

    pool = None
    try:
        with _Progress(progress, len(sources)) as bars:
            for source in sources:
                name = source.name
                fingerprint = params.fingerprint(_slide_extra(source, class_names))
                part_path = parts_dir / f"{group_key(name)}.h5"
                if not overwrite and existing.get(name, {}).get("fingerprint") == fingerprint:
                    results.append(_skipped(name, source, existing[name]))
                    bars.slide_done()
                    continue
                part_done = {} if overwrite else complete_slides(part_path)
                if part_done.get(name, {}).get("fingerprint") == fingerprint:
                    done_parts.append((part_path, name))
                    results.append(_skipped(name, source, part_done[name]))
                    bars.slide_done()
                    continue
                if pool is None and workers > 0 and not params.dry_run:
                    pool = _pool_context().Pool(workers, initializer=tileio.warm_up)
                started = time.perf_counter()
                try:
                    result = _tile_one_slide(
                        source,
                        part_path,
                        params,
                        backend,
                        pool,
                        fingerprint,
                        labeller,
                        labelled_only,
                        bars,
                    )
                except SlideError as exc:
                    status = "no_tissue" if "no tissue" in exc.reason else "error"
                    results.append(
                        SlideResult(
                            name,
                            str(source.path),
                            status,
                            error=exc.reason,
                            seconds=time.perf_counter() - started,
                        )
                    )
                    bars.slide_done()
                    if log is not None:
                        log(f"[red]{exc}[/]")
                    if not skip_errors:
                        first_error = exc
                        break
                    continue
                results.append(result)
                done_parts.append((part_path, name))
                bars.slide_done()
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    # The new store: the complete slides it keeps plus this run's parts, written atomically.
    # --overwrite rebuilds it from this run's slides only.
    redone = {name for _, name in done_parts}
    kept = [] if overwrite else [n for n in existing if n not in redone]
    if done_parts or set(kept) != set(existing) or not out_path.exists():
        _replace_store(out_path, kept, done_parts, class_names)
    for part_path, _ in done_parts:
        part_path.unlink(missing_ok=True)
    if parts_dir.exists() and not any(parts_dir.iterdir()):
        shutil.rmtree(parts_dir, ignore_errors=True)

    report = TilingReport(str(out_path), params.to_dict(), results)
    report.write(out_path)
    if first_error is not None:
        raise first_error
    return report


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


def _store_class_names(path: Path) -> list[str] | None:
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs.get("class_names")
    return json.loads(raw) if raw else None


def _is_store(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") is not None
    except OSError:
        return False


def _skipped(name: str, source: SlideSource, attrs: dict[str, Any]) -> SlideResult:
    area = attrs.get("tissue_area_mm2")
    return SlideResult(
        name,
        str(source.path),
        "skipped",
        n_tiles=int(attrs.get("n_tiles", 0)),
        tissue_area_mm2=float(area) if area is not None else None,
    )


def _tile_one_slide(
    source: SlideSource,
    part_path: Path,
    params: TilingParams,
    backend: str,
    pool: Any,
    fingerprint: str,
    labeller: _Labeller | None,
    labelled_only: bool,
    bars: _Progress,
) -> SlideResult:
    started = time.perf_counter()
    with open_overview(source.path, backend, source.mpp) as slide:
        geometry = TileGeometry.for_slide(slide, params)
        mask = detect_tissue(slide, params.tissue)
        width0, height0 = slide.dimensions
        coords, fractions = plan_tiles(mask, geometry, width0, height0, params.min_tissue_fraction)
        if not mask.mask.any():
            raise SlideError(
                source.path, "no tissue found (try a lower --min-tissue or check the slide)"
            )
        labels = None
        if labeller is not None:
            labels = labeller.labels_for(source, mask, coords, geometry.tile_size_level0)
            if labelled_only:
                keep = labels >= 0
                coords, fractions, labels = coords[keep], fractions[keep], labels[keep]
        if len(coords) == 0:
            raise SlideError(
                source.path,
                f"no tissue tiles: no tile reaches the minimum tissue fraction "
                f"{params.min_tissue_fraction:g}" + (" with a label" if labelled_only else ""),
            )
        info = slide.info()
        level_w, level_h = slide.level_dimensions[geometry.read_level]
        slide_mag = slide.magnification
    area = mask.area_mm2()
    attrs = {
        "complete": False,
        "fingerprint": fingerprint,
        "params": json.dumps(params.to_dict(), sort_keys=True),
        "slide_info": json.dumps(info.to_dict(), sort_keys=True),
        "slide_mpp": geometry.slide_mpp,
        "mpp_source": info.mpp_source,
        "target_mpp": params.target_mpp,
        "tile_size_px": params.tile_size_px,
        "tile_size_level0": geometry.tile_size_level0,
        "stride_px": params.effective_stride_px,
        "stride_level0": geometry.stride_level0,
        "min_tissue_fraction": params.min_tissue_fraction,
        "tissue_area_mm2": area if area is not None else float("nan"),
        "level0_width": width0,
        "level0_height": height0,
        "histoduo_version": _version(),
    }
    coords_attrs = {
        # TRIDENT
        "patch_size": params.tile_size_px,
        "patch_size_level0": geometry.tile_size_level0,
        "level0_magnification": float(slide_mag or mpp_to_magnification(geometry.slide_mpp)),
        "target_magnification": mpp_to_magnification(params.target_mpp),
        "overlap": params.overlap_px,
        "name": source.name,
        "level0_width": width0,
        "level0_height": height0,
        # CLAM (patch_level/downsample: the pyramid level the tiles were read from)
        "patch_level": geometry.read_level,
        "downsample": np.array([geometry.read_level_downsample] * 2, dtype=np.float64),
        "downsampled_level_dim": np.array([level_w, level_h], dtype=np.int64),
        "level_dim": np.array([level_w, level_h], dtype=np.int64),
    }
    data = SlideGroupData(
        name=source.name,
        source_path=str(source.path),
        coords=coords,
        tissue_fraction=fractions,
        attrs=attrs,
        coords_attrs=coords_attrs,
        thumbnail=mask.thumbnail,
        tissue_mask=mask.mask,
        mask_downsample=mask.downsample,
        labels=labels,
    )
    encoding = None if params.dry_run else params.encoding
    writer = SlidePartWriter(part_path, data, encoding, params.tile_size_px)
    try:
        bars.start_slide(source.name, len(coords))
        if encoding is not None:
            written = 0
            t0 = time.perf_counter()
            for block in _tile_blocks(source, coords, geometry, params, backend, pool):
                writer.append(block)
                written += len(block)
                bars.advance_tiles(len(block), written / max(time.perf_counter() - t0, 1e-9))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return SlideResult(
        source.name,
        str(source.path),
        "done",
        n_tiles=len(coords),
        tissue_area_mm2=area,
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


# --- labels from annotations ---------------------------------------------------------------


@dataclass
class _Labeller:
    """Per-tile class labels from QuPath GeoJSON annotations, one file per slide."""

    annotations_dir: Path
    class_names: list[str]
    min_coverage: float

    @classmethod
    def from_dir(
        cls,
        annotations_dir: str | Path,
        params: TilingParams,
        class_names: Sequence[str] | None = None,
    ) -> _Labeller:
        """Classes are ``class_names`` when given (a fixed vocabulary for a cohort), else
        every class name found in the folder's files, sorted."""
        from histoduo.geojson import read_annotations

        folder = Path(annotations_dir)
        if not folder.is_dir():
            raise StoreError(folder, "annotations folder not found")
        names: set[str] = set()
        for path in sorted(folder.glob("*.geojson")) + sorted(folder.glob("*.json")):
            for ann in read_annotations(path):
                if ann.class_name and ann.class_name.lower() not in _NON_CLASS_NAMES:
                    names.add(ann.class_name)
        if class_names:
            if len(set(class_names)) != len(class_names):
                raise ValueError(f"duplicate names in the class list {list(class_names)}")
            return cls(folder, list(class_names), params.label_min_coverage)
        if not names:
            raise StoreError(folder, "no classified annotations (classification.name) found")
        return cls(folder, sorted(names), params.label_min_coverage)

    def annotation_file(self, source: SlideSource) -> Path | None:
        for suffix in (".geojson", ".json"):
            candidate = self.annotations_dir / f"{source.name}{suffix}"
            if candidate.exists():
                return candidate
        return None

    def labels_for(
        self, source: SlideSource, mask: TissueMask, coords: np.ndarray, size0: int
    ) -> np.ndarray:
        from histoduo.geojson import rasterize, read_annotations

        labels = np.full(len(coords), -1, dtype=np.int16)
        path = self.annotation_file(source)
        if path is None or len(coords) == 0:
            return labels
        annotations = [
            a
            for a in read_annotations(path)
            if a.class_name and a.class_name.lower() not in _NON_CLASS_NAMES
        ]
        _check_annotations(annotations, path, mask)
        unknown = sorted({a.class_name for a in annotations} - set(self.class_names))
        if unknown:
            raise SlideError(
                path,
                f"unknown class name(s) {unknown}; the store's classes are {self.class_names}",
            )
        best = np.zeros(len(coords), dtype=np.float64)
        for index, name in enumerate(self.class_names):
            selected = [a for a in annotations if a.class_name == name]
            if not selected:
                continue
            painted = rasterize(selected, mask.mask.shape, mask.downsample) > 0
            coverage = replace(mask, mask=painted).fractions_in_boxes(coords, float(size0))
            better = (coverage >= self.min_coverage) & (coverage > best)
            labels[better] = index
            best = np.maximum(best, np.where(better, coverage, 0))
        return labels


def _check_annotations(annotations: list[Any], path: Path, mask: TissueMask) -> None:
    from histoduo.geojson import check_annotations

    if mask.level0_size is not None:
        try:
            check_annotations(annotations, path, mask.level0_size)
        except ValueError as exc:
            raise SlideError(path, str(exc).removeprefix(f"{path}: ")) from None


# Annotation classes that mark areas, not tissue classes.
_NON_CLASS_NAMES = {"tissue", "region", "ignore", "background", "other"}


def summarise(report: TilingReport) -> dict[str, Any]:
    done = [r for r in report.results if r.status in ("done", "skipped")]
    return {
        "slides": len(report.results),
        "tiled": sum(r.status == "done" for r in report.results),
        "skipped": sum(r.status == "skipped" for r in report.results),
        "failed": len(report.failed),
        "tiles": sum(r.n_tiles for r in done),
    }


def mpp_from_options(mpp: float | None, magnification: float | None) -> tuple[float, float | None]:
    """The target mpp from --mpp or --mag (10x ~ 1.0 um/px); default 0.5 (20x)."""
    if mpp is not None and magnification is not None:
        raise ValueError("give --mpp or --mag, not both")
    if magnification is not None:
        if magnification <= 0:
            raise ValueError(f"--mag must be positive, got {magnification}")
        return 10.0 / magnification, magnification
    if mpp is not None:
        if not mpp > 0 or not math.isfinite(mpp):
            raise ValueError(f"--mpp must be positive, got {mpp}")
        return mpp, None
    return 0.5, None
