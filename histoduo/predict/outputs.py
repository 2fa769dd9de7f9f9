"""What prediction writes: per-slide files, the ``done`` marker and the run's slides.csv.

Every file goes through :mod:`histoduo.runtime.files` (atomic, modes follow the umask). The two
tables (tiles.csv, slides.csv: unit-named columns) live in :mod:`histoduo.results.tables`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.grading import SlideGrade
from histoduo.results.layout import (
    DONE_MARKER,
    SCORES_FILE,
    TILES_CSV,
    TILES_GEOJSON,
    TISSUE_GEOJSON,
    SlideSummary,
)
from histoduo.results.scores import SlideScores
from histoduo.results.tables import tiles_table_text
from histoduo.runtime.files import atomic_write_text
from histoduo.runtime.slides import FAILED_STATUSES
from histoduo.slide.geojson import polygon_feature
from histoduo.tissue import TissueMask


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
    summary: SlideSummary,
    heatmap: bool,
) -> None:
    """Every per-slide file, atomically, then the ``done`` marker last."""
    from histoduo.slide.geojson import write_feature_collection
    from histoduo.tissue import tissue_features

    slide_dir.mkdir(parents=True, exist_ok=True)
    scores.save(slide_dir / SCORES_FILE)
    atomic_write_text(slide_dir / TILES_CSV, tiles_table_text(scores))
    write_feature_collection(slide_dir / TILES_GEOJSON, tile_features(scores))
    mask = TissueMask(
        scores.tissue_mask, scores.mask_downsample, scores.thumbnail, scores.slide_mpp,
        level0_size=(scores.level0_width, scores.level0_height),
    )  # fmt: skip
    write_feature_collection(slide_dir / TISSUE_GEOJSON, tissue_features(mask))
    from histoduo.results.maps import HeatmapStyle, render_slide_maps, render_thumbnail

    if heatmap:
        render_slide_maps(scores, slide_dir, HeatmapStyle())
    else:
        render_thumbnail(scores, slide_dir, HeatmapStyle())  # the report shows it
    summary.grade = grade.to_dict()
    summary.write(slide_dir)
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
        return [o for o in self.outcomes if o.status in FAILED_STATUSES]


def skipped_outcome(slide_dir: Path, name: str, path: str) -> SlideOutcome:
    try:
        summary = SlideSummary.read(slide_dir)
        grade = summary.grade
        return SlideOutcome(
            name,
            path,
            "skipped",
            n_tiles=summary.n_tiles,
            call=grade.get("call", ""),
            confidence=grade.get("confidence"),
            uncertain=grade.get("uncertain"),
        )
    except (OSError, ValueError):
        return SlideOutcome(name, path, "skipped")
