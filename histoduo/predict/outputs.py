"""What prediction writes: per-slide files, the ``done`` marker and the run's slides.csv.

Every file goes through :mod:`histoduo.run.files` (atomic, modes follow the umask).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.geojson import polygon_feature
from histoduo.grading import SlideGrade
from histoduo.run.files import atomic_write_text
from histoduo.scores import SCORES_FILE, SlideScores
from histoduo.tissue import TissueMask

DONE_MARKER = "done"
SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.json"


def tiles_table_text(scores: SlideScores) -> str:
    """tiles.csv as text (columns in the conventions' order, tissue_fraction last)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["slide", "x", "y", "width", "height", "mpp"]
        + [f"prob_{c}" for c in scores.class_names]
        + ["pred", "tissue_fraction"]
    )
    size = scores.tile_size_level0
    pred = scores.pred
    for i, (x, y) in enumerate(scores.coords):
        writer.writerow(
            [scores.slide, int(x), int(y), size, size, f"{scores.target_mpp:.6g}"]
            + [f"{p:.5f}" for p in scores.probs[i]]
            + [scores.class_names[pred[i]], f"{scores.tissue_fraction[i]:.4f}"]
        )
    return buffer.getvalue()


def tile_features(scores: SlideScores) -> list[dict[str, Any]]:
    """QuPath tile objects: level-0 squares classified by their most probable class."""
    size = float(scores.tile_size_level0)
    features = []
    colors = [tuple(int(v) for v in c) for c in scores.class_colors]
    for (x, y), p, k in zip(scores.coords, scores.probs, scores.pred):
        square = np.array([[x, y], [x + size, y], [x + size, y + size], [x, y + size]], float)
        features.append(
            polygon_feature(
                [(square, [])],
                class_name=scores.class_names[k],
                color=colors[k],
                object_type="tile",
                measurements={f"prob_{c}": float(v) for c, v in zip(scores.class_names, p)},
            )
        )
    return features


def write_slide_outputs(
    slide_dir: Path,
    scores: SlideScores,
    grade: SlideGrade,
    summary: dict[str, Any],
    heatmap: bool,
) -> None:
    """Every per-slide file, atomically, then the ``done`` marker last."""
    from histoduo.geojson import write_feature_collection
    from histoduo.tissue import tissue_features

    slide_dir.mkdir(parents=True, exist_ok=True)
    scores.save(slide_dir / SCORES_FILE)
    atomic_write_text(slide_dir / "tiles.csv", tiles_table_text(scores))
    write_feature_collection(slide_dir / "tiles.geojson", tile_features(scores))
    mask = TissueMask(
        scores.tissue_mask, scores.mask_downsample, scores.thumbnail, scores.slide_mpp
    )
    write_feature_collection(slide_dir / "tissue.geojson", tissue_features(mask))
    if heatmap:
        from histoduo.heatmap import HeatmapStyle, render_slide_maps

        render_slide_maps(scores, slide_dir, HeatmapStyle())
    summary = {**summary, "grade": grade.to_dict()}
    atomic_write_text(slide_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    atomic_write_text(slide_dir / DONE_MARKER, json.dumps({"finished": time.time()}))


@dataclass
class SlideOutcome:
    slide: str
    path: str
    status: str  # done | skipped | no_tissue | error
    n_tiles: int = 0
    call: str = ""
    confidence: float | None = None
    seconds: float = 0.0
    tiles_per_s: float | None = None
    error: str = ""


@dataclass
class PredictReport:
    out_dir: str
    outcomes: list[SlideOutcome]
    manifest_path: str
    slides_csv: str

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status in ("error", "no_tissue")]


def is_done(slide_dir: Path) -> bool:
    return (slide_dir / DONE_MARKER).exists()


def skipped_outcome(slide_dir: Path, name: str, path: str) -> SlideOutcome:
    try:
        summary = json.loads((slide_dir / SUMMARY_FILE).read_text())
        grade = summary.get("grade", {})
        return SlideOutcome(
            name,
            path,
            "skipped",
            n_tiles=int(summary.get("n_tiles", 0)),
            call=grade.get("call", ""),
            confidence=grade.get("confidence"),
        )
    except (OSError, ValueError):
        return SlideOutcome(name, path, "skipped")


SLIDES_CSV_BASE = [
    "slide",
    "path",
    "status",
    "tiles",
    "tissue_area_mm2",
    "call",
    "confidence",
    "tumour_fraction",
    "necrosis_fraction",
    "normal_fraction",
]


def write_slides_csv(out_dir: Path) -> Path:
    """Rebuild OUT/slides.csv from every slide folder (finished or failed), atomically."""
    rows: list[dict[str, Any]] = []
    class_columns: list[str] = []
    for slide_dir in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        if is_done(slide_dir) and (slide_dir / SUMMARY_FILE).exists():
            summary = json.loads((slide_dir / SUMMARY_FILE).read_text())
            grade = summary.get("grade", {})
            row: dict[str, Any] = {
                "slide": summary.get("slide", slide_dir.name),
                "path": summary.get("path", ""),
                "status": "done",
                "tiles": summary.get("n_tiles", 0),
                "tissue_area_mm2": summary.get("tissue_area_mm2"),
                "call": grade.get("call", ""),
                "confidence": grade.get("confidence"),
                "tumour_fraction": grade.get("tumour_fraction"),
                "necrosis_fraction": grade.get("necrosis_fraction"),
                "normal_fraction": grade.get("normal_fraction"),
            }
            for cls, value in grade.get("class_fractions", {}).items():
                column = f"fraction_{cls}"
                row[column] = value
                if column not in class_columns:
                    class_columns.append(column)
            rows.append(row)
        elif (slide_dir / ERROR_FILE).exists():
            error = json.loads((slide_dir / ERROR_FILE).read_text())
            rows.append(
                {
                    "slide": error.get("slide", slide_dir.name),
                    "path": error.get("path", ""),
                    "status": error.get("status", "error"),
                    "tiles": 0,
                    "error": error.get("error", ""),
                }
            )
    fields = SLIDES_CSV_BASE + class_columns + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path = out_dir / "slides.csv"
    atomic_write_text(path, buffer.getvalue())
    return path
