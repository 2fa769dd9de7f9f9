"""Slide commands: ``info``, ``tile``, ``merge`` and ``synth``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import (
    LOCK_DEFAULTS,
    Backend,
    ClearDeadLocks,
    JsonOutput,
    MinTissue,
    Overwrite,
    QCMode,
    Quiet,
    Shard,
    SkipErrors,
    SlideInputs,
    SlideMpp,
    TargetMag,
    TargetMpp,
    WaitLock,
    Workers,
    lock_params,
)
from histoduo.qc.params import DEFAULT_QC_MODE, check_mode


def _console(stderr: bool = False):  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    return Console(stderr=stderr)


def _sources(slides: list[str], slide_mpp: float | None, shard: str | None):  # noqa: ANN202
    from histoduo.slide.sources import collect_sources, parse_shard, select_shard

    try:
        kn = parse_shard(shard)
        everything = collect_sources(slides, slide_mpp)
        sources = select_shard(everything, kn)
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    missing = [s for s in sources if not s.path.exists()]
    if missing and len(sources) == len(missing):
        raise fail(f"{missing[0].path}: file not found")
    if not sources and kn is not None and everything:
        # An empty shard is normal (few slides, many shards): it succeeds with nothing to do,
        # so a SLURM array's afterok still lets the merge run.
        _console(stderr=True).print(
            f"shard {kn[0]}/{kn[1]}: none of the {len(everything)} slides falls in this shard"
        )
        return []
    if not sources:
        raise fail(
            f"no slides found in {', '.join(slides)}" + (f" (shard {shard})" if shard else "")
        )
    return sources


def _shard_out(out: Path, shard: str | None, *, single_file: bool) -> Path:
    """``--out`` for this shard: ``{shard}`` filled in (and, for a store, a per-shard name
    under ``--shard auto``)."""
    from histoduo.slide.shards import shard_output, shard_store_path
    from histoduo.slide.sources import parse_shard

    try:
        kn = parse_shard(shard)
        return shard_store_path(out, shard, kn) if single_file else shard_output(out, kn)
    except ValueError as exc:
        raise fail(str(exc)) from None


@app.command("info")
def info_command(
    slides: SlideInputs,
    backend: Backend = "auto",
    slide_mpp: SlideMpp = None,
    as_json: JsonOutput = False,
) -> None:
    """Show what a slide is: vendor, reader, size, pyramid levels, mpp, magnification."""
    from histoduo.slide import SlideError, open_slide

    sources = _sources(slides, slide_mpp, None)
    infos, errors = [], []
    for source in sources:
        try:
            with open_slide(source.path, backend, source.mpp) as slide:
                infos.append(slide.info().to_dict())
        except SlideError as exc:
            errors.append(str(exc))
    if as_json:
        typer.echo(json.dumps(infos if len(sources) > 1 else (infos or [{}])[0], indent=2))
    else:
        from rich.table import Table

        for item in infos:
            table = Table(title=item["path"], show_header=False, title_justify="left")
            table.add_row("vendor", item["vendor"])
            table.add_row("backend", item["backend"])
            table.add_row("size (level 0)", f"{item['level0_width']} x {item['level0_height']} px")
            levels = ", ".join(
                f"{w}x{h} (/{ds:.4g})"
                for (w, h), ds in zip(item["level_dimensions"], item["level_downsamples"])
            )
            table.add_row("levels", levels)
            mpp = item["mpp"]
            table.add_row("mpp", f"{mpp:.4g} um/px ({item['mpp_source']})" if mpp else "unknown")
            mag = item["magnification"]
            table.add_row("magnification", f"{mag:g}x" if mag else "unknown")
            table.add_row("associated images", ", ".join(item["associated_images"]) or "-")
            _console().print(table)
    for error in errors:
        _console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
    if errors:
        raise typer.Exit(1)


@app.command("tile")
def tile_command(
    slides: SlideInputs,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HDF5 tile store to write.")],
    mpp: TargetMpp = None,
    mag: TargetMag = None,
    tile_size: Annotated[int, typer.Option("--tile-size", help="Tile size in px at target.")] = 256,
    stride: Annotated[
        int | None,
        typer.Option(
            "--stride",
            help="Step between tiles in px at target (default: tile size).",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        typer.Option(
            "--overlap",
            help="Overlap in px at target (stride = tile size - overlap).",
            show_default=False,
        ),
    ] = None,
    min_tissue: MinTissue = 0.25,
    encoding: Annotated[
        str, typer.Option("--encoding", help="Tile pixels: jpeg (small) or raw (exact).")
    ] = "jpeg",
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="JPEG quality 1-100.")] = 90,
    mask_mpp: Annotated[
        float, typer.Option("--mask-mpp", help="Resolution of the tissue mask (um/px).")
    ] = 4.0,
    exclude_pen: Annotated[
        bool, typer.Option("--exclude-pen", help="Drop pen-ink marks from the tissue mask.")
    ] = False,
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations",
            help="Folder of QuPath GeoJSON files named after the "
            "slides; tiles take the class covering --label-coverage of them.",
            show_default=False,
        ),
    ] = None,
    label_coverage: Annotated[
        float, typer.Option("--label-coverage", help="Fraction of a tile a class must cover.")
    ] = 0.5,
    labelled_only: Annotated[
        bool, typer.Option("--labelled-only", help="Keep only tiles that got a label.")
    ] = False,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Comma-separated class names in label order (a fixed vocabulary for the "
            "cohort); default: every class found in the annotations, sorted.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Coordinates only: count tiles, write no pixels.")
    ] = False,
    backend: Backend = "auto",
    slide_mpp: SlideMpp = None,
    workers: Workers = None,
    shard: Shard = None,
    overwrite: Overwrite = False,
    skip_errors: SkipErrors = False,
    quiet: Quiet = False,
    qc: QCMode = DEFAULT_QC_MODE,
    wait_lock: WaitLock = LOCK_DEFAULTS.wait_s,
    clear_dead_locks: ClearDeadLocks = LOCK_DEFAULTS.clear_dead,
) -> None:
    """Detect tissue and cut tiles into one HDF5 tile store (resumable; one writer at a time:
    the store's lock file OUT.lock names the run that holds it)."""
    from histoduo.cli._options import mpp_from_options
    from histoduo.runtime.locks import LockedError
    from histoduo.slide import SlideError
    from histoduo.store import StoreError, StoreUpgradeNeeded
    from histoduo.tiling import TilingParams, summarise, tile_slides
    from histoduo.tissue import TissueParams

    if stride is not None and overlap is not None:
        raise fail("give --stride or --overlap, not both")
    try:
        target_mpp, requested_mag = mpp_from_options(mpp, mag)
        params = TilingParams(
            target_mpp=target_mpp,
            tile_size_px=tile_size,
            stride_px=tile_size - overlap if overlap is not None else stride,
            min_tissue_fraction=min_tissue,
            encoding=encoding,
            jpeg_quality=jpeg_quality,
            tissue=TissueParams(mask_mpp=mask_mpp, exclude_pen=exclude_pen),
            requested_magnification=requested_mag,
            dry_run=dry_run,
            label_min_coverage=label_coverage,
        )
        check_mode(qc)
    except ValueError as exc:
        raise fail(str(exc)) from None
    sources = _sources(slides, slide_mpp, shard)
    out = _shard_out(out, shard, single_file=True)
    console = _console(stderr=True)
    try:
        report = tile_slides(
            sources,
            out,
            params,
            backend=backend,
            workers=workers,
            overwrite=overwrite,
            skip_errors=skip_errors,
            annotations_dir=annotations,
            labelled_only=labelled_only,
            class_names=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
            progress=not quiet,
            log=console.print,
            qc_mode=qc,
            lock=lock_params(wait_lock, clear_dead_locks),
        )
    except (StoreUpgradeNeeded, LockedError) as exc:
        raise fail(str(exc)) from None
    except (SlideError, StoreError, ValueError) as exc:
        # tile_slides has logged how many finished slides were saved (when any were).
        raise fail(str(exc)) from None
    summary = summarise(report)
    console.print(
        f"[green]{summary['tiles']:,} tiles[/] from {summary['slides']} slide(s) in {out} "
        f"({summary['tiled']} tiled, {summary['skipped']} already done, "
        f"{summary['failed']} failed); report: {out}.report.json"
    )
    for result in report.failed:
        console.print(f"[yellow]{result.status}[/] {result.path}: {result.error}")
    if report.failed:  # only with --skip-errors: without it the first failure stopped the run
        from histoduo.runtime.exitcodes import EXIT_SOME_FAILED

        raise typer.Exit(EXIT_SOME_FAILED)


@app.command("merge")
def merge_command(
    stores: Annotated[list[Path], typer.Argument(help="Tile stores to combine.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged store.")],
    link: Annotated[
        bool,
        typer.Option(
            "--link",
            help="List the input stores' slide files in the index instead of linking them "
            "into the output's folder (the inputs must then stay where they are).",
        ),
    ] = False,
    overwrite: Overwrite = False,
    wait_lock: WaitLock = LOCK_DEFAULTS.wait_s,
    clear_dead_locks: ClearDeadLocks = LOCK_DEFAULTS.clear_dead,
) -> None:
    """Combine tile stores (e.g. from --shard jobs) into one.

    Slide files are hard-linked, not copied; --out may be one of the inputs, to add the
    other stores' slides to it in place."""
    from histoduo.runtime.errors import HistoduoError
    from histoduo.store import merge_stores

    try:
        names = merge_stores(
            stores,
            out,
            link=link,
            overwrite=overwrite,
            lock=lock_params(wait_lock, clear_dead_locks),
            log=_console(stderr=True).print,
        )
    except HistoduoError as exc:
        raise fail(str(exc)) from None
    _console(stderr=True).print(f"[green]{len(names)} slides[/] in {out}")


@app.command("upgrade-store")
def upgrade_store_command(
    store: Annotated[Path, typer.Argument(help="A format-1 tile store (tiles.h5).")],
    wait_lock: WaitLock = LOCK_DEFAULTS.wait_s,
    clear_dead_locks: ClearDeadLocks = LOCK_DEFAULTS.clear_dead,
) -> None:
    """Rewrite a format-1 tile store as format 2 in place (per-slide files CLAM and TRIDENT
    read, beside it in STORE.d/); a killed upgrade leaves the old store readable. A damaged
    or lost index of a format-2 store is rebuilt from its slide files."""
    from histoduo.runtime.errors import HistoduoError
    from histoduo.store import store_folder, store_version, upgrade_store

    try:
        before = store_version(store)
        names = upgrade_store(
            store, lock=lock_params(wait_lock, clear_dead_locks), log=_console(stderr=True).print
        )
    except HistoduoError as exc:
        raise fail(str(exc)) from None
    state = "already format 2" if before == 2 else "upgraded to format 2"
    _console(stderr=True).print(
        f"[green]{store}[/]: {state}, {len(names)} slides in {store_folder(store)}/"
    )


@app.command("synth")
def synth_command(
    out: Annotated[
        Path, typer.Argument(help="Output slide (.svs or .tiff) or, with --count > 1, a folder.")
    ],
    width: Annotated[int, typer.Option("--width", help="Level-0 width in px.")] = 8192,
    height: Annotated[int, typer.Option("--height", help="Level-0 height in px.")] = 6144,
    mpp: Annotated[float, typer.Option("--mpp", help="Level-0 resolution (um/px).")] = 0.25,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same slide).")] = 0,
    count: Annotated[int, typer.Option("--count", help="Number of slides to write.")] = 1,
    fmt: Annotated[str, typer.Option("--format", help="svs (Aperio-style) or tiff.")] = "svs",
    no_mpp: Annotated[
        bool, typer.Option("--no-mpp", help="Write no resolution metadata (for testing).")
    ] = False,
    cohort: Annotated[
        int,
        typer.Option(
            "--cohort",
            help="Write N slides labelled per slide into the folder OUT: low-grade tumour, "
            "and on every other slide one or two small high-grade foci that decide its "
            "label; slides.csv (slide,label,patient) for train-mil.",
        ),
    ] = 0,
    focus_fraction: Annotated[
        float,
        typer.Option("--focus-fraction", help="With --cohort: each focus's share of tissue."),
    ] = 0.015,
) -> None:
    """Write synthetic H&E-like pyramidal slides with ground-truth GeoJSON next to them."""
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_cohort, write_synthetic_slide
    from histoduo.synthetic.cohort import write_slide_label_cohort

    try:
        spec = SyntheticSlideSpec(
            level0_width=width,
            level0_height=height,
            mpp=mpp,
            seed=seed,
            format=fmt,
            write_mpp=not no_mpp,
        )
        if cohort:
            written, labels = write_slide_label_cohort(
                out, cohort, spec, focus_fraction=focus_fraction
            )
            _console(stderr=True).print(f"slide labels: {labels}")
        elif count > 1:
            written = write_synthetic_cohort(out, count, spec)
        else:
            written = [write_synthetic_slide(out, spec)]
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    for slide in written:
        _console(stderr=True).print(f"wrote {slide.path} (truth: {slide.truth_geojson})")
