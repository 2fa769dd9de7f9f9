"""``histoduo tissue``: detect tissue on slides and write mask, overlay and QuPath GeoJSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail


@app.command("tissue")
def tissue_command(
    slides: Annotated[
        list[Path],
        typer.Argument(help="Slide files, folders or glob patterns.", show_default=False),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder for masks, overlays and GeoJSON.")
    ],
    backend: Annotated[
        str, typer.Option(help="Slide reader: auto, openslide or tiffslide.")
    ] = "auto",
    slide_mpp: Annotated[
        float | None,
        typer.Option(help="Override the slide's level-0 resolution (um/px), e.g. 0.25."),
    ] = None,
    mask_mpp: Annotated[
        float, typer.Option(help="Resolution the mask is computed at (um/px).")
    ] = 4.0,
    min_object_area_um2: Annotated[
        float, typer.Option(help="Drop tissue pieces smaller than this (um^2).")
    ] = 5000.0,
    exclude_pen: Annotated[
        bool, typer.Option("--exclude-pen/--no-exclude-pen", help="Remove marker-pen ink.")
    ] = False,
    roi: Annotated[
        Path | None,
        typer.Option(help="QuPath GeoJSON with regions (level-0 px) to restrict tissue to."),
    ] = None,
    roi_mode: Annotated[
        str, typer.Option(help="intersect: ROI AND detected tissue; replace: the ROI only.")
    ] = "intersect",
    skip_errors: Annotated[
        bool, typer.Option(help="Report failing slides and go on; exit 0.")
    ] = False,
) -> None:
    """Detect tissue; write <name>_mask.png, <name>_overlay.png and <name>_tissue.geojson."""
    from rich.console import Console
    from rich.table import Table

    from histoduo.geojson import check_annotations, read_annotations
    from histoduo.slide import BACKENDS, SlideError, find_slides, open_slide
    from histoduo.tissue import (
        ROI_MODES,
        TissueParams,
        detect_tissue,
        require_tissue,
        save_tissue_outputs,
    )

    if backend not in BACKENDS:
        raise fail(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if roi_mode not in ROI_MODES:
        raise fail(f"--roi-mode must be one of {', '.join(ROI_MODES)}, not {roi_mode!r}")
    if mask_mpp <= 0:
        raise fail(f"--mask-mpp must be positive, got {mask_mpp}")
    if min_object_area_um2 < 0:
        raise fail(f"--min-object-area-um2 must be >= 0, got {min_object_area_um2}")
    roi_annotations = None
    if roi is not None:
        try:
            roi_annotations = read_annotations(roi)
        except ValueError as exc:
            raise fail(str(exc)) from exc
    params = TissueParams(
        mask_mpp=mask_mpp, min_object_area_um2=min_object_area_um2, exclude_pen=exclude_pen
    )
    paths = find_slides([str(p) for p in slides])
    if not paths:
        raise fail(f"no slides found in {', '.join(str(s) for s in slides)}")

    console = Console()
    table = Table(title="Tissue detection")
    for column in ("slide", "tissue mm^2", "mask (w x h)", "time s", "status"):
        table.add_column(column)
    errors: list[str] = []
    for path in paths:
        start = time.perf_counter()
        try:
            with open_slide(path, backend=backend, mpp_override=slide_mpp) as slide:
                if roi is not None and roi_annotations is not None:
                    check_annotations(roi_annotations, roi, slide.dimensions)
                mask = detect_tissue(slide, params, roi=roi_annotations, roi_mode=roi_mode)
                require_tissue(mask, path)
                save_tissue_outputs(mask, out, slide.name)
        except Exception as exc:  # noqa: BLE001 - every failure is reported per slide
            if isinstance(exc, ValueError):  # messages that already name their file
                exc = SlideError(path, str(exc))
            elif not isinstance(exc, SlideError):
                exc = SlideError(path, f"{type(exc).__name__}: {exc}")
            errors.append(str(exc))
            status = "no tissue" if "no tissue found" in exc.reason else "error"
            table.add_row(str(path.name), "-", "-", f"{time.perf_counter() - start:.2f}", status)
            if not skip_errors:
                console.print(table)
                raise fail(str(exc)) from exc
            continue
        area = mask.area_mm2()
        table.add_row(
            slide.name,
            f"{area:.2f}" if area is not None else "-",
            f"{mask.shape[1]} x {mask.shape[0]}",
            f"{time.perf_counter() - start:.2f}",
            "ok",
        )
    console.print(table)
    for message in errors:
        console.print(f"[yellow]skipped:[/] {message}", highlight=False)
