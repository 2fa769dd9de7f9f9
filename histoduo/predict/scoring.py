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


# predict takes its tissue settings from the checkpoint: the options that can help.
NO_TISSUE_HINT = (
    "check the slide's mpp (--slide-mpp), or tile it with `histoduo tile` (--mask-mpp) and "
    "predict the store with --tiles"
)


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
    artefacts: Any = None  # qc.ArtefactMasks; None with --qc off


def plan_slide(source: SlideSource, params: PredictParams, tiling: TilingParams) -> SlidePlan:
    """Open the slide, find its tissue, plan its tiles, read its thumbnail; closes it."""
    from histoduo.tiling.geometry import TileGeometry, plan_tiles, require_tiles

    with open_slide(source.path, params.backend, source.mpp) as slide:
        geometry = TileGeometry.for_slide(slide, tiling)  # fails clearly without mpp
        mask = require_tissue(detect_tissue(slide, tiling.tissue), source.path, NO_TISSUE_HINT)
        width0, height0 = slide.dimensions
        coords, fractions = plan_tiles(mask, geometry, width0, height0, tiling.min_tissue_fraction)
        hint = " (try a lower --min-tissue)"
        require_tiles(coords, source.path, tiling.min_tissue_fraction, hint)
        thumb_ds = max(1.0, max(width0, height0) / params.thumbnail_max_px)
        if thumb_ds >= mask.downsample:
            thumbnail, thumb_ds = mask.thumbnail, mask.downsample
        else:
            thumbnail = slide.read_downsampled(thumb_ds)
    artefacts = None
    if params.qc_mode != "off":
        from histoduo.qc import detect_artefacts

        artefacts = detect_artefacts(mask, params.qc)
    return SlidePlan(
        geometry=geometry,
        mask=mask,
        coords=coords,
        fractions=fractions,
        thumbnail=thumbnail,
        thumb_ds=thumb_ds,
        level0_width=width0,
        level0_height=height0,
        artefacts=artefacts,
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
        read_level=geometry.read_level,  # the tiler's read (tiling/read.py): same as a store's
        read_size_px=geometry.read_size_px,
        tile_size_px=tiling.tile_size_px,
        batch_size=predictor.batch_size,
        transform=predictor.transform,
        qc=params.qc if p.artefacts is not None else None,
    )
    blur = np.zeros(len(coords), np.float32) if p.artefacts is not None else None
    probs = predictor.run(tiles, workers, blur_out=blur)
    scores = SlideScores(
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
    if p.artefacts is not None:
        from histoduo.qc import tile_qc

        attach_qc(scores, tile_qc(p.artefacts, coords, geometry.tile_size_level0, blur, params.qc),
                  p.artefacts, params.qc_mode)  # fmt: skip
    return scores


def attach_qc(scores: SlideScores, tiles: Any, artefacts: Any, mode: str) -> None:
    """Put per-tile QC (a qc.TileQC) and the artefact pixels on ``scores``; with
    ``exclude`` the flagged tiles are marked as left out of the grade."""
    from histoduo.qc.outputs import label_mask

    scores.qc_pen, scores.qc_blur, scores.qc_fold = tiles.pen, tiles.blur, tiles.fold
    scores.qc_flags = tiles.flags
    scores.qc_excluded = tiles.excludable if mode == "exclude" else np.zeros(len(tiles.flags), bool)
    scores.qc_labels = label_mask(artefacts, _blur_pixels(scores, tiles, artefacts))


def _blur_pixels(scores: SlideScores, tiles: Any, artefacts: Any) -> np.ndarray:
    from histoduo.qc import FLAG_BLUR
    from histoduo.qc.outputs import blur_mask_from_tiles

    blurred = (tiles.flags & FLAG_BLUR) > 0
    return blur_mask_from_tiles(
        artefacts.tissue.shape, artefacts.downsample, scores.coords,
        scores.tile_size_level0, blurred,
    )  # fmt: skip


def qc_summary(scores: SlideScores, artefacts: Any | None, mode: str) -> dict[str, Any]:
    """summary.json's ``qc``: mode, burdens (share of the tissue), tiles left out."""
    if not scores.qc_checked:
        return {}
    from histoduo.qc import TileQC, slide_burdens
    from histoduo.qc.detect import ArtefactMasks

    tiles = TileQC(scores.qc_pen, scores.qc_blur, scores.qc_fold, scores.qc_flags)
    if artefacts is None:  # from stored per-tile scores: pen and fold from the label grid
        from histoduo.qc import FLAG_FOLD, FLAG_PEN

        labels = scores.qc_labels
        artefacts = ArtefactMasks(
            tissue=scores.tissue_mask, pen=(labels & FLAG_PEN) > 0, fold=(labels & FLAG_FOLD) > 0,
            downsample=scores.mask_downsample, mask_mpp=None,
        )  # fmt: skip
    burdens = slide_burdens(artefacts, tiles, scores.tissue_fraction)
    excluded = int(scores.qc_excluded.sum()) if scores.qc_excluded is not None else 0
    return {"mode": mode, "burdens": burdens, "excluded_tiles": excluded,
            "flagged_tiles": int(tiles.flagged.sum())}  # fmt: skip


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
    store: TileStore,
    slide: str,
    predictor: TilePredictor,
    workers: int,
    params: PredictParams | None = None,
) -> SlideScores:
    record = store.record(slide)
    thumbnail, thumb_ds = store.thumbnail(slide)
    mask, mask_ds = store.tissue_mask(slide)
    n = store.num_tiles(slide)
    tiles = StoreTiles(str(store.path), slide, n, predictor.batch_size, predictor.transform)
    probs = predictor.run(tiles, workers)
    scores = SlideScores(
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
    mode = params.qc_mode if params is not None else "off"
    if mode != "off":
        _store_qc(store, slide, scores, params, mode)
    return scores


def _store_qc(store: TileStore, slide: str, scores: SlideScores, params: Any, mode: str) -> None:
    """QC of a stored slide: the tiling run's per-tile QC when it has one, else pen and folds
    from the stored thumbnail (blur needs the tiles' pixels: not measured then)."""
    from histoduo.qc import TileQC, detect_artefacts, tile_flags, tile_qc
    from histoduo.tissue import TissueMask

    mask = TissueMask(
        scores.tissue_mask, scores.mask_downsample, scores.thumbnail, scores.slide_mpp,
        level0_size=(scores.level0_width, scores.level0_height),
    )  # fmt: skip
    artefacts = detect_artefacts(mask, params.qc)
    stored = store.qc(slide)
    size0 = scores.tile_size_level0
    if stored is None:
        tiles = tile_qc(artefacts, scores.coords, size0, None, params.qc)
    else:  # the flags the tile run decided, re-derived with this run's thresholds
        pen, blur, fold = stored["qc_pen"], stored["qc_blur"], stored["qc_fold"]
        tiles = TileQC(pen, blur, fold, tile_flags(pen, blur, fold, params.qc))
    attach_qc(scores, tiles, artefacts, mode)


def grade_scores(
    scores: SlideScores,
    meta: CheckpointMeta,
    params: GradeParams,
    max_burden: float | None = None,
) -> SlideGrade:
    """The slide call (grading.py) with its uncertainty flag."""
    from histoduo.grading import Resolution, assess_uncertainty

    per_area = (scores.tile_size_level0 / max(scores.stride_level0, 1)) ** 2
    keep = scores.kept()  # QC-excluded tiles do not vote
    grade = grade_slide(
        scores.probs[keep],
        scores.class_names,
        meta.roles,
        params,
        weights=scores.tissue_fraction[keep],
        tiles_per_area=per_area,
    )
    resolution = Resolution(scores.slide_mpp, scores.target_mpp, meta.target_mpp)
    grade = assess_uncertainty(grade, params.uncertainty, resolution)
    if max_burden is not None:
        _artefact_uncertainty(grade, scores, meta, max_burden)
    return grade


def _artefact_uncertainty(
    grade: SlideGrade, scores: SlideScores, meta: CheckpointMeta, max_burden: float
) -> None:
    """Flag the call when QC-flagged tiles cover more than ``max_burden`` of the tumour
    (tiles predicted as a grade class, left out or not)."""
    if not scores.qc_checked or not meta.roles.grades:
        return
    from histoduo.qc import TileQC

    flagged = TileQC(scores.qc_pen, scores.qc_blur, scores.qc_fold, scores.qc_flags).excludable
    grades = [scores.class_names.index(g) for g in meta.roles.grades if g in scores.class_names]
    tumour = np.isin(scores.pred, grades)
    weight = scores.tissue_fraction.astype(np.float64)
    total = float(weight[tumour].sum())
    if total <= 0:
        return
    share = float(weight[tumour & flagged].sum()) / total
    if share > max_burden:
        grade.uncertainty.append(
            {
                "code": "artefacts",
                "text": f"artefacts (pen, blur, folds) cover {share:.0%} of the tumour "
                f"(trusted up to {max_burden:.0%})",
            }
        )
        grade.uncertain = True


def tissue_area_mm2(scores: SlideScores) -> float:
    return float(scores.tissue_mask.sum()) * (scores.mask_downsample * scores.slide_mpp) ** 2 / 1e6
