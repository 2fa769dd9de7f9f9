"""What prediction writes: per-slide files, the ``done`` marker and the run's slides.csv.

Every file goes through :mod:`histoduo.run.files` (atomic, modes follow the umask). The two
tables (tiles.csv, slides.csv: unit-named columns) live in :mod:`histoduo.tables`.
"""

from __future__ import annotations

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
from histoduo.tables import (
    DONE_MARKER,
    ERROR_FILE,
    SUMMARY_FILE,
    tiles_table_text,
    write_slides_csv,
)
from histoduo.tissue import TissueMask

__all__ = ["DONE_MARKER", "ERROR_FILE", "SUMMARY_FILE", "tiles_table_text", "write_slides_csv"]


def tile_features(scores: SlideScores) -> list[dict[str, Any]]:
    """QuPath tile objects: level-0 squares classified by their most probable class."""
    size = float(scores.tile_size_level0)
    features = []
    colors = [tuple(int(v) for v in c) for c in scores.class_colors]
    # classification.name stays the class id (QuPath keys classes by name; exported
    # corrections then read back as training labels); the display name is the object name.
    shown = scores.display_names
    for (x, y), p, k in zip(scores.coords, scores.probs, scores.pred):
        square = np.array([[x, y], [x + size, y], [x + size, y + size], [x, y + size]], float)
        features.append(
            polygon_feature(
                [(square, [])],
                class_name=scores.class_names[k],
                color=colors[k],
                object_type="tile",
                name=shown[k],
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
        scores.tissue_mask, scores.mask_downsample, scores.thumbnail, scores.slide_mpp,
        level0_size=(scores.level0_width, scores.level0_height),
    )  # fmt: skip
    write_feature_collection(slide_dir / "tissue.geojson", tissue_features(mask))
    from histoduo.heatmap import HeatmapStyle, render_slide_maps, render_thumbnail

    if heatmap:
        render_slide_maps(scores, slide_dir, HeatmapStyle())
    else:
        render_thumbnail(scores, slide_dir, HeatmapStyle())  # the report shows it
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
    uncertain: bool | None = None
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
            uncertain=grade.get("uncertain"),
        )
    except (OSError, ValueError):
        return SlideOutcome(name, path, "skipped")
