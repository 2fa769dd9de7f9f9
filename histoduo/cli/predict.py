"""``histoduo predict`` (slides -> tile scores, maps, reports) and ``histoduo heatmap``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._model_options import EncoderWeights
from histoduo.cli._options import (
    LOCK_DEFAULTS,
    Backend,
    ClearDeadLocks,
    Device,
    MinTissue,
    Overwrite,
    QCMode,
    Quiet,
    Shard,
    SkipErrors,
    SlideMpp,
    TrustCheckpoint,
    WaitLock,
    lock_params,
)
from histoduo.grading import GradeParams, UncertaintyParams
from histoduo.predict.params import PredictParams
from histoduo.qc.params import DEFAULT_QC_MODE

# The defaults --help shows are the library's (these modules import no torch).
PREDICT_DEFAULTS = PredictParams()
GRADE_DEFAULTS = GradeParams()
UNCERTAINTY_DEFAULTS = UncertaintyParams()

SlideModelOption = Annotated[
    Path | None,
    typer.Option(
        "--slide-model",
        help="A train-mil checkpoint (best.pt): its call, confidence and agreement with the "
        "rule-based call go into slides.csv and report.html, with an attention map per slide.",
        show_default=False,
    ),
]
SlideFeatures = Annotated[
    Path | None,
    typer.Option(
        "--slide-features",
        help="With --slide-model: the features_<encoder> folder `histoduo embed` wrote for "
        "these slides (the encoder the slide model names).",
        show_default=False,
    ),
]


@app.command("predict")
def predict_command(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="histoduo checkpoint (.pt).", show_default=False)
    ],
    slides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Slide files, folders, glob patterns or a slide CSV (path[,mpp]); "
            "leave out with --tiles.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder.")] = Path("results"),
    tiles: Annotated[
        Path | None,
        typer.Option("--tiles", help="Predict on an existing tile store instead of slides."),
    ] = None,
    heatmap: Annotated[
        bool,
        typer.Option(
            "--heatmap/--no-heatmap",
            help="Draw class, probability and grade maps (report.html shows them).",
        ),
    ] = PREDICT_DEFAULTS.heatmap,
    mpp: Annotated[
        float | None,
        typer.Option(
            "--mpp", help="Override the checkpoint's tile resolution (um/px).", show_default=False
        ),
    ] = None,
    tile_size: Annotated[
        int | None,
        typer.Option(
            "--tile-size", help="Override the checkpoint's tile size (px).", show_default=False
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            "--stride",
            help="Tile step in px at the tile resolution (< tile size "
            "overlaps tiles for smoother maps).",
            show_default=False,
        ),
    ] = None,
    min_tissue: MinTissue = PREDICT_DEFAULTS.min_tissue_fraction,
    tta: Annotated[bool, typer.Option("--tta", help="Average over flipped tiles (4x cost).")] = (
        PREDICT_DEFAULTS.tta
    ),
    device: Device = PREDICT_DEFAULTS.device,
    precision: Annotated[
        str,
        typer.Option("--precision", help="auto (bf16 weights on GPU, fp32 on CPU), fp32, bf16."),
    ] = PREDICT_DEFAULTS.precision,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the model (long GPU runs).")
    ] = PREDICT_DEFAULTS.compile,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="Tiles per batch (default 256 GPU, 64 CPU).", show_default=False
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Tile-reading worker processes (default: 1 on <= 2 "
            "cores, else cores - 1; 0 = in-process).",
            show_default=False,
            min=0,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", help="CPU threads for the model (default: torch's).", show_default=False
        ),
    ] = None,
    min_grade_fraction: Annotated[
        float,
        typer.Option(
            "--min-grade-fraction",
            help="A grade decides only if it covers at least this fraction of the tumour area.",
        ),
    ] = GRADE_DEFAULTS.min_grade_fraction,
    min_grade_tiles: Annotated[
        int, typer.Option("--min-grade-tiles", help="... and at least this many tiles.")
    ] = GRADE_DEFAULTS.min_grade_tiles,
    min_tumour_fraction: Annotated[
        float,
        typer.Option(
            "--min-tumour-fraction",
            help="Below this tumour fraction of the tissue the slide is called 'no tumour'.",
        ),
    ] = GRADE_DEFAULTS.min_tumour_fraction,
    min_tumour_tiles: Annotated[
        int, typer.Option("--min-tumour-tiles", help="... or below this many tumour tiles.")
    ] = GRADE_DEFAULTS.min_tumour_tiles,
    min_confidence: Annotated[
        float,
        typer.Option(
            "--min-confidence",
            help="Calls less confident than this are flagged uncertain (with other reasons: "
            "docs/prediction.md).",
        ),
    ] = UNCERTAINTY_DEFAULTS.min_confidence,
    backend: Backend = "auto",
    slide_mpp: SlideMpp = None,
    skip_errors: SkipErrors = False,
    overwrite: Overwrite = False,
    shard: Shard = None,
    trust_checkpoint: TrustCheckpoint = False,
    encoder_weights: EncoderWeights = None,
    slide_model: SlideModelOption = None,
    slide_features: SlideFeatures = None,
    quiet: Quiet = False,
    qc: QCMode = DEFAULT_QC_MODE,
    wait_lock: WaitLock = LOCK_DEFAULTS.wait_s,
    clear_dead_locks: ClearDeadLocks = LOCK_DEFAULTS.clear_dead,
) -> None:
    """Predict tile classes and a slide-level ccRCC grade for every slide.

    Writes OUT/<slide>/ (tiles.csv, scores.npz, tiles.geojson, tissue.geojson, summary.json,
    maps) and OUT/slides.csv, OUT/report.html (open it in a browser) and OUT/manifest.json.
    Finished slides are skipped on rerun unless --overwrite; an OUT holding another
    checkpoint's results is refused (--overwrite redoes them, new before old). Several GPUs:
    run one process per GPU with CUDA_VISIBLE_DEVICES=i and --shard i+1/N into the same --out.
    """
    from rich.console import Console

    from histoduo.grading import GradeParams, UncertaintyParams
    from histoduo.models.checkpoint import CheckpointError
    from histoduo.results.layout import ResultsConflictError
    from histoduo.runtime.locks import LockedError
    from histoduo.slide import SlideError
    from histoduo.slide.shards import shard_output
    from histoduo.slide.sources import collect_sources, parse_shard, select_shard
    from histoduo.store import StoreError

    console = Console(stderr=True, quiet=quiet, soft_wrap=True)
    if not slides and tiles is None:
        raise fail("give slides to predict, or a tile store with --tiles")
    if slides and tiles is not None:
        raise fail("give slides or --tiles, not both")
    if not model.exists():
        raise fail(f"{model}: checkpoint not found (pass it with --model)")
    try:
        from histoduo.predict import PredictParams, predict_run

        params = PredictParams(
            target_mpp=mpp,
            tile_size_px=tile_size,
            stride_px=stride,
            min_tissue_fraction=min_tissue,
            batch_size=batch_size,
            device=device,
            precision=precision,
            compile=compile_model,
            workers=workers,
            torch_threads=threads,
            tta=tta,
            heatmap=heatmap,
            backend=backend,
            encoder_weights=str(encoder_weights) if encoder_weights else None,
            slide_model=str(slide_model) if slide_model is not None else None,
            slide_features=str(slide_features) if slide_features is not None else None,
            qc_mode=qc,
            grade=GradeParams(
                min_grade_fraction=min_grade_fraction,
                min_grade_tiles=min_grade_tiles,
                min_tumour_fraction=min_tumour_fraction,
                min_tumour_tiles=min_tumour_tiles,
                uncertainty=UncertaintyParams(min_confidence=min_confidence),
            ),
        )
        shard_kn = parse_shard(shard)
        out = shard_output(out, shard_kn)  # {shard} -> K-of-N; shards may share one folder
        sources = []
        if slides:
            sources = select_shard(collect_sources(list(slides), slide_mpp), shard_kn)
            if not sources and shard_kn is None:
                raise fail(f"no slides found in {', '.join(slides)}")
    except ValueError as exc:
        raise fail(str(exc)) from exc

    def log(message: str) -> None:
        console.print(message, highlight=False)

    try:
        report = predict_run(
            model,
            out,
            params,
            sources=sources,
            tiles_store=tiles,
            overwrite=overwrite,
            skip_errors=skip_errors,
            shard=shard_kn,
            log=log,
            trust_checkpoint=trust_checkpoint,
            lock=lock_params(wait_lock, clear_dead_locks),
        )
    except (CheckpointError, StoreError, ResultsConflictError, LockedError) as exc:
        raise fail(str(exc)) from exc
    except SlideError as exc:
        raise fail(f"{exc} (see {out / 'manifest.json'}; --skip-errors goes on)") from exc
    except (RuntimeError, ValueError, OSError) as exc:
        from histoduo.runtime.errors import output_error

        # A full or read-only disk: one line naming the file (or at least --out).
        disk = output_error(exc, out) if isinstance(exc, OSError) else None
        raise fail(str(disk or exc)) from None
    done = sum(o.status == "done" for o in report.outcomes)
    skipped = sum(o.status == "skipped" for o in report.outcomes)
    log(
        f"{done} predicted, {skipped} skipped, {len(report.failed)} failed -> "
        f"{report.slides_csv}, {report.manifest_path}"
    )
    if report.failed:
        from histoduo.runtime.exitcodes import EXIT_SOME_FAILED

        raise typer.Exit(EXIT_SOME_FAILED)


def _parse_colors(items: list[str]) -> dict[str, tuple[int, int, int]]:
    """'name=#rrggbb' or 'name=r,g,b' -> {name: (r, g, b)}."""
    colors = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--color must look like NAME=#rrggbb, got {item!r}")
        value = value.strip()
        try:
            if value.startswith("#") and len(value) == 7:
                rgb = tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))
            else:
                rgb = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"--color {item!r}: not a colour") from None
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"--color {item!r}: need three values 0-255")
        colors[name.strip()] = rgb
    return colors


@app.command("heatmap")
def heatmap_command(
    results: Annotated[
        Path, typer.Argument(help="A predict results folder, or one slide folder in it.")
    ],
    alpha: Annotated[float, typer.Option("--alpha", help="Colour opacity over tissue.")] = 0.4,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes", help="Comma-separated classes to paint (default all).", show_default=False
        ),
    ] = None,
    color: Annotated[
        list[str] | None,
        typer.Option(
            "--color", help="Class colour, NAME=#rrggbb (repeatable).", show_default=False
        ),
    ] = None,
    percentile: Annotated[
        float | None,
        typer.Option(
            "--percentile",
            help="Scale probability maps to this percentile inside "
            "tissue (e.g. 99) instead of 0-1.",
            show_default=False,
        ),
    ] = None,
    cmap: Annotated[str, typer.Option("--cmap", help="Matplotlib colour map.")] = "inferno",
    grade_downsample: Annotated[
        float, typer.Option("--grade-downsample", help="Level-0 px per grade-map pixel.")
    ] = 64.0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write to OUT/<slide>/ instead of the slide folders.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Redraw maps from saved scores (scores.npz) and rebuild report.html; no model needed."""
    from histoduo.results.maps import HeatmapStyle
    from histoduo.results.redraw import redraw

    try:
        style = HeatmapStyle(
            alpha=alpha,
            classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
            colors=_parse_colors(color or []),
            percentile=percentile,
            cmap=cmap,
            grade_map_downsample=grade_downsample,
        )
        folders = redraw(results, style, out)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(
        f"redrew maps for {len(folders)} slide(s) and {(out or folders[0].parent) / 'report.html'}"
    )
