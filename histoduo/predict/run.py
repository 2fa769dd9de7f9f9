"""The ``predict`` run: every slide (or every slide of a tile store) into ``OUT/<slide>/``.

Finished slides (``done`` marker) are skipped; a slide folder without the marker is an
interrupted slide and is redone from scratch. Run level ``OUT/``: ``slides.csv`` (rebuilt
from every slide folder, so shards and reruns accumulate), ``report.html`` and
``manifest.json`` (``manifest.shard-K-of-N.json`` for a shard).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoduo.predict.engine import TilePredictor
from histoduo.predict.folder import (
    CheckpointIdentity,
    check_same_model,
    conflict_error,
    folder_slides,
    install_results,
    record_failure,
    results_lock,
    staging_folder,
)
from histoduo.predict.outputs import (
    PredictReport,
    SlideOutcome,
    skipped_outcome,
    write_slide_outputs,
)
from histoduo.predict.params import PredictParams, tiling_for
from histoduo.predict.scoring import (
    grade_scores,
    plan_slide,
    qc_summary,
    scores_from_slide,
    scores_from_store,
    tissue_area_mm2,
)
from histoduo.results.layout import ERROR_FILE, SlideSummary, is_done, manifest_name
from histoduo.results.tables import write_slides_csv
from histoduo.runtime.files import atomic_write_text, remove_stale_temporaries
from histoduo.runtime.locks import LockParams
from histoduo.runtime.pool import default_workers
from histoduo.runtime.prefetch import Prefetcher
from histoduo.runtime.slides import failure_text, run_slides
from histoduo.slide import SlideError
from histoduo.slide.sources import SlideSource

if TYPE_CHECKING:
    from histoduo.models.checkpoint import CheckpointMeta
    from histoduo.store import TileStore
    from histoduo.tiling import TilingParams


@dataclass(frozen=True)
class _Job:
    name: str
    path: str
    source: SlideSource | None = None  # None: the slide comes from the tile store


@dataclass
class _PredictRun:
    """One ``predict_run`` call's settings and what it has done so far."""

    out: Path
    checkpoint: str | Path
    meta: CheckpointMeta
    params: PredictParams
    predictor: TilePredictor
    tiling: TilingParams
    workers: int
    overwrite: bool
    say: Callable[[str], None]
    model: CheckpointIdentity = field(default_factory=lambda: CheckpointIdentity.of(None))
    store: TileStore | None = None
    outcomes: list[SlideOutcome] = field(default_factory=list)
    plans: Prefetcher | None = None  # the next slide, planned while this one runs
    slide_model: Any = None  # predict/slide_model.SlideModel, with --slide-model

    def resumed(self, job: _Job) -> bool:
        slide_dir = self.out / job.name
        if is_done(slide_dir) and not self.overwrite:
            self.outcomes.append(skipped_outcome(slide_dir, job.name, job.path))
            self.say(f"{job.name}: already done, skipped")
            return True
        # Interrupted or --overwrite: redone in a staging folder, installed when complete.
        return False

    def process(self, job: _Job) -> None:
        t0 = time.perf_counter()
        if self.store is not None:
            scores = scores_from_store(
                self.store, job.name, self.predictor, self.workers, self.params
            )
            artefacts = None
        else:
            assert job.source is not None
            plan = self.plans.get(job.name) if self.plans is not None else None
            if plan is None:
                plan = plan_slide(job.source, self.params, self.tiling)
            scores = scores_from_slide(
                job.source, self.predictor, self.params, self.tiling, self.workers, plan
            )
            artefacts = plan.artefacts
        t_model = time.perf_counter() - t0
        qc_on = self.params.qc_mode != "off"
        max_burden = self.params.qc.max_burden if qc_on else None
        grade = grade_scores(scores, self.meta, self.params.grade, max_burden)
        summary = SlideSummary(
            slide=job.name,
            path=job.path,
            n_tiles=len(scores.probs),
            tissue_area_mm2=tissue_area_mm2(scores),
            slide_mpp=scores.slide_mpp,
            target_mpp=scores.target_mpp,
            model_mpp=self.meta.target_mpp,
            class_display_names=dict(zip(scores.class_names, scores.display_names)),
            tile_size_px=scores.tile_size_px,
            tile_size_level0=scores.tile_size_level0,
            stride_level0=scores.stride_level0,
            checkpoint=self.model.path or str(self.checkpoint),
            checkpoint_sha256=self.model.sha256,
            grade_params=self.params.grade.to_dict(),
            seconds_predict=t_model,
            qc=qc_summary(scores, artefacts, self.params.qc_mode),
        )
        staging = staging_folder(self.out / job.name)
        try:
            if self.slide_model is not None:
                summary.mil = self._call_slide_model(job, scores, grade.call, staging)
            write_slide_outputs(staging, scores, grade, summary, self.params.heatmap)
            install_results(staging, self.out / job.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.perf_counter() - t0
        n = len(scores.probs)
        self.outcomes.append(
            SlideOutcome(
                job.name,
                job.path,
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
        call = f"{grade.call} ({grade.confidence:.2f})"
        self.say(f"{job.name}: {n} tiles, {call}, {seconds:.1f} s{flag}")

    def _call_slide_model(
        self, job: _Job, scores: Any, rule_call: str, slide_dir: Path
    ) -> dict[str, Any]:
        """The slide model's call from the slide's feature file, its attention map and
        mil.json in the slide folder (before ``done``); the fields for summary.json."""
        from histoduo.predict.slide_model import SlideModelError, write_slide_model_outputs
        from histoduo.store.features import (
            FeatureFileError,
            feature_file_path,
            read_feature_bag,
        )

        assert self.params.slide_features is not None
        path = feature_file_path(self.params.slide_features, job.name)
        try:
            # flagged tiles left out as in train-mil and the tile grade (--qc)
            bag = read_feature_bag(path).kept(self.params.qc_mode)
        except FeatureFileError as exc:
            raise SlideError(path, f"{exc.reason} (needed by --slide-model)") from exc
        try:
            self.slide_model.check_features(bag.info, path)
            result = self.slide_model.call(bag.features)
        except SlideModelError as exc:  # per slide: --skip-errors goes on with the rest
            raise SlideError(exc.path, exc.reason) from exc
        tile_px = float(bag.info.extra.get("tile_size_px", bag.info.input_size_px))
        slide_dir.mkdir(parents=True, exist_ok=True)
        fields = write_slide_model_outputs(
            slide_dir,
            job.name,
            result,
            bag.coords,
            tile_size_level0=tile_px * bag.info.mpp / scores.slide_mpp,
            level0_size=(scores.level0_width, scores.level0_height),
            slide_mpp=scores.slide_mpp,
            rule_call=rule_call,
            thumbnail=scores.thumbnail,
            thumbnail_downsample=scores.thumbnail_downsample,
        )
        agree = {True: "agrees", False: "DISAGREES"}.get(fields["mil_agrees"], "")
        self.say(f"{job.name}: slide model {result.call} ({result.confidence:.2f}) {agree}")
        return {
            **fields,
            "mil_probabilities": result.probabilities,
            "slide_model": str(self.params.slide_model),
        }

    def failed(self, job: _Job, exc: Exception, status: str, seconds: float) -> None:
        text = failure_text(exc)
        self.outcomes.append(SlideOutcome(job.name, job.path, status, seconds=seconds, error=text))
        self.say(f"[red]{text}[/]")
        slide_dir = self.out / job.name
        if not record_failure(slide_dir):
            return  # the previous finished result stays, and stays listed
        slide_dir.mkdir(parents=True, exist_ok=True)
        error = {"slide": job.name, "path": job.path, "status": status, "error": text}
        atomic_write_text(slide_dir / ERROR_FILE, json.dumps(error))


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
    trust_checkpoint: bool = False,
    lock: LockParams | None = None,
) -> PredictReport:
    """Predict every slide (or every slide of ``tiles_store``) into ``out_dir``.

    Finished slides (``done`` marker) are skipped unless ``overwrite``; a slide folder without
    the marker is an interrupted slide and is redone from scratch. Without ``skip_errors`` the
    first failing slide stops the run (after the manifest and slides.csv are written) by
    raising its SlideError. Raises CheckpointError for files that are not histoduo checkpoints,
    and ResultsConflictError when ``out_dir`` holds finished slides another checkpoint made
    (``overwrite`` redoes them). The run holds ``OUT/.histoduo.lock`` throughout; a shard
    (whose slides no other shard touches) holds it only while it rewrites the run's files.
    """
    from histoduo.models.heads import load_tile_model

    say = log or (lambda message: None)
    out = Path(out_dir)
    started = time.time()
    if model_and_meta is None:
        model, meta = load_tile_model(  # pickles need trust; feature heads their encoder
            checkpoint, trust=trust_checkpoint, encoder_weights=params.encoder_weights
        )
    else:
        model, meta = model_and_meta
    predictor = TilePredictor(model, meta, params)
    workers = params.workers
    if workers is None:
        workers = default_workers(predictor.worker_kind(store=tiles_store is not None))
    tiling = tiling_for(meta, params, say)
    run = _PredictRun(
        out=out,
        checkpoint=checkpoint,
        meta=meta,
        params=params,
        predictor=predictor,
        tiling=tiling,
        workers=workers,
        overwrite=overwrite,
        say=say,
    )
    run.model = CheckpointIdentity.of(None if model_and_meta else checkpoint)
    if params.slide_model is not None:
        from histoduo.predict.slide_model import SlideModel

        run.slide_model = SlideModel(params.slide_model)
    with ExitStack() as held:
        try:
            jobs = _jobs(run, sources, tiles_store, shard)
            other = check_same_model(out, [j.name for j in jobs], run.model)
            if other and not overwrite:
                raise conflict_error(out, other, run.model)
            out.mkdir(parents=True, exist_ok=True)  # once model, options and inputs check out
            if shard is None:
                held.enter_context(results_lock(out, lock, say))
            remove_stale_temporaries(out)  # a killed run's slides.csv, manifest, staging
            run.plans = _prefetch_plans(run, jobs)
            first_error = run_slides(
                jobs,
                process=run.process,
                failed=run.failed,
                resumed=run.resumed,
                skip_errors=skip_errors,
                errors=(SlideError,),
            )
        finally:
            if run.plans is not None:
                run.plans.close()
            if run.store is not None:
                run.store.close()
        if shard is not None:  # a short wait is fine: the other shard only writes summaries
            wait = LockParams(wait_s=max(60.0, (lock or LockParams()).wait_s))
            held.enter_context(results_lock(out, wait, say))
        report = _finish(run, checkpoint, tiles_store, skip_errors, shard, started)
    if first_error is not None:
        raise first_error
    return report


def _finish(
    run: _PredictRun,
    checkpoint: str | Path,
    tiles_store: str | Path | None,
    skip_errors: bool,
    shard: tuple[int, int] | None,
    started: float,
) -> PredictReport:
    """slides.csv, the manifest and the report, rebuilt from the slide folders (locked)."""
    out, meta, params, overwrite = run.out, run.meta, run.params, run.overwrite
    predictor, workers = run.predictor, run.workers
    csv_path = write_slides_csv(out)
    manifest = _manifest(
        checkpoint=checkpoint,
        meta=meta,
        params=params,
        predictor=predictor,
        workers=workers,
        outcomes=run.outcomes,
        started=started,
        shard=shard,
    )
    manifest["tiles_store"] = str(tiles_store) if tiles_store else None
    manifest["overwrite"], manifest["skip_errors"] = overwrite, skip_errors
    name = manifest_name(shard)
    manifest["checkpoint"]["sha256"] = run.model.sha256
    manifest["this_run"] = manifest["slides"]
    manifest["slides"] = folder_slides(out, manifest["this_run"])  # what is actually there
    atomic_write_text(out / name, json.dumps(manifest, indent=2, default=str))
    from histoduo.results.report import write_report

    write_report(out)  # after the manifest: the report names the model from it
    return PredictReport(str(out), run.outcomes, str(out / name), str(csv_path))


def _jobs(
    run: _PredictRun,
    sources: Sequence[SlideSource],
    tiles_store: str | Path | None,
    shard: tuple[int, int] | None,
) -> list[_Job]:
    """The slides to predict; opens ``run.store`` when they come from a tile store."""
    from histoduo.slide.sources import check_output_name

    if tiles_store is None:
        jobs = [_Job(s.name, str(s.path), s) for s in sources]
        for job in jobs:  # before anything is written or cleared under OUT/<name>
            check_output_name(job.name, job.path)
        return jobs
    from histoduo.slide.sources import select_names
    from histoduo.store import TileStore, require_pixels

    run.store = TileStore(tiles_store)
    require_pixels(run.store)
    names = select_names(run.store.slides, shard)  # the same rule as for slide files
    jobs = [_Job(name, str(tiles_store)) for name in names]
    for job in jobs:  # a crafted store may name a slide '../../x'
        check_output_name(job.name, job.path)
    _check_store_resolution(run.store, jobs, run.tiling, run.say)
    return jobs


def _prefetch_plans(run: _PredictRun, jobs: list[_Job]) -> Prefetcher:
    """Slides still to do are opened, their tissue found and tiles planned one ahead."""
    sources = {j.name: j.source for j in jobs if j.source is not None}
    todo = [n for n in sources if run.overwrite or not is_done(run.out / n)]
    return Prefetcher(
        lambda name: plan_slide(sources[name], run.params, run.tiling),
        todo,
        run.params.prefetch_slides,
    )


def _check_store_resolution(
    store: TileStore, jobs: list[_Job], tiling: TilingParams, warn: Callable[[str], None]
) -> None:
    for job in jobs[:1]:
        target_mpp = store.record(job.name).target_mpp
        if not math.isclose(target_mpp, tiling.target_mpp, rel_tol=0.05):
            warn(
                f"tile store {store.path} was tiled at {target_mpp:g} um/px, "
                f"the model expects {tiling.target_mpp:g} um/px"
            )


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
            **predictor.runtime.describe(),
            "decode": "device" if predictor.transform.on_device else "worker",
            "prefetch_slides": params.prefetch_slides,
            "batch_size": predictor.batch_size,
            "workers": workers,
            "torch_threads": torch.get_num_threads(),
        },
        "shard": list(shard) if shard else None,
        "slides": [asdict(o) for o in outcomes],
    }
