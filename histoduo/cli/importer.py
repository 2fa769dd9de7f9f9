"""``histoduo import``: an existing patch dataset (labelled image folders) -> a tile store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import (
    LOCK_DEFAULTS,
    ClearDeadLocks,
    WaitLock,
    Workers,
    lock_params,
)


@app.command("import")
def import_command(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Image folder: one subfolder per class, FOLDER/<class>/*.png|jpg|jpeg|tif|tiff.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HDF5 tile store to write.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV image,label[,slide][,patient][,mpp] (image relative to FOLDER): lists "
            "the images to import; slide/patient ids group images so splits keep them together.",
            show_default=False,
        ),
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option(
            "--mpp",
            help="Resolution of the images in um/px (0.5 = 20x), unless the CSV has an mpp "
            "column. Required: prediction tiles slides at the training resolution.",
            show_default=False,
        ),
    ] = None,
    tile_size: Annotated[
        int | None,
        typer.Option(
            "--tile-size",
            help="Centre-crop each image to a square and resize it to this many px (default: "
            "keep the images' size; required when they differ or are not square).",
            show_default=False,
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Class names in label order, comma-separated (default: sorted class folders).",
            show_default=False,
        ),
    ] = None,
    encoding: Annotated[
        str, typer.Option("--encoding", help="Tile pixels: jpeg (small) or raw (exact).")
    ] = "jpeg",
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="JPEG quality 1-100.")] = 90,
    skip_errors: Annotated[
        bool,
        typer.Option(
            "--skip-errors",
            help="Leave out images that do not decode, list them in <out>.report.json, go on; "
            "exit with status 3 when any was left out.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing store at --out.")
    ] = False,
    workers: Workers = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No warnings or notes.")] = False,
    wait_lock: WaitLock = LOCK_DEFAULTS.wait_s,
    clear_dead_locks: ClearDeadLocks = LOCK_DEFAULTS.clear_dead,
) -> None:
    """Import a folder of labelled patch images as a tile store for training."""
    from rich.console import Console

    from histoduo.runtime.locks import LockedError
    from histoduo.runtime.pool import default_workers
    from histoduo.store import StoreError
    from histoduo.tiling.importer import ImageImportError, ImportParams, import_images

    console = Console(stderr=True)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    try:
        params = ImportParams(
            tile_size_px=tile_size,
            mpp=mpp,
            encoding=encoding,
            jpeg_quality=jpeg_quality,
            class_names=tuple(names) if names else None,
        )
        report = import_images(
            folder,
            out,
            params,
            labels_csv=labels,
            skip_errors=skip_errors,
            overwrite=overwrite,
            workers=default_workers() if workers is None else workers,
            log=None if quiet else lambda message: console.print(message, highlight=False),
            lock=lock_params(wait_lock, clear_dead_locks),
        )
    except (ImageImportError, StoreError, LockedError, ValueError) as exc:
        raise fail(str(exc)) from None
    skipped = f", {len(report.skipped)} skipped" if report.skipped else ""
    console.print(
        f"[green]done[/]: {report.n_images} images in {len(report.groups)} groups{skipped}, "
        f"{report.tile_size_px} px at {report.target_mpp:.4g} um/px, classes "
        f"{', '.join(report.class_names)} -> {out} (report {out}.report.json)",
        highlight=False,
    )
    if report.skipped:
        from histoduo.runtime.exitcodes import EXIT_SOME_FAILED

        raise typer.Exit(EXIT_SOME_FAILED)
