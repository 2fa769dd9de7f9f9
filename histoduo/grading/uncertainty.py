"""When a slide-level call is flagged uncertain, with every reason that applies (see
:mod:`histoduo.grading.rule` for the rule and the reasons)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from histoduo.grading.params import UncertaintyParams
from histoduo.grading.rule import NO_TUMOUR, SlideGrade


@dataclass(frozen=True)
class Resolution:
    """The resolutions behind one slide's tiles, um/px."""

    slide_mpp: float  # level 0 of the slide
    tile_mpp: float  # what the tiles were cut at
    model_mpp: float  # what the model was trained at (the checkpoint)


def assess_uncertainty(
    grade: SlideGrade, params: UncertaintyParams, resolution: Resolution | None = None
) -> SlideGrade:
    """Set ``grade.uncertain`` and ``grade.uncertainty`` (every reason that applies)."""
    reasons: list[dict[str, str]] = []
    chance = 1.0 / grade.n_classes if grade.n_classes else 0.0
    # Tile minima mean areas: with overlapping tiles every point is counted several times.
    min_tumour_tiles = math.ceil(params.min_tumour_tiles * grade.tiles_per_area)
    min_tiles = math.ceil(params.min_tiles * grade.tiles_per_area)
    if grade.n_tiles and grade.confidence < params.min_confidence:
        near = " (near chance)" if grade.confidence < chance + 0.1 else ""
        reasons.append(
            {
                "code": "low_confidence",
                "text": f"confidence {grade.confidence:.2f} is below {params.min_confidence:.2f}"
                f"{near}; chance for {grade.n_classes} classes is {chance:.2f}",
            }
        )
    if grade.call != NO_TUMOUR and (
        grade.tumour_fraction < params.min_tumour_fraction or grade.tumour_tiles < min_tumour_tiles
    ):
        reasons.append(
            {
                "code": "little_tumour",
                "text": f"graded on little tumour: {grade.tumour_fraction:.1%} of the tissue in "
                f"{grade.tumour_tiles} tiles (trusted from {params.min_tumour_fraction:.0%} "
                f"and {min_tumour_tiles} tiles)",
            }
        )
    if grade.n_tiles < min_tiles:
        reasons.append(
            {
                "code": "few_tiles",
                "text": f"only {grade.n_tiles} tiles on the slide (trusted from {min_tiles})",
            }
        )
    if resolution is not None:
        ratio = resolution.tile_mpp / resolution.model_mpp
        if max(ratio, 1.0 / ratio) > params.max_mpp_ratio:
            reasons.append(
                {
                    "code": "resolution",
                    "text": f"tiles at {resolution.tile_mpp:.3g} um/px but the model was "
                    f"trained at {resolution.model_mpp:.3g} um/px",
                }
            )
        if resolution.slide_mpp / resolution.tile_mpp > params.max_mpp_ratio:
            reasons.append(
                {
                    "code": "resolution",
                    "text": f"slide scanned at {resolution.slide_mpp:.3g} um/px, coarser than "
                    f"the {resolution.tile_mpp:.3g} um/px tiles: tiles were upsampled",
                }
            )
    grade.uncertainty = reasons
    grade.uncertain = bool(reasons)
    return grade
