"""The slide-level grade rule on constructed probabilities (deterministic)."""

from __future__ import annotations

import numpy as np
import pytest

from histoduo.grading import (
    NO_TUMOUR,
    ClassRoles,
    GradeParams,
    Resolution,
    SlideGrade,
    UncertaintyParams,
    assess_uncertainty,
    explain_grade,
    grade_slide,
)

CLASSES = ["normal", "low_grade", "high_grade", "necrosis"]
ROLES = ClassRoles.infer(CLASSES)


def _probs(counts: dict[str, int], p: float = 0.9) -> np.ndarray:
    """Tiles whose most probable class is given by ``counts``; that class gets ``p``."""
    rows = []
    for name, n in counts.items():
        row = np.full(len(CLASSES), (1 - p) / (len(CLASSES) - 1))
        row[CLASSES.index(name)] = p
        rows += [row] * n
    return np.array(rows, dtype=np.float32)


def test_roles_order_grades_low_to_high() -> None:
    assert ROLES.grades == ["low_grade", "high_grade"]
    assert ROLES.necrosis == ["necrosis"] and ROLES.normal == ["normal"]


def test_high_grade_focus_above_threshold_decides() -> None:
    probs = _probs({"normal": 50, "low_grade": 90, "high_grade": 10})  # 10 % of tumour
    result = grade_slide(probs, CLASSES, ROLES, GradeParams(min_grade_fraction=0.05))
    assert result.call == "high_grade"
    assert result.grade_fractions["high_grade"] == pytest.approx(0.1)
    assert result.confidence == pytest.approx(0.9, abs=1e-6)
    assert "highest grade" in result.reason


def test_high_grade_below_area_threshold_does_not_decide() -> None:
    probs = _probs({"low_grade": 196, "high_grade": 4})  # 2 % of tumour, 4 tiles
    result = grade_slide(probs, CLASSES, ROLES, GradeParams(min_grade_fraction=0.05))
    assert result.call == "low_grade"


def test_high_grade_below_tile_minimum_does_not_decide() -> None:
    probs = _probs({"low_grade": 10, "high_grade": 2})  # 17 % of tumour but only 2 tiles
    assert grade_slide(probs, CLASSES, ROLES, GradeParams(min_grade_tiles=3)).call == "low_grade"
    assert grade_slide(probs, CLASSES, ROLES, GradeParams(min_grade_tiles=2)).call == "high_grade"


def test_overlap_scales_tile_minimum() -> None:
    # With stride = tile / 2 every point is seen by 4 tiles: 8 tiles are 2 tiles' area.
    probs = _probs({"low_grade": 100, "high_grade": 8})
    params = GradeParams(min_grade_tiles=3)
    assert grade_slide(probs, CLASSES, ROLES, params, tiles_per_area=1.0).call == "high_grade"
    assert grade_slide(probs, CLASSES, ROLES, params, tiles_per_area=4.0).call == "low_grade"


def test_no_tumour() -> None:
    probs = _probs({"normal": 300, "necrosis": 40, "low_grade": 2})
    result = grade_slide(probs, CLASSES, ROLES, GradeParams())
    assert result.call == NO_TUMOUR
    assert result.necrosis_fraction == pytest.approx(40 / 342)
    assert result.confidence > 0.8


def test_weights_are_area() -> None:
    probs = _probs({"low_grade": 10, "high_grade": 10})
    weights = np.r_[np.ones(10), np.full(10, 0.01)]  # high-grade tiles barely hold tissue
    result = grade_slide(probs, CLASSES, ROLES, GradeParams(min_grade_fraction=0.05), weights)
    assert result.call == "low_grade"
    assert result.class_fractions["high_grade"] == pytest.approx(0.1 / 10.1)


def test_thin_tumour_falls_back_to_dominant_grade() -> None:
    probs = _probs({"normal": 100, "low_grade": 2, "high_grade": 1})
    params = GradeParams(min_grade_tiles=3, min_tumour_tiles=3, min_tumour_fraction=0.0)
    assert grade_slide(probs, CLASSES, ROLES, params).call == "low_grade"


def test_single_tumour_class_and_validation() -> None:
    names = ["normal", "cancer", "necrosis"]
    roles = ClassRoles.infer(names)
    probs = np.array([[0.1, 0.8, 0.1]] * 5 + [[0.8, 0.1, 0.1]] * 5)
    assert grade_slide(probs, names, roles).call == "cancer"
    with pytest.raises(ValueError):
        grade_slide(probs[:, :2], names, roles)
    with pytest.raises(ValueError):
        GradeParams(min_grade_fraction=1.5)
    assert grade_slide(np.zeros((0, 3)), names, roles).call == NO_TUMOUR


# --- honest calls: the uncertainty flag -------------------------------------------------------

MATCHED = Resolution(slide_mpp=0.25, tile_mpp=0.5, model_mpp=0.5)


def _assess(probs: np.ndarray, resolution: Resolution = MATCHED, **kwargs: float) -> SlideGrade:
    grade = grade_slide(probs, CLASSES, ROLES, GradeParams())
    return assess_uncertainty(grade, UncertaintyParams(**kwargs), resolution)


def test_confident_call_on_enough_tumour_is_not_flagged() -> None:
    result = _assess(_probs({"normal": 100, "low_grade": 150, "high_grade": 30}))
    assert result.call == "high_grade" and not result.uncertain and result.uncertainty == []


def test_chance_level_call_is_flagged_low_confidence() -> None:
    # An untrained 4-class model: every tile ~0.25 everywhere, argmax a coin toss.
    rng = np.random.default_rng(0)
    probs = 0.25 + rng.normal(0, 1e-3, (200, 4))
    result = _assess(probs / probs.sum(axis=1, keepdims=True))
    assert result.call in CLASSES and result.uncertain
    assert "low_confidence" in result.uncertainty_codes
    assert "chance for 4 classes is 0.25" in result.uncertainty_text


def test_little_tumour_and_few_tiles_are_flagged() -> None:
    # A grade call on 4 % of the tissue: passes the "no tumour" rule (1 %) but is thin.
    result = _assess(_probs({"normal": 240, "low_grade": 10}))
    assert result.call == "low_grade" and result.uncertainty_codes == ["little_tumour"]
    # A confident "no tumour" on few tumour tiles is not a grade call: no tumour flag.
    assert _assess(_probs({"normal": 300})).uncertainty_codes == []
    result = _assess(_probs({"low_grade": 30}), min_tiles=50, min_tumour_tiles=10)
    assert result.uncertainty_codes == ["few_tiles"]


def test_overlap_scales_the_tile_minima_of_the_flag() -> None:
    # 60 tiles at stride = tile / 2 cover the area of 15 tiles: below the 50-tile minimum.
    grade = grade_slide(_probs({"low_grade": 60}), CLASSES, ROLES, tiles_per_area=4.0)
    assessed = assess_uncertainty(grade, UncertaintyParams(min_tumour_tiles=10), MATCHED)
    assert (
        assessed.uncertainty_codes == ["few_tiles"]
        and "trusted from 200" in assessed.uncertainty_text
    )
    grade = grade_slide(_probs({"low_grade": 60}), CLASSES, ROLES, tiles_per_area=1.0)
    assert not assess_uncertainty(grade, UncertaintyParams(min_tiles=50), MATCHED).uncertain


def test_resolution_outside_training_is_flagged() -> None:
    probs = _probs({"normal": 100, "low_grade": 150})
    # --mpp 1.0 on a model trained at 0.5 um/px
    wrong = _assess(probs, Resolution(slide_mpp=0.25, tile_mpp=1.0, model_mpp=0.5))
    assert wrong.uncertainty_codes == ["resolution"] and "trained at 0.5" in wrong.uncertainty_text
    # a 10x (1 um/px) scan for a 0.5 um/px model: tiles were upsampled
    coarse = _assess(probs, Resolution(slide_mpp=1.0, tile_mpp=0.5, model_mpp=0.5))
    assert coarse.uncertainty_codes == ["resolution"] and "upsampled" in coarse.uncertainty_text
    # within the tolerance: 0.55 vs 0.5 um/px
    assert not _assess(probs, Resolution(0.25, 0.55, 0.5)).uncertain


def test_explanation_names_the_rule_and_the_flag() -> None:
    grade = _assess(_probs({"normal": 240, "low_grade": 10}))
    display = {"low_grade": "ISUP grade 1-2", "high_grade": "ISUP grade 3-4"}
    text = " ".join(explain_grade(grade, GradeParams(), display))
    assert "Call: ISUP grade 1-2, because ISUP grade 1-2 is the highest grade" in text
    assert "Uncertain: graded on little tumour" in text
    with pytest.raises(ValueError):
        UncertaintyParams(max_mpp_ratio=0.5)
