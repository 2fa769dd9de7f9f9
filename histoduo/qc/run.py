"""The ``qc`` run: artefact QC on its own, for labs that only want QC.

Per slide: tissue detection, pen and fold on the thumbnail, blur on a grid of tiles read at
``target_mpp``; then ``<slide>_qc_mask.png`` (FLAG_* bits per thumbnail pixel),
``<slide>_qc_overlay.png``, ``<slide>_qc.geojson`` (QuPath annotations) and, for the run,
``qc_burdens.csv``. Slides come from the same sources and go through the same per-slide loop
as ``histoduo tissue``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.qc.detect import detect_artefacts, slide_burdens, tile_blur_score, tile_qc
from histoduo.qc.outputs import (
    blur_mask_from_tiles,
    label_mask,
    legend,
    overlay_image,
    qc_features,
    write_burdens_csv,
)
from histoduo.qc.params import FLAG_BLUR, QCParams
from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.files import atomic_write_bytes
from histoduo.runtime.slides import run_slides
from histoduo.slide import Slide, SlideError, open_slide
from histoduo.slide.geojson import write_feature_collection
from histoduo.slide.sources import SlideSource
from histoduo.tissue import TissueMask, TissueParams, detect_tissue, require_tissue

BURDENS_CSV = "qc_burdens.csv"
# figure(image, um_per_px, title, legend) -> PNG bytes; the CLI passes the maps' figure
# maker (legend and scale bar), which lives in a layer above this one.
FigureMaker = Callable[[np.ndarray, float, str, list[tuple[str, tuple[int, int, int]]]], bytes]


@dataclass
class QCSlideResult:
    slide: str
    path: str
    status: str  # done | no_tissue | error
    tissue_area_mm2: float | None = None
    burdens: dict[str, float] = field(default_factory=dict)
    n_tiles: int = 0
    seconds: float = 0.0
    error: str = ""

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "slide": self.slide,
            "path": self.path,
            "status": self.status,
            "tissue_area_mm2": self.tissue_area_mm2,
            "n_tiles": self.n_tiles,
            "error": self.error,
        }
        row.update({f"qc_{k}": v for k, v in self.burdens.items()})
        return row


@dataclass
class QCReport:
    results: list[QCSlideResult] = field(default_factory=list)
    first_error: HistoduoError | None = None
    csv_path: Path | None = None

    @property
    def failed(self) -> list[QCSlideResult]:
        return [r for r in self.results if r.status in ("error", "no_tissue")]


def blur_grid(
    slide: Slide, mask: TissueMask, target_mpp: float, tile_size_px: int, min_tissue: float
) -> tuple[np.ndarray, int]:
    """Level-0 corners of the tissue tiles blur is measured on, and their level-0 side."""
    slide_mpp = slide.require_mpp()
    size0 = max(1, int(round(tile_size_px * target_mpp / slide_mpp)))
    width0, height0 = slide.dimensions
    xs = np.arange(0, max(width0 - size0, 0) + 1, size0)
    ys = np.arange(0, max(height0 - size0, 0) + 1, size0)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    keep = mask.fractions_in_boxes(grid, size0) >= min_tissue
    return grid[keep], size0


def qc_slide(
    slide: Slide,
    tissue: TissueParams,
    params: QCParams,
    *,
    target_mpp: float,
    tile_size_px: int,
    min_tissue: float = 0.25,
) -> dict[str, Any]:
    """Everything QC finds on one slide: masks, tiles, labels, burdens."""
    mask = detect_tissue(slide, tissue)
    require_tissue(mask, slide.path)
    masks = detect_artefacts(mask, params)
    coords, size0 = blur_grid(slide, mask, target_mpp, tile_size_px, min_tissue)
    blur = np.array(
        [
            tile_blur_score(
                slide.read_resized((int(x), int(y)), (size0, size0), (tile_size_px, tile_size_px)),
                params,
            )
            for x, y in coords
        ],
        dtype=np.float32,
    )
    tiles = tile_qc(masks, coords, size0, blur, params)
    weights = mask.fractions_in_boxes(coords, size0)
    blurred = (tiles.flags & FLAG_BLUR) > 0
    blur_px = blur_mask_from_tiles(mask.shape, mask.downsample, coords, size0, blurred)
    return {
        "mask": mask,
        "masks": masks,
        "coords": coords,
        "tiles": tiles,
        "labels": label_mask(masks, blur_px),
        "burdens": slide_burdens(masks, tiles, weights),
    }


def qc_slides(
    sources: Sequence[SlideSource],
    out_dir: str | Path,
    *,
    tissue: TissueParams = TissueParams(),
    params: QCParams = QCParams(),
    target_mpp: float = 0.5,
    tile_size_px: int = 256,
    backend: str = "auto",
    skip_errors: bool = False,
    figure: FigureMaker | None = None,
) -> QCReport:
    """QC every slide into ``out_dir``; without ``skip_errors`` stop at the first failure
    (the burdens CSV is written either way, for the slides done)."""
    import io

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = QCReport()

    def png(image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()

    def process(source: SlideSource) -> None:
        started = time.perf_counter()
        try:
            with open_slide(source.path, backend=backend, mpp_override=source.mpp) as slide:
                found = qc_slide(
                    slide, tissue, params, target_mpp=target_mpp, tile_size_px=tile_size_px
                )
                name, slide_mpp = slide.name, slide.require_mpp()
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is reported per slide
            raise SlideError(source.path, f"{type(exc).__name__}: {exc}") from exc
        mask: TissueMask = found["mask"]
        labels = found["labels"]
        atomic_write_bytes(out / f"{name}_qc_mask.png", png(labels))
        overlay = overlay_image(mask.thumbnail, labels)
        um = mask.downsample * slide_mpp
        title = f"{name}: artefacts found by QC"
        data = (
            png(overlay) if figure is None else figure(overlay, um, title, legend(found["burdens"]))
        )
        atomic_write_bytes(out / f"{name}_qc_overlay.png", data)
        write_feature_collection(
            out / f"{name}_qc.geojson",
            qc_features(labels, mask.downsample, mask.level0_size, slide_mpp),
        )
        report.results.append(
            QCSlideResult(
                source.name,
                str(source.path),
                "done",
                tissue_area_mm2=mask.area_mm2(),
                burdens=found["burdens"],
                n_tiles=len(found["coords"]),
                seconds=time.perf_counter() - started,
            )
        )

    def failed(source: SlideSource, exc: HistoduoError, status: str, seconds: float) -> None:
        report.results.append(
            QCSlideResult(source.name, str(source.path), status, seconds=seconds, error=str(exc))
        )

    try:
        report.first_error = run_slides(
            sources, process=process, failed=failed, skip_errors=skip_errors, errors=(SlideError,)
        )
    finally:
        report.csv_path = write_burdens_csv(out / BURDENS_CSV, [r.row() for r in report.results])
    return report
