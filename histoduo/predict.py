"""Whole-slide prediction: slide -> tissue -> tiles -> model -> per-tile scores, maps, reports.

Tiling follows the checkpoint (its mpp and tile size), so a checkpoint alone decides how a
slide is cut. Tiles stream through a DataLoader whose workers open the slide themselves (never
inherited from the parent) and hand over model-ready batches; the parent only runs the model
and keeps the probabilities, so memory is bounded by a few batches for any slide size.

Per slide ``OUT/<slide>/`` (every file written atomically, ``done`` written last)::

    tiles.csv        one row per tile (tables.py; columns in docs/prediction.md)
    scores.npz       the raw score grid: probs, coords, tile size, thumbnail, tissue mask,
                     class names and colours (enough to redraw every picture without the model)
    tiles.geojson    QuPath tiles (objectType "tile", class, probabilities as measurements)
    tissue.geojson   tissue outlines as QuPath annotations
    summary.json     the slide-level call (grading.py) and everything behind it
    *.png            thumbnail.png always; the maps with heatmaps (the default): heatmap.py

Run level ``OUT/``: ``slides.csv`` (rebuilt from every finished slide folder, so shards and
reruns accumulate), ``report.html`` (report.py, rebuilt the same way) and ``manifest.json``
(``manifest.shard-K-of-N.json`` for a shard).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import IterableDataset

from histoduo.geojson import atomic_write_text, class_color, polygon_feature
from histoduo.grading import GradeParams, SlideGrade, grade_slide
from histoduo.heatmap import SCORES_FILE, SlideScores
from histoduo.slide import SlideError, open_slide
from histoduo.sources import SlideSource
from histoduo.tables import (  # noqa: F401  (tiles_table_text: part of this module's API)
    DONE_MARKER,
    ERROR_FILE,
    SUMMARY_FILE,
    tiles_table_text,
    write_slides_csv,
)
from histoduo.tissue import TissueMask, TissueParams, detect_tissue, require_tissue

if TYPE_CHECKING:
    import torch

    from histoduo.checkpoint import CheckpointMeta

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "fp32", "bf16")
THUMBNAIL_MAX_PX = 1024  # long side of the stored thumbnail the maps are painted on


@dataclass(frozen=True)
class PredictParams:
    """How a run predicts; recorded in the manifest."""

    mpp: float | None = None  # override of the checkpoint's target mpp (warned)
    tile_size_px: int | None = None  # override of the checkpoint's tile size (warned)
    stride_px: int | None = None  # at the target resolution; None = tile size (no overlap)
    min_tissue_fraction: float = 0.25  # of a tile's area, 0-1
    batch_size: int | None = None  # None: 256 on GPU, 64 on CPU
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True
    workers: int | None = None  # DataLoader workers; None: 1 on <= 2 cores, else cores - 1
    torch_threads: int | None = None  # CPU intra-op threads; None: leave torch's default
    tta: bool = False  # average over flips (identity, h, v, both)
    heatmap: bool = True  # draw the maps (the report shows them)
    backend: str = "auto"
    tissue: TissueParams = field(default_factory=TissueParams)
    grade: GradeParams = field(default_factory=GradeParams)
    thumbnail_max_px: int = THUMBNAIL_MAX_PX

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stride_px is not None and self.stride_px < 1:
            raise ValueError(f"stride must be >= 1 px, got {self.stride_px}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min tissue fraction must be 0-1, got {self.min_tissue_fraction}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def default_workers() -> int:
    """DataLoader workers: on 2 cores one decoder beside the model measured best
    (benchmarks/bench_predict.py); with more cores leave one core to the main process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return 1 if cores <= 2 else cores - 1


# --- tile sources (run inside DataLoader workers) -------------------------------------------


def _worker_share(n_chunks: int) -> range:
    """The chunk indices this DataLoader worker yields (round-robin over workers)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is None:
        return range(n_chunks)
    return range(info.id, n_chunks, info.num_workers)


@dataclass
class _TransformSpec:
    input_size_px: int
    mean: list[float]
    std: list[float]
    eval_resize: str

    def apply(self, tiles: np.ndarray) -> torch.Tensor:
        # The exact evaluation transform (preprocess.py), done in the worker so the main
        # process only runs the model.
        from histoduo.preprocess import eval_transform, to_tensor_batch

        return eval_transform(
            to_tensor_batch(tiles), self.input_size_px, self.mean, self.std, self.eval_resize
        )


class SlideTiles(IterableDataset):
    """Batches of (tile indices, model input) read from a slide by whoever iterates.

    Each DataLoader worker opens its own slide handle inside ``__iter__`` and reads its share
    of contiguous chunks, so the parent never holds a handle across a fork.
    """

    def __init__(
        self,
        slide_path: str,
        backend: str,
        mpp_override: float | None,
        coords: np.ndarray,
        size_level0: int,
        tile_size_px: int,
        batch_size: int,
        transform: _TransformSpec,
    ) -> None:
        self.slide_path = slide_path
        self.backend = backend
        self.mpp_override = mpp_override
        self.coords = coords
        self.size_level0 = size_level0
        self.tile_size_px = tile_size_px
        self.batch_size = batch_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.coords)

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        import torch

        from histoduo.tiling import read_tile

        n_chunks = math.ceil(len(self.coords) / self.batch_size)
        with open_slide(self.slide_path, self.backend, self.mpp_override) as slide:
            for chunk in _worker_share(n_chunks):
                start = chunk * self.batch_size
                stop = min(start + self.batch_size, len(self.coords))
                tiles = np.stack(
                    [
                        read_tile(slide, xy, self.size_level0, self.tile_size_px)
                        for xy in self.coords[start:stop]
                    ]
                )
                yield torch.arange(start, stop), self.transform.apply(tiles)


class StoreTiles(IterableDataset):
    """Batches from one slide of a tile store (``--tiles``); the store reopens per process."""

    def __init__(
        self, store_path: str, slide: str, n_tiles: int, batch_size: int, transform: _TransformSpec
    ) -> None:
        self.store_path = store_path
        self.slide = slide
        self.n_tiles = n_tiles
        self.batch_size = batch_size
        self.transform = transform

    def __len__(self) -> int:
        return self.n_tiles

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        import torch

        from histoduo.store import TileStore

        n_chunks = math.ceil(self.n_tiles / self.batch_size)
        with TileStore(self.store_path) as store:
            for chunk in _worker_share(n_chunks):
                start = chunk * self.batch_size
                stop = min(start + self.batch_size, self.n_tiles)
                tiles = store.read_tiles(self.slide, np.arange(start, stop))
                yield torch.arange(start, stop), self.transform.apply(tiles)


def _worker_context() -> Any:
    """forkserver (spawn where missing): workers start clean and open the slide themselves.

    The fork server preloads this module (torch, readers), so each slide's workers fork from
    a warm process in milliseconds instead of importing torch again (seconds).
    """
    from histoduo.tiling import _pool_context

    context = _pool_context()
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["histoduo.predict"])
    return context


# --- the model side -------------------------------------------------------------------------


class TilePredictor:
    """Model + device + precision: normalised batches in, class probabilities out."""

    def __init__(self, model: Any, meta: CheckpointMeta, params: PredictParams) -> None:
        import torch

        self.meta = meta
        self.params = params
        self.device = resolve_device(params.device)
        if params.torch_threads:
            torch.set_num_threads(params.torch_threads)
        precision = params.precision
        if precision == "auto":
            precision = "bf16" if self.device == "cuda" else "fp32"
        self.precision = precision
        self.model = model.to(self.device).eval()
        if params.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = params.batch_size or (256 if self.device == "cuda" else 64)
        self.transform = _TransformSpec(
            meta.input_size_px, list(meta.mean), list(meta.std), meta.eval_resize
        )

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) normalised float -> (B, K) float32 probabilities."""
        import torch

        x = x.to(self.device, non_blocking=True)
        if self.params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = [x]
        if self.params.tta:
            views += [x.flip(-1), x.flip(-2), x.flip(-1, -2)]
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16"
            ),
        ):
            probs = sum(self.model(v).float().softmax(dim=1) for v in views) / len(views)
        return probs.cpu().numpy().astype(np.float32)

    def run(self, tiles: SlideTiles | StoreTiles, workers: int) -> np.ndarray:
        """Probabilities (N, K) for every tile of ``tiles``, in tile order."""
        from torch.utils.data import DataLoader

        n_classes = len(self.meta.class_names)
        probs = np.full((len(tiles), n_classes), np.nan, dtype=np.float32)
        if len(tiles) == 0:
            return probs
        n_chunks = math.ceil(len(tiles) / tiles.batch_size)
        workers = min(workers, n_chunks)
        loader = DataLoader(
            tiles,
            batch_size=None,  # the dataset yields whole batches
            num_workers=workers,
            # forkserver/spawn: workers start clean and open the slide themselves.
            multiprocessing_context=_worker_context() if workers > 0 else None,
            pin_memory=self.device == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )
        for indices, x in loader:
            probs[indices.numpy()] = self(x)
        if np.isnan(probs).any():
            raise RuntimeError("some tiles got no prediction (a DataLoader worker failed?)")
        return probs


# --- per-slide results ----------------------------------------------------------------------


def tile_features(scores: SlideScores) -> list[dict[str, Any]]:
    """QuPath tile objects: level-0 squares classified by their most probable class."""
    size = float(scores.tile_size_level0)
    features = []
    colors = [tuple(int(v) for v in c) for c in scores.class_colors]
    # classification.name stays the class id (QuPath keys classes by name; exported
    # corrections then read back as training labels); the display name is the object name.
    shown = scores.display_names
    for (x, y), p, k in zip(scores.coords, scores.probs, scores.pred):
        square = np.array([[x, y], [x + size, y], [x + size, y + size], [x, y + size]], float)
        features.append(
            polygon_feature(
                [(square, [])],
                class_name=scores.class_names[k],
                color=colors[k],
                object_type="tile",
                name=shown[k],
                measurements={f"prob_{c}": float(v) for c, v in zip(scores.class_names, p)},
            )
        )
    return features


def write_slide_outputs(
    slide_dir: Path,
    scores: SlideScores,
    grade: SlideGrade,
    summary: dict[str, Any],
    heatmap: bool,
) -> None:
    """Every per-slide file, atomically, then the ``done`` marker last."""
    from histoduo.geojson import write_feature_collection
    from histoduo.tissue import tissue_features

    slide_dir.mkdir(parents=True, exist_ok=True)
    scores.save(slide_dir / SCORES_FILE)
    atomic_write_text(slide_dir / "tiles.csv", tiles_table_text(scores))
    write_feature_collection(slide_dir / "tiles.geojson", tile_features(scores))
    mask = TissueMask(
        scores.tissue_mask, scores.mask_downsample, scores.thumbnail, scores.slide_mpp
    )
    write_feature_collection(slide_dir / "tissue.geojson", tissue_features(mask))
    from histoduo.heatmap import HeatmapStyle, render_slide_maps, render_thumbnail

    if heatmap:
        render_slide_maps(scores, slide_dir, HeatmapStyle())
    else:
        render_thumbnail(scores, slide_dir, HeatmapStyle())  # the report shows it
    summary = {**summary, "grade": grade.to_dict()}
    atomic_write_text(slide_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    atomic_write_text(slide_dir / DONE_MARKER, json.dumps({"finished": time.time()}))


# --- the run --------------------------------------------------------------------------------


@dataclass
class SlideOutcome:
    slide: str
    path: str
    status: str  # done | skipped | no_tissue | error
    n_tiles: int = 0
    call: str = ""
    confidence: float | None = None
    uncertain: bool | None = None
    seconds: float = 0.0
    tiles_per_s: float | None = None
    error: str = ""


@dataclass
class PredictReport:
    out_dir: str
    outcomes: list[SlideOutcome]
    manifest_path: str
    slides_csv: str

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status in ("error", "no_tissue")]


def _display_list(meta: CheckpointMeta) -> list[str]:
    from histoduo.display import display_names

    return list(display_names(meta.class_names, meta.class_display_names).values())


def _class_colors(names: Sequence[str]) -> np.ndarray:
    return np.array([class_color(n) for n in names], dtype=np.uint8).reshape(-1, 3)


def _tiling_for(meta: CheckpointMeta, params: PredictParams, warn: Callable[[str], None]) -> Any:
    from histoduo.tiling import TilingParams

    mpp, size = meta.target_mpp, meta.tile_size_px
    if params.mpp is not None and not math.isclose(params.mpp, mpp, rel_tol=1e-3):
        warn(f"--mpp {params.mpp:g} overrides the checkpoint's {mpp:g} um/px")
        mpp = params.mpp
    if params.tile_size_px is not None and params.tile_size_px != size:
        warn(f"--tile-size {params.tile_size_px} overrides the checkpoint's {size} px")
        size = params.tile_size_px
    return TilingParams(
        target_mpp=mpp,
        tile_size_px=size,
        stride_px=params.stride_px,
        min_tissue_fraction=params.min_tissue_fraction,
        tissue=params.tissue,
    )


def _slide_scores_from_slide(
    source: SlideSource,
    predictor: TilePredictor,
    params: PredictParams,
    tiling: Any,
    workers: int,
) -> SlideScores:
    from histoduo.tiling import TileGeometry, plan_tiles

    with open_slide(source.path, params.backend, source.mpp) as slide:
        geometry = TileGeometry.for_slide(slide, tiling)  # fails clearly without mpp
        mask = require_tissue(detect_tissue(slide, tiling.tissue), source.path)
        width0, height0 = slide.dimensions
        coords, fractions = plan_tiles(mask, geometry, width0, height0, tiling.min_tissue_fraction)
        if len(coords) == 0:
            raise SlideError(
                source.path,
                f"no tissue tiles: no tile reaches the minimum tissue fraction "
                f"{tiling.min_tissue_fraction:g} (try a lower --min-tissue)",
            )
        thumb_ds = max(1.0, max(width0, height0) / params.thumbnail_max_px)
        if thumb_ds >= mask.downsample:
            thumbnail, thumb_ds = mask.thumbnail, mask.downsample
        else:
            thumbnail = slide.read_downsampled(thumb_ds)
    # The slide is closed before workers start: they open it themselves.
    tiles = SlideTiles(
        str(source.path),
        params.backend,
        source.mpp,
        coords,
        geometry.tile_size_level0,
        tiling.tile_size_px,
        predictor.batch_size,
        predictor.transform,
    )
    probs = predictor.run(tiles, workers)
    names = list(predictor.meta.class_names)
    return SlideScores(
        slide=source.name,
        probs=probs,
        coords=coords,
        tissue_fraction=fractions,
        tile_size_level0=geometry.tile_size_level0,
        stride_level0=geometry.stride_level0,
        class_names=names,
        class_colors=_class_colors(names),
        class_display_names=_display_list(predictor.meta),
        grade_classes=list(predictor.meta.roles.grades),
        thumbnail=thumbnail,
        thumbnail_downsample=float(thumb_ds),
        tissue_mask=mask.mask,
        mask_downsample=mask.downsample,
        slide_width=width0,
        slide_height=height0,
        slide_mpp=geometry.slide_mpp,
        target_mpp=tiling.target_mpp,
        tile_size_px=tiling.tile_size_px,
    )


def _slide_scores_from_store(
    store: Any, slide: str, predictor: TilePredictor, workers: int
) -> SlideScores:
    attrs = store.attrs(slide)
    thumbnail, thumb_ds = store.thumbnail(slide)
    mask, mask_ds = store.tissue_mask(slide)
    n = store.num_tiles(slide)
    tiles = StoreTiles(str(store.path), slide, n, predictor.batch_size, predictor.transform)
    probs = predictor.run(tiles, workers)
    names = list(predictor.meta.class_names)
    return SlideScores(
        slide=slide,
        probs=probs,
        coords=store.coords(slide).astype(np.int64),
        tissue_fraction=store.tissue_fraction(slide).astype(np.float32),
        tile_size_level0=int(attrs["tile_size_level0"]),
        stride_level0=int(attrs.get("stride_level0", attrs["tile_size_level0"])),
        class_names=names,
        class_colors=_class_colors(names),
        class_display_names=_display_list(predictor.meta),
        grade_classes=list(predictor.meta.roles.grades),
        thumbnail=thumbnail,
        thumbnail_downsample=thumb_ds,
        tissue_mask=mask,
        mask_downsample=mask_ds,
        slide_width=int(attrs["level0_width"]),
        slide_height=int(attrs["level0_height"]),
        slide_mpp=float(attrs["slide_mpp"]),
        target_mpp=float(attrs["target_mpp"]),
        tile_size_px=int(attrs["tile_size_px"]),
    )


def grade_scores(scores: SlideScores, meta: CheckpointMeta, params: GradeParams) -> SlideGrade:
    """The slide call (grading.py) with its uncertainty flag."""
    from histoduo.grading import Resolution, assess_uncertainty

    per_area = (scores.tile_size_level0 / max(scores.stride_level0, 1)) ** 2
    grade = grade_slide(
        scores.probs,
        scores.class_names,
        meta.roles,
        params,
        weights=scores.tissue_fraction,
        tiles_per_area=per_area,
    )
    resolution = Resolution(scores.slide_mpp, scores.target_mpp, meta.target_mpp)
    return assess_uncertainty(grade, params.uncertainty, resolution)


def is_done(slide_dir: Path) -> bool:
    return (slide_dir / DONE_MARKER).exists()


def predict_run(
    checkpoint: str | Path,
    out_dir: str | Path,
    params: PredictParams,
    *,
    sources: Sequence[SlideSource] = (),
    tiles_store: str | Path | None = None,
    overwrite: bool = False,
    skip_errors: bool = False,
    shard: tuple[int, int] | None = None,
    log: Callable[[str], None] | None = None,
    model_and_meta: tuple[Any, CheckpointMeta] | None = None,
) -> PredictReport:
    """Predict every slide (or every slide of ``tiles_store``) into ``out_dir``.

    Finished slides (``done`` marker) are skipped unless ``overwrite``; a slide folder without
    the marker is an interrupted slide and is redone from scratch. Without ``skip_errors`` the
    first failing slide stops the run (after the manifest and slides.csv are written) by
    raising its SlideError. Raises CheckpointError for files that are not histoduo checkpoints.
    """
    from histoduo.checkpoint import load_model

    say = log or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if model_and_meta is None:
        model, meta = load_model(checkpoint)
    else:
        model, meta = model_and_meta
    predictor = TilePredictor(model, meta, params)
    workers = default_workers() if params.workers is None else params.workers
    tiling = _tiling_for(meta, params, say)

    store = None
    if tiles_store is not None:
        from histoduo.store import TileStore

        store = TileStore(tiles_store)
        jobs: list[tuple[str, str]] = [(name, str(tiles_store)) for name in store.slides]
        if shard is not None:
            from histoduo.sources import select_shard

            keep = {s.name for s in select_shard([SlideSource(Path(n)) for n, _ in jobs], shard)}
            jobs = [j for j in jobs if j[0] in keep]
        _check_store_resolution(store, jobs, tiling, say)
    else:
        jobs = [(s.name, str(s.path)) for s in sources]
    by_name = {s.name: s for s in sources}

    outcomes: list[SlideOutcome] = []
    first_error: SlideError | None = None
    try:
        for name, path in jobs:
            slide_dir = out / name
            if is_done(slide_dir) and not overwrite:
                outcomes.append(_skipped_outcome(slide_dir, name, path))
                say(f"{name}: already done, skipped")
                continue
            if slide_dir.exists():
                shutil.rmtree(slide_dir)  # interrupted or --overwrite: start clean
            t0 = time.perf_counter()
            try:
                if store is not None:
                    scores = _slide_scores_from_store(store, name, predictor, workers)
                else:
                    scores = _slide_scores_from_slide(
                        by_name[name], predictor, params, tiling, workers
                    )
                t_model = time.perf_counter() - t0
                grade = grade_scores(scores, meta, params.grade)
                summary = {
                    "slide": name,
                    "path": path,
                    "n_tiles": len(scores.probs),
                    "tissue_area_mm2": _tissue_area_mm2(scores),
                    "slide_mpp": scores.slide_mpp,
                    "target_mpp": scores.target_mpp,
                    "model_mpp": meta.target_mpp,
                    "class_display_names": dict(zip(scores.class_names, scores.display_names)),
                    "tile_size_px": scores.tile_size_px,
                    "tile_size_level0": scores.tile_size_level0,
                    "stride_level0": scores.stride_level0,
                    "checkpoint": str(checkpoint),
                    "grade_params": params.grade.to_dict(),
                    "seconds_predict": t_model,
                }
                write_slide_outputs(slide_dir, scores, grade, summary, params.heatmap)
            except SlideError as exc:
                status = "no_tissue" if "no tissue" in exc.reason else "error"
                seconds = time.perf_counter() - t0
                outcomes.append(SlideOutcome(name, path, status, seconds=seconds, error=str(exc)))
                slide_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(
                    slide_dir / ERROR_FILE,
                    json.dumps({"slide": name, "path": path, "status": status, "error": str(exc)}),
                )
                say(f"[red]{exc}[/]")
                if not skip_errors:
                    first_error = exc
                    break
                continue
            seconds = time.perf_counter() - t0
            n = len(scores.probs)
            outcomes.append(
                SlideOutcome(
                    name,
                    path,
                    "done",
                    n_tiles=n,
                    call=grade.call,
                    confidence=grade.confidence,
                    uncertain=grade.uncertain,
                    seconds=seconds,
                    tiles_per_s=n / t_model if t_model > 0 else None,
                )
            )
            flag = f" [yellow]uncertain: {grade.uncertainty_text}[/]" if grade.uncertain else ""
            say(f"{name}: {n} tiles, {grade.call} ({grade.confidence:.2f}), {seconds:.1f} s{flag}")
    finally:
        if store is not None:
            store.close()

    csv_path = write_slides_csv(out)
    manifest = _manifest(checkpoint, meta, params, predictor, workers, outcomes, started, shard)
    manifest["tiles_store"] = str(tiles_store) if tiles_store else None
    manifest["overwrite"], manifest["skip_errors"] = overwrite, skip_errors
    name = "manifest.json" if shard is None else f"manifest.shard-{shard[0]}-of-{shard[1]}.json"
    atomic_write_text(out / name, json.dumps(manifest, indent=2, default=str))
    from histoduo.report import write_report

    write_report(out)  # after the manifest: the report names the model from it
    report = PredictReport(str(out), outcomes, str(out / name), str(csv_path))
    if first_error is not None:
        raise first_error
    return report


def _check_store_resolution(
    store: Any, jobs: list[tuple[str, str]], tiling: Any, warn: Callable[[str], None]
) -> None:
    for name, _ in jobs[:1]:
        attrs = store.attrs(name)
        if not math.isclose(float(attrs["target_mpp"]), tiling.target_mpp, rel_tol=0.05):
            warn(
                f"tile store {store.path} was tiled at {float(attrs['target_mpp']):g} um/px, "
                f"the model expects {tiling.target_mpp:g} um/px"
            )


def _tissue_area_mm2(scores: SlideScores) -> float:
    return float(scores.tissue_mask.sum()) * (scores.mask_downsample * scores.slide_mpp) ** 2 / 1e6


def _skipped_outcome(slide_dir: Path, name: str, path: str) -> SlideOutcome:
    try:
        summary = json.loads((slide_dir / SUMMARY_FILE).read_text())
        grade = summary.get("grade", {})
        return SlideOutcome(
            name,
            path,
            "skipped",
            n_tiles=int(summary.get("n_tiles", 0)),
            call=grade.get("call", ""),
            confidence=grade.get("confidence"),
            uncertain=grade.get("uncertain"),
        )
    except (OSError, ValueError):
        return SlideOutcome(name, path, "skipped")


def _manifest(
    checkpoint: str | Path,
    meta: CheckpointMeta,
    params: PredictParams,
    predictor: TilePredictor,
    workers: int,
    outcomes: list[SlideOutcome],
    started: float,
    shard: tuple[int, int] | None,
) -> dict[str, Any]:
    import torch

    from histoduo import __version__

    return {
        "histoduo_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "started": started,
        "seconds": time.time() - started,
        "checkpoint": {
            "path": str(Path(checkpoint).resolve()) if checkpoint else None,
            "class_names": meta.class_names,
            "class_roles": meta.class_roles,
            "target_mpp": meta.target_mpp,
            "tile_size_px": meta.tile_size_px,
            "input_size_px": meta.input_size_px,
            "arch": meta.model_config.get("arch"),
            "backbone": meta.model_config.get("backbone"),
            "epoch": meta.epoch,
            "metrics": meta.metrics,
        },
        "params": params.to_dict(),
        "runtime": {
            "device": predictor.device,
            "precision": predictor.precision,
            "batch_size": predictor.batch_size,
            "workers": workers,
            "torch_threads": torch.get_num_threads(),
        },
        "shard": list(shard) if shard else None,
        "slides": [asdict(o) for o in outcomes],
    }
