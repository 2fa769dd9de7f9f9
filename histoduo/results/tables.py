"""The two result tables, ``tiles.csv`` and ``slides.csv``: every column names its unit and frame.

docs/prediction.md documents every column (a test compares that table with real headers).
Frames: ``*_level0_px`` are pixels of the slide's full-resolution level; ``tile_*`` describe
the tile as the model saw it (``tile_mpp`` µm/px, ``tile_size_px`` px at that resolution);
``*_um`` / ``*_mm2`` are physical lengths / areas; fractions are 0-1.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoduo.results.display import default_display_name, display_names
from histoduo.results.layout import (
    ERROR_FILE,
    SLIDES_CSV,
    SUMMARY_FILE,
    SlideSummary,
    is_done,
)
from histoduo.runtime.files import atomic_write_text

if TYPE_CHECKING:
    from histoduo.results.scores import SlideScores


def tiles_columns(class_names: list[str]) -> list[str]:
    return (
        ["slide", "x_level0_px", "y_level0_px", "width_level0_px", "height_level0_px"]
        + ["tile_size_px", "tile_mpp", "tile_width_um"]
        + [f"prob_{c}" for c in class_names]
        + ["pred", "pred_display_name", "tissue_fraction"]
    )


def tiles_table_text(scores: SlideScores) -> str:
    """tiles.csv as text, one row per tile."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(tiles_columns(scores.class_names))
    size0 = scores.tile_size_level0
    # The tissue a tile covers: its level-0 footprint at the slide's own resolution.
    width_um = f"{size0 * scores.slide_mpp:.4g}"
    mpp = f"{scores.target_mpp:.6g}"
    shown = scores.display_names
    pred = scores.pred
    for i, (x, y) in enumerate(scores.coords):
        k = int(pred[i])
        writer.writerow(
            [scores.slide, int(x), int(y), size0, size0, scores.tile_size_px, mpp, width_um]
            + [f"{p:.5f}" for p in scores.probs[i]]
            + [scores.class_names[k], shown[k], f"{scores.tissue_fraction[i]:.4f}"]
        )
    return buffer.getvalue()


@dataclass
class SlideResult:
    """One slide folder of a run: a finished slide's summary or a failed slide's error."""

    folder: Path
    summary: SlideSummary | None = None
    error: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        if self.summary is not None:
            return self.summary.slide
        return str((self.error or {}).get("slide", self.folder.name))

    @property
    def grade(self) -> dict[str, Any]:
        return self.summary.grade if self.summary is not None else {}

    @property
    def display(self) -> dict[str, str]:
        """{class id: display name}, the no-tumour call included."""
        given = self.summary.class_display_names if self.summary is not None else {}
        names = display_names(list(self.grade.get("class_fractions", {})), given)
        call = self.grade.get("call", "")
        if call and call not in names:
            names[call] = default_display_name(call)
        return names


def collect_slides(out_dir: Path) -> list[SlideResult]:
    """Every slide folder of a run, finished (``done`` + summary) or failed, by name."""
    records = []
    for folder in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        if is_done(folder) and (folder / SUMMARY_FILE).exists():
            records.append(SlideResult(folder, summary=SlideSummary.read(folder)))
        elif (folder / ERROR_FILE).exists():
            records.append(SlideResult(folder, error=json.loads((folder / ERROR_FILE).read_text())))
    return records


SLIDES_COLUMNS_HEAD = [
    "slide",
    "path",
    "status",
    "tiles",
    "tissue_area_mm2",
    "call",
    "call_display_name",
    "confidence",
    "uncertain",
    "uncertainty_codes",
    "uncertainty_reason",
    "tumour_fraction",
]
SLIDES_COLUMNS_TAIL = ["slide_mpp", "tile_mpp", "model_mpp", "error"]


def slides_columns(class_names: list[str], grade_names: list[str]) -> list[str]:
    return (
        SLIDES_COLUMNS_HEAD
        + [f"fraction_{c}" for c in class_names]
        + [f"grade_fraction_{g}" for g in grade_names]
        + SLIDES_COLUMNS_TAIL
    )


def _slide_row(record: SlideResult) -> dict[str, Any]:
    if record.summary is None:
        error = record.error or {}
        return {
            "slide": record.name,
            "path": error.get("path", ""),
            "status": error.get("status", "error"),
            "tiles": 0,
            "error": error.get("error", ""),
        }
    summary, grade = record.summary, record.grade
    call = grade.get("call", "")
    row: dict[str, Any] = {
        "slide": record.name,
        "path": summary.path,
        "status": "done",
        "tiles": summary.n_tiles,
        "tissue_area_mm2": summary.tissue_area_mm2,
        "call": call,
        "call_display_name": record.display.get(call, call),
        "confidence": grade.get("confidence"),
        "uncertain": grade.get("uncertain"),
        "uncertainty_codes": ";".join(u["code"] for u in grade.get("uncertainty", [])),
        "uncertainty_reason": "; ".join(u["text"] for u in grade.get("uncertainty", [])),
        "tumour_fraction": grade.get("tumour_fraction"),
        "slide_mpp": summary.slide_mpp,
        "tile_mpp": summary.target_mpp,
        "model_mpp": summary.model_mpp,
    }
    for cls, value in grade.get("class_fractions", {}).items():
        row[f"fraction_{cls}"] = value
    for cls, value in grade.get("grade_fractions", {}).items():
        row[f"grade_fraction_{cls}"] = value
    return row


def write_slides_csv(out_dir: Path) -> Path:
    """Rebuild OUT/slides.csv from every slide folder (finished or failed), atomically."""
    records = collect_slides(out_dir)
    class_names: list[str] = []
    grade_names: list[str] = []
    for record in records:
        for cls in record.grade.get("class_fractions", {}):
            if cls not in class_names:
                class_names.append(cls)
        for cls in record.grade.get("grade_fractions", {}):
            if cls not in grade_names:
                grade_names.append(cls)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        fieldnames=slides_columns(class_names, grade_names),
        lineterminator="\n",
        restval="",
    )
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if v is None else v) for k, v in _slide_row(record).items()})
    path = Path(out_dir) / SLIDES_CSV
    atomic_write_text(path, buffer.getvalue())
    return path
