"""The ``tissue`` run: detect tissue on each slide and write its mask, overlay and GeoJSON.

Slides come from the same sources as ``tile`` (files, folders, globs, slide CSVs, shards) and
go through the shared per-slide loop (:func:`histoduo.runtime.slides.run_slides`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.slides import FAILED_STATUSES, run_slides
from histoduo.slide import SlideError, open_slide
from histoduo.slide.geojson import check_annotations
from histoduo.slide.sources import SlideSource
from histoduo.tissue import TissueParams, detect_tissue, require_tissue, save_tissue_outputs


@dataclass
class TissueResult:
    """One slide of a tissue run."""

    slide: str
    path: str
    status: str  # done | no_tissue | error
    tissue_area_mm2: float | None = None
    mask_shape_hw: tuple[int, int] | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class TissueReport:
    results: list[TissueResult] = field(default_factory=list)
    first_error: HistoduoError | None = None  # the error that stopped the run, if any

    @property
    def failed(self) -> list[TissueResult]:
        return [r for r in self.results if r.status in FAILED_STATUSES]


def tissue_slides(
    sources: Sequence[SlideSource],
    out_dir: str | Path,
    params: TissueParams,
    *,
    backend: str = "auto",
    roi: Any = None,
    roi_path: str | Path | None = None,
    roi_mode: str = "intersect",
    skip_errors: bool = False,
) -> TissueReport:
    """Detect tissue on every slide; without ``skip_errors`` stop at the first failure.

    Any failure of one slide (not only a SlideError) is that slide's error, so a batch never
    dies with a traceback half-way.
    """
    import time

    from histoduo.slide import BACKENDS
    from histoduo.tissue.detect import ROI_MODES

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if roi_mode not in ROI_MODES:
        raise ValueError(f"ROI mode must be one of {', '.join(ROI_MODES)}, not {roi_mode!r}")
    out = Path(out_dir)
    report = TissueReport()

    def process(source: SlideSource) -> None:
        started = time.perf_counter()
        try:
            with open_slide(source.path, backend=backend, mpp_override=source.mpp) as slide:
                if roi is not None:  # a self-crossing ROI, or one off the slide: say so
                    check_annotations(list(roi), roi_path or "ROI", slide.dimensions)
                mask = detect_tissue(slide, params, roi=roi, roi_mode=roi_mode)
                require_tissue(mask, source.path)
                save_tissue_outputs(mask, out, slide.name)
        except SlideError:
            raise
        except ValueError as exc:  # messages that name their file (the ROI GeoJSON)
            raise SlideError(source.path, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - every failure is reported per slide
            raise SlideError(source.path, f"{type(exc).__name__}: {exc}") from exc
        report.results.append(
            TissueResult(
                source.name,
                str(source.path),
                "done",
                tissue_area_mm2=mask.area_mm2(),
                mask_shape_hw=(int(mask.shape[0]), int(mask.shape[1])),
                seconds=time.perf_counter() - started,
            )
        )

    def failed(source: SlideSource, exc: HistoduoError, status: str, seconds: float) -> None:
        report.results.append(
            TissueResult(source.name, str(source.path), status, seconds=seconds, error=str(exc))
        )

    report.first_error = run_slides(
        sources, process=process, failed=failed, skip_errors=skip_errors, errors=(SlideError,)
    )
    return report
