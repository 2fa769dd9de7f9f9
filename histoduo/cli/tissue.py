"""``histoduo tissue``: detect tissue on slides and write mask, overlay and QuPath GeoJSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import Backend, Shard, SkipErrors, SlideInputs, SlideMpp
from histoduo.tissue.detect import TissueParams

TISSUE_DEFAULTS = TissueParams()  # the defaults --help shows are the library's


@app.command("tissue")
def tissue_command(
    slides: SlideInputs,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder for masks, overlays and GeoJSON.")
    ],
    backend: Backend = "auto",
    slide_mpp: SlideMpp = None,
    mask_mpp: Annotated[
        float, typer.Option(help="Resolution the mask is computed at (um/px).")
    ] = TISSUE_DEFAULTS.mask_mpp,
    min_object_area_um2: Annotated[
        float, typer.Option(help="Drop tissue pieces smaller than this (um^2).")
    ] = TISSUE_DEFAULTS.min_object_area_um2,
    exclude_pen: Annotated[
        bool, typer.Option("--exclude-pen/--no-exclude-pen", help="Remove marker-pen ink.")
    ] = TISSUE_DEFAULTS.exclude_pen,
    roi: Annotated[
        Path | None,
        typer.Option(help="QuPath GeoJSON with regions (level-0 px) to restrict tissue to."),
    ] = None,
    roi_mode: Annotated[
        str, typer.Option(help="intersect: ROI AND detected tissue; replace: the ROI only.")
    ] = "intersect",
    shard: Shard = None,
    skip_errors: SkipErrors = False,
) -> None:
    """Detect tissue; write <name>_mask.png, <name>_overlay.png and <name>_tissue.geojson."""
    from rich.console import Console

    from histoduo.cli.slides import _sources
    from histoduo.slide.geojson import read_annotations
    from histoduo.tissue.run import tissue_slides

    try:
        params = TissueParams(
            mask_mpp=mask_mpp, min_object_area_um2=min_object_area_um2, exclude_pen=exclude_pen
        )
        roi_annotations = read_annotations(roi) if roi is not None else None
        sources = _sources(slides, slide_mpp, shard)
        report = tissue_slides(
            sources,
            out,
            params,
            backend=backend,
            roi=roi_annotations,
            roi_path=roi,
            roi_mode=roi_mode,
            skip_errors=skip_errors,
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    console = Console()
    console.print(_table(report))
    if report.first_error is not None:
        raise fail(str(report.first_error))
    for result in report.failed:
        console.print(f"[yellow]skipped:[/] {result.error}", highlight=False)


def _table(report: Any) -> Any:
    from rich.table import Table

    table = Table(title="Tissue detection")
    for column in ("slide", "tissue mm^2", "mask (w x h)", "time s", "status"):
        table.add_column(column)
    for r in report.results:
        if r.status != "done":
            status = "no tissue" if r.status == "no_tissue" else "error"
            table.add_row(Path(r.path).name, "-", "-", f"{r.seconds:.2f}", status)
            continue
        area = f"{r.tissue_area_mm2:.2f}" if r.tissue_area_mm2 is not None else "-"
        shape = f"{r.mask_shape_hw[1]} x {r.mask_shape_hw[0]}" if r.mask_shape_hw else "-"
        table.add_row(r.slide, area, shape, f"{r.seconds:.2f}", "ok")
    return table
