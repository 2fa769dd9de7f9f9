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

from histoduo.grading.params import GradeParams
from histoduo.grading.roles import ClassRoles

NO_TUMOUR = "no tumour"


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
