"""Whole-slide prediction: slide -> tissue -> tiles -> model -> per-tile scores, maps, reports.

Modules: :mod:`~histoduo.predict.params` (PredictParams, device, tiling from the checkpoint),
:mod:`~histoduo.predict.engine` (tile datasets, TilePredictor), :mod:`~histoduo.predict.scoring`
(slide -> SlideScores, grading), :mod:`~histoduo.predict.outputs` (files), and
:mod:`~histoduo.predict.run` (:func:`predict_run`, the resumable per-slide run).

Per slide ``OUT/<slide>/`` (every file written atomically, ``done`` written last)::

    tiles.csv        one row per tile: slide, x, y, width, height (level 0), mpp,
                     prob_<class>..., pred, tissue_fraction
    scores.npz       the raw score grid: probs, coords, tile size, thumbnail, tissue mask,
                     class names and colours (enough to redraw every picture without the model)
    tiles.geojson    QuPath tiles (objectType "tile", class, probabilities as measurements)
    tissue.geojson   tissue outlines as QuPath annotations
    summary.json     the slide-level call (grading.py) and everything behind it
    *.png            with heatmaps: see heatmap.py

Run level ``OUT/``: ``slides.csv`` (rebuilt from every finished slide folder, so shards and
reruns accumulate) and ``manifest.json`` (``manifest.shard-K-of-N.json`` for a shard).
"""

from histoduo.predict.engine import SlideTiles, StoreTiles, TilePredictor
from histoduo.predict.outputs import (
    DONE_MARKER,
    ERROR_FILE,
    SLIDES_CSV_BASE,
    SUMMARY_FILE,
    PredictReport,
    SlideOutcome,
    is_done,
    tile_features,
    tiles_table_text,
    write_slide_outputs,
    write_slides_csv,
)
from histoduo.predict.params import (
    DEVICES,
    PRECISIONS,
    THUMBNAIL_MAX_PX,
    PredictParams,
    default_workers,
    resolve_device,
    tiling_for,
)
from histoduo.predict.run import predict_run
from histoduo.predict.scoring import grade_scores
from histoduo.scores import SCORES_FILE, SlideScores

_tiling_for = tiling_for  # the name benchmarks/bench_predict.py uses

__all__ = [
    "DEVICES",
    "DONE_MARKER",
    "ERROR_FILE",
    "PRECISIONS",
    "SCORES_FILE",
    "SLIDES_CSV_BASE",
    "SUMMARY_FILE",
    "THUMBNAIL_MAX_PX",
    "PredictParams",
    "PredictReport",
    "SlideOutcome",
    "SlideScores",
    "SlideTiles",
    "StoreTiles",
    "TilePredictor",
    "default_workers",
    "grade_scores",
    "is_done",
    "predict_run",
    "resolve_device",
    "tile_features",
    "tiles_table_text",
    "tiling_for",
    "write_slide_outputs",
    "write_slides_csv",
]
