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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from histoduo.checkpoint import ClassRoles

NO_TUMOUR = "no tumour"


@dataclass(frozen=True)
class GradeParams:
    """Thresholds of the slide-level grade rule (see the module docstring)."""

    min_grade_fraction: float = 0.05  # of the tumour area, 0-1
    min_grade_tiles: int = 3
    min_tumour_fraction: float = 0.01  # of the tissue area, 0-1
    min_tumour_tiles: int = 3

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
