"""Per-slide scores: slide (or store) -> tissue -> tiles -> model -> :class:`SlideScores`.

Tiling follows the checkpoint (its mpp and tile size), so a checkpoint alone decides how a
slide is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from histoduo.grading import GradeParams, SlideGrade, grade_slide
from histoduo.predict.engine import SlideTiles, StoreTiles, TilePredictor
from histoduo.predict.params import PredictParams
from histoduo.results.scores import SlideScores
from histoduo.slide import open_slide
from histoduo.slide.geojson import class_color
from histoduo.slide.sources import SlideSource
from histoduo.tissue import TissueMask, detect_tissue, require_tissue

if TYPE_CHECKING:
    from histoduo.models.checkpoint import CheckpointMeta
    from histoduo.store import TileStore
    from histoduo.tiling import TilingParams


def class_colors(names: Sequence[str]) -> np.ndarray:
    return np.array([class_color(n) for n in names], dtype=np.uint8).reshape(-1, 3)


def display_list(meta: CheckpointMeta) -> list[str]:
    """The checkpoint's display names in class order (defaults for unnamed classes)."""
    from histoduo.results.display import display_names

    return list(display_names(meta.class_names, meta.class_display_names).values())


@dataclass
class SlidePlan:
    """Everything decided about a slide before its tiles are read (made ahead, prefetch.py)."""

    geometry: Any
    mask: TissueMask
    coords: np.ndarray
    fractions: np.ndarray
    thumbnail: np.ndarray
    thumb_ds: float
    level0_width: int
    level0_height: int


def plan_slide(source: SlideSource, params: PredictParams, tiling: TilingParams) -> SlidePlan:
    """Open the slide, find its tissue, plan its tiles, read its thumbnail; closes it."""
    from histoduo.tiling.geometry import TileGeometry, plan_tiles, require_tiles

    with open_slide(source.path, params.backend, source.mpp) as slide:
        geometry = TileGeometry.for_slide(slide, tiling)  # fails clearly without mpp
        mask = require_tissue(detect_tissue(slide, tiling.tissue), source.path)
        width0, height0 = slide.dimensions
        coords, fractions = plan_tiles(mask, geometry, width0, height0, tiling.min_tissue_fraction)
        hint = " (try a lower --min-tissue)"
        require_tiles(coords, source.path, tiling.min_tissue_fraction, hint)
        thumb_ds = max(1.0, max(width0, height0) / params.thumbnail_max_px)
        if thumb_ds >= mask.downsample:
            thumbnail, thumb_ds = mask.thumbnail, mask.downsample
        else:
            thumbnail = slide.read_downsampled(thumb_ds)
    return SlidePlan(
        geometry=geometry,
        mask=mask,
        coords=coords,
        fractions=fractions,
        thumbnail=thumbnail,
        thumb_ds=thumb_ds,
        level0_width=width0,
        level0_height=height0,
    )


def scores_from_slide(
    source: SlideSource,
    predictor: TilePredictor,
    params: PredictParams,
    tiling: TilingParams,
    workers: int,
    plan: SlidePlan | None = None,
) -> SlideScores:
    p = plan or plan_slide(source, params, tiling)
    geometry, mask, coords, fractions = p.geometry, p.mask, p.coords, p.fractions
    thumbnail, thumb_ds, width0, height0 = p.thumbnail, p.thumb_ds, p.level0_width, p.level0_height
    # The slide is closed before workers start: they open it themselves.
    tiles = SlideTiles(
        slide_path=str(source.path),
        backend=params.backend,
        mpp_override=source.mpp,
        coords=coords,
        size_level0=geometry.tile_size_level0,
        tile_size_px=tiling.tile_size_px,
        batch_size=predictor.batch_size,
        transform=predictor.transform,
    )
    probs = predictor.run(tiles, workers)
    return SlideScores(
        slide=source.name,
        probs=probs,
        coords=coords,
        tissue_fraction=fractions,
        tile_size_level0=geometry.tile_size_level0,
        stride_level0=geometry.stride_level0,
        **_class_fields(predictor.meta),
        thumbnail=thumbnail,
        thumbnail_downsample=float(thumb_ds),
        tissue_mask=mask.mask,
        mask_downsample=mask.downsample,
        level0_width=width0,
        level0_height=height0,
        slide_mpp=geometry.slide_mpp,
        target_mpp=tiling.target_mpp,
        tile_size_px=tiling.tile_size_px,
    )


def _class_fields(meta: CheckpointMeta) -> dict[str, Any]:
    """The class vocabulary a SlideScores carries, from the checkpoint."""
    names = list(meta.class_names)
    return {
        "class_names": names,
        "class_colors": class_colors(names),
        "class_display_names": display_list(meta),
        "grade_classes": list(meta.roles.grades),
    }


def scores_from_store(
    store: TileStore, slide: str, predictor: TilePredictor, workers: int
) -> SlideScores:
    record = store.record(slide)
    thumbnail, thumb_ds = store.thumbnail(slide)
    mask, mask_ds = store.tissue_mask(slide)
    n = store.num_tiles(slide)
    tiles = StoreTiles(str(store.path), slide, n, predictor.batch_size, predictor.transform)
    probs = predictor.run(tiles, workers)
    return SlideScores(
        slide=slide,
        probs=probs,
        coords=store.coords(slide).astype(np.int64),
        tissue_fraction=store.tissue_fraction(slide).astype(np.float32),
        tile_size_level0=record.tile_size_level0,
        stride_level0=record.stride_level0,
        **_class_fields(predictor.meta),
        thumbnail=thumbnail,
        thumbnail_downsample=thumb_ds,
        tissue_mask=mask,
        mask_downsample=mask_ds,
        level0_width=record.level0_width,
        level0_height=record.level0_height,
        slide_mpp=record.slide_mpp,
        target_mpp=record.target_mpp,
        tile_size_px=record.tile_size_px,
    )


def grade_scores(scores: SlideScores, meta: CheckpointMeta, params: GradeParams) -> SlideGrade:
    """The slide call (grading.py) with its uncertainty flag."""
    from histoduo.grading import Resolution, assess_uncertainty

    per_area = (scores.tile_size_level0 / max(scores.stride_level0, 1)) ** 2
    grade = grade_slide(
        scores.probs,
        scores.class_names,
        meta.roles,
        params,
        weights=scores.tissue_fraction,
        tiles_per_area=per_area,
    )
    resolution = Resolution(scores.slide_mpp, scores.target_mpp, meta.target_mpp)
    return assess_uncertainty(grade, params.uncertainty, resolution)


def tissue_area_mm2(scores: SlideScores) -> float:
    return float(scores.tissue_mask.sum()) * (scores.mask_downsample * scores.slide_mpp) ** 2 / 1e6
