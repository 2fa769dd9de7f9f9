"""``histoduo qc``: artefact QC on its own (masks, overlays, QuPath GeoJSON, burdens CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import Backend, Shard, SkipErrors, SlideInputs, SlideMpp, TargetMpp


@app.command("qc")
def qc_command(
    slides: SlideInputs,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder for masks, overlays, GeoJSON and CSV."),
    ],
    mpp: TargetMpp = None,
    tile_size: Annotated[
        int, typer.Option("--tile-size", help="Side (px at --mpp) of the tiles blur is judged on.")
    ] = 256,
    mask_mpp: Annotated[
        float, typer.Option("--mask-mpp", help="Resolution of the tissue mask (um/px).")
    ] = 4.0,
    backend: Backend = "auto",
    slide_mpp: SlideMpp = None,
    shard: Shard = None,
    skip_errors: SkipErrors = False,
) -> None:
    """Find pen ink, out-of-focus blur and folds; write <name>_qc_mask.png,
    <name>_qc_overlay.png, <name>_qc.geojson and qc_burdens.csv (docs/qc.md)."""
    from rich.console import Console

    from histoduo.cli.slides import _sources
    from histoduo.qc import QCParams
    from histoduo.qc.run import qc_slides
    from histoduo.results.figures import map_figure_png
    from histoduo.slide import BACKENDS
    from histoduo.tissue import TissueParams

    if backend not in BACKENDS:
        raise fail(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    target_mpp = 0.5 if mpp is None else mpp
    if target_mpp <= 0 or mask_mpp <= 0 or tile_size < 16:
        raise fail("--mpp and --mask-mpp must be positive and --tile-size at least 16")

    def figure(image: Any, um_per_px: float, title: str, legend: Any) -> bytes:
        return map_figure_png(
            image, um_per_px, title, legend=legend, legend_title="artefact (share of tissue)"
        )

    report = qc_slides(
        _sources(slides, slide_mpp, shard),
        out,
        tissue=TissueParams(mask_mpp=mask_mpp),
        params=QCParams(),
        target_mpp=target_mpp,
        tile_size_px=tile_size,
        backend=backend,
        skip_errors=skip_errors,
        figure=figure,
    )
    console = Console()
    console.print(_table(report))
    console.print(f"burdens: {report.csv_path}")
    if report.first_error is not None:
        raise fail(str(report.first_error))
    for result in report.failed:
        console.print(f"[yellow]skipped:[/] {result.error}", highlight=False)


def _table(report: Any) -> Any:
    from rich.table import Table

    table = Table(title="Artefact QC (share of the tissue)")
    for column in ("slide", "tissue mm^2", "pen", "blur", "fold", "any flagged", "status"):
        table.add_column(column)
    for r in report.results:
        if r.status != "done":
            table.add_row(r.slide, "-", "-", "-", "-", "-", r.status)
            continue
        area = f"{r.tissue_area_mm2:.2f}" if r.tissue_area_mm2 is not None else "-"
        b = r.burdens
        table.add_row(r.slide, area, *(f"{b[k]:.1%}" for k in ("pen", "blur", "fold", "any")), "ok")
    return table
