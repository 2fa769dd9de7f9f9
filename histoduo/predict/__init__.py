"""Whole-slide prediction: slide -> tissue -> tiles -> model -> per-tile scores, maps, reports.

Modules: :mod:`~histoduo.predict.params` (PredictParams, device, tiling from the checkpoint),
:mod:`~histoduo.predict.engine` (tile datasets, TilePredictor), :mod:`~histoduo.predict.scoring`
(slide -> SlideScores, grading), :mod:`~histoduo.predict.outputs` (files), and
:mod:`~histoduo.predict.run` (:func:`predict_run`, the resumable per-slide run).

Per slide ``OUT/<slide>/`` (every file written atomically, ``done`` written last)::

    tiles.csv        one row per tile (histoduo.results.tables; columns in docs/prediction.md)
    scores.npz       the raw score grid: probs, coords, tile size, thumbnail, tissue mask,
                     class names and colours (enough to redraw every picture without the model)
    tiles.geojson    QuPath tiles (objectType "tile", class, probabilities as measurements)
    tissue.geojson   tissue outlines as QuPath annotations
    summary.json     the slide-level call (grading.py) and everything behind it
    *.png            thumbnail.png always; the maps with heatmaps (the default): heatmap.py

Run level ``OUT/``: ``slides.csv`` (rebuilt from every finished slide folder, so shards and
reruns accumulate), ``report.html`` (histoduo.results.report, rebuilt the same way) and
``manifest.json`` (``manifest.shard-K-of-N.json`` for a shard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoduo.runtime.lazy import lazy_exports

# Names import their module on first use, so ``histoduo.predict.params`` needs no torch.
_EXPORTS = {
    "THUMBNAIL_MAX_PX": "params",
    "PredictParams": "params",
    "PredictReport": "outputs",
    "SlideOutcome": "outputs",
    "SlideTiles": "engine",
    "StoreTiles": "engine",
    "TilePredictor": "engine",
    "grade_scores": "scoring",
    "predict_run": "run",
    "tile_features": "outputs",
    "tiling_for": "params",
    "write_slide_outputs": "outputs",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "PredictParams",
    "PredictReport",
    "SlideOutcome",
    "SlideTiles",
    "StoreTiles",
    "THUMBNAIL_MAX_PX",
    "TilePredictor",
    "grade_scores",
    "predict_run",
    "tile_features",
    "tiling_for",
    "write_slide_outputs",
]

if TYPE_CHECKING:
    from histoduo.predict.engine import SlideTiles, StoreTiles, TilePredictor
    from histoduo.predict.outputs import (
        PredictReport,
        SlideOutcome,
        tile_features,
        write_slide_outputs,
    )
    from histoduo.predict.params import THUMBNAIL_MAX_PX, PredictParams, tiling_for
    from histoduo.predict.run import predict_run
    from histoduo.predict.scoring import grade_scores
