"""Slide-level ccRCC grade from tile probabilities (WHO/ISUP: the highest grade present decides).

The rule, in order (thresholds are :class:`GradeParams`, recorded in every run manifest):

1. Each tile votes for its most probable class; a tile's area weight is its tissue fraction,
   so half-empty edge tiles count half.
2. Tumour = the checkpoint's grade classes (``ClassRoles.grades``, low -> high). If the tumour
   area is below ``min_tumour_fraction`` of the tissue, or fewer than ``min_tumour_tiles``
   tiles are tumour, the call is ``"no tumour"``.
3. Otherwise the highest grade whose area is at least ``min_grade_fraction`` of the tumour
   area *and* that has at least ``min_grade_tiles`` tiles decides. Both limits keep a few
   noisy tiles from deciding; the tile minimum matters on small biopsies where 5 % is 1 tile.
4. If no grade passes both limits (tumour spread thinly over grades), the grade with the most
   tumour area is the call.

Confidence is the mean probability of the called grade over the tiles predicted as that grade
(for "no tumour": the mean non-tumour probability over all tiles).

With overlapping tiles (``--stride``) every point is covered by ~(tile/stride)^2 tiles, so the
tile minima are multiplied by ``tiles_per_area`` to keep the same area meaning.

Honest calls (:func:`assess_uncertainty`, thresholds :class:`UncertaintyParams`): a call is
flagged *uncertain*, with every reason that applies, when

- ``low_confidence``: its confidence is below ``min_confidence`` (an untrained K-class model
  sits near chance, 1/K: 0.25 for four classes);
- ``little_tumour``: a grade was called on less than ``min_tumour_fraction`` of the tissue or
  fewer than ``min_tumour_tiles`` tumour tiles (a grade from a handful of tiles is a guess);
- ``few_tiles``: the slide had fewer than ``min_tiles`` tiles in all;
- ``resolution``: the tiles were not cut at the model's training resolution (ratio beyond
  ``max_mpp_ratio``, e.g. ``--mpp`` or a tile store made at another mpp), or the slide was
  scanned coarser than the tiles need, so tiles were upsampled (slide mpp over tile mpp beyond
  ``max_mpp_ratio``).

The flag never changes the call; it says how far to trust it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from histoduo.checkpoint import ClassRoles

NO_TUMOUR = "no tumour"


@dataclass(frozen=True)
class UncertaintyParams:
    """When a slide-level call is flagged uncertain (see the module docstring).

    Defaults: 0.6 is well above chance for 2-6 classes (0.17-0.5) and below what a trained
    model gives on clear tissue (0.8-0.95 on the demo); 5 % / 20 tiles of tumour is about
    0.3 mm^2 at 0.5 um/px and 64 px tiles, the smallest area one would grade by eye from;
    50 tiles is a small biopsy; 1.25x is the resolution step beyond which tile texture visibly
    changes (0.5 vs 0.625 um/px).
    """

    min_confidence: float = 0.6  # 0-1
    min_tumour_fraction: float = 0.05  # of the tissue area, for a grade call
    min_tumour_tiles: int = 20  # for a grade call
    min_tiles: int = 50  # tiles on the slide
    max_mpp_ratio: float = 1.25  # tile mpp vs model mpp (either way); slide mpp over tile mpp

    def __post_init__(self) -> None:
        for name in ("min_confidence", "min_tumour_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in 0-1, got {value}")
        for name in ("min_tumour_tiles", "min_tiles"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_mpp_ratio < 1.0:
            raise ValueError(f"max_mpp_ratio must be >= 1, got {self.max_mpp_ratio}")


@dataclass(frozen=True)
class GradeParams:
    """Thresholds of the slide-level grade rule (see the module docstring)."""

    min_grade_fraction: float = 0.05  # of the tumour area, 0-1
    min_grade_tiles: int = 3
    min_tumour_fraction: float = 0.01  # of the tissue area, 0-1
    min_tumour_tiles: int = 3
    uncertainty: UncertaintyParams = field(default_factory=UncertaintyParams)

    def __post_init__(self) -> None:
        for name in ("min_grade_fraction", "min_tumour_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in 0-1, got {value}")
        for name in ("min_grade_tiles", "min_tumour_tiles"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SlideGrade:
    """The slide-level call and the numbers behind it."""

    call: str  # a grade class name or NO_TUMOUR
    confidence: float
    reason: str
    n_tiles: int
    class_fractions: dict[str, float] = field(default_factory=dict)  # of tissue area
    class_tiles: dict[str, int] = field(default_factory=dict)
    grade_fractions: dict[str, float] = field(default_factory=dict)  # of tumour area
    tumour_fraction: float = 0.0
    necrosis_fraction: float = 0.0
    normal_fraction: float = 0.0
    tumour_tiles: int = 0
    n_classes: int = 0
    tiles_per_area: float = 1.0  # (tile / stride)^2: tile counts per tile area
    uncertain: bool = False
    uncertainty: list[dict[str, str]] = field(default_factory=list)  # {"code", "text"}

    @property
    def uncertainty_codes(self) -> list[str]:
        return [u["code"] for u in self.uncertainty]

    @property
    def uncertainty_text(self) -> str:
        return "; ".join(u["text"] for u in self.uncertainty)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grade_slide(
    probs: np.ndarray,
    class_names: Sequence[str],
    roles: ClassRoles,
    params: GradeParams = GradeParams(),
    weights: np.ndarray | None = None,
    tiles_per_area: float = 1.0,
) -> SlideGrade:
    """Apply the grade rule to tile probabilities ``probs`` (N, K).

    ``weights``: per-tile area weights (e.g. tissue fraction); default 1.
    ``tiles_per_area``: tiles covering one tile area, (tile / stride)^2 with overlap.
    """
    probs = np.asarray(probs, dtype=np.float64)
    names = list(class_names)
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"probs must be (N, {len(names)}), got {probs.shape}")
    n = len(probs)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    pred = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    total = float(w.sum())
    area = {c: float(w[pred == i].sum()) for i, c in enumerate(names)}
    tiles = {c: int((pred == i).sum()) for i, c in enumerate(names)}
    fractions = {c: (area[c] / total if total > 0 else 0.0) for c in names}

    grades = [g for g in roles.grades if g in names]
    tumour_area = sum(area[g] for g in grades)
    tumour_tiles = sum(tiles[g] for g in grades)
    tumour_fraction = tumour_area / total if total > 0 else 0.0
    result = SlideGrade(
        call=NO_TUMOUR,
        confidence=0.0,
        reason="",
        n_tiles=n,
        class_fractions=fractions,
        class_tiles=tiles,
        grade_fractions={g: (area[g] / tumour_area if tumour_area > 0 else 0.0) for g in grades},
        tumour_fraction=tumour_fraction,
        necrosis_fraction=sum(fractions[c] for c in roles.necrosis if c in names),
        normal_fraction=sum(fractions[c] for c in roles.normal if c in names),
        tumour_tiles=tumour_tiles,
        n_classes=len(names),
        tiles_per_area=float(max(tiles_per_area, 1.0)),
    )
    scale = max(tiles_per_area, 1.0)
    min_tumour_tiles = math.ceil(params.min_tumour_tiles * scale)
    min_grade_tiles = math.ceil(params.min_grade_tiles * scale)
    if not grades or n == 0:
        result.reason = "no tiles" if n == 0 else "the model has no tumour grade classes"
        return result
    grade_idx = [names.index(g) for g in grades]
    if tumour_tiles < min_tumour_tiles or tumour_fraction < params.min_tumour_fraction:
        result.confidence = float(1.0 - probs[:, grade_idx].sum(axis=1).mean())
        result.reason = (
            f"tumour {tumour_fraction:.1%} of tissue in {tumour_tiles} tiles, below the minimum "
            f"{params.min_tumour_fraction:.1%} / {min_tumour_tiles} tiles"
        )
        return result
    call = None
    for grade in reversed(grades):  # highest grade first
        share = result.grade_fractions[grade]
        if share >= params.min_grade_fraction and tiles[grade] >= min_grade_tiles:
            call = grade
            result.reason = (
                f"{grade} is the highest grade with >= {params.min_grade_fraction:.1%} of the "
                f"tumour ({share:.1%}) and >= {min_grade_tiles} tiles ({tiles[grade]})"
            )
            break
    if call is None:
        call = max(grades, key=lambda g: area[g])
        result.reason = "no grade reaches the minimum area and tile count; dominant grade"
    index = names.index(call)
    result.call = call
    result.confidence = float(probs[pred == index, index].mean())
    return result


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


def explain_grade(grade: SlideGrade, params: GradeParams, display: dict[str, str]) -> list[str]:
    """The rule's reasoning for one slide as sentences a pathologist can check."""

    def name(c: str) -> str:
        return display.get(c, c)

    if grade.n_tiles == 0:
        return ["No tiles were predicted, so there is no call."]
    by_area = sorted(grade.class_fractions.items(), key=lambda kv: -kv[1])
    tissue = ", ".join(f"{name(c)} {v:.0%}" for c, v in by_area)
    lines = [f"{grade.n_tiles} tiles; tissue area by most probable class: {tissue}."]
    min_tumour_tiles = math.ceil(params.min_tumour_tiles * grade.tiles_per_area)
    min_grade_tiles = math.ceil(params.min_grade_tiles * grade.tiles_per_area)
    lines.append(
        f"Tumour (the grade classes) covers {grade.tumour_fraction:.1%} of the tissue in "
        f"{grade.tumour_tiles} tiles; below {params.min_tumour_fraction:.0%} or "
        f"{min_tumour_tiles} tiles a slide is called {NO_TUMOUR!r}."
    )
    if grade.grade_fractions and grade.call != NO_TUMOUR:
        shares = ", ".join(f"{name(g)} {v:.0%}" for g, v in grade.grade_fractions.items())
        lines.append(
            f"Share of the tumour by grade: {shares}. The highest grade with at least "
            f"{params.min_grade_fraction:.0%} of the tumour and {min_grade_tiles} tiles "
            "decides (WHO/ISUP: the highest grade present)."
        )
    reason = grade.reason
    for cls in sorted(display, key=len, reverse=True):  # longest first: "grade_10" before "grade_1"
        reason = re.sub(rf"\b{re.escape(cls)}\b", display[cls], reason)
    lines.append(f"Call: {name(grade.call)}, because {reason}.")
    lines.append(
        f"Confidence {grade.confidence:.2f}: the mean probability of the called class over "
        "the tiles predicted as it."
    )
    if grade.uncertain:
        lines.append("Uncertain: " + grade.uncertainty_text + ".")
    else:
        lines.append(
            "No uncertainty flag: confidence, tumour amount, tile count and resolution "
            "are within the trusted limits."
        )
    return lines
