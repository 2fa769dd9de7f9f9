"""The slide-level grade: class roles, the WHO/ISUP-style rule and the uncertainty flag."""

from histoduo.grading.params import GradeParams, UncertaintyParams
from histoduo.grading.roles import ClassRoles
from histoduo.grading.rule import NO_TUMOUR, SlideGrade, explain_grade, grade_slide
from histoduo.grading.uncertainty import Resolution, assess_uncertainty

__all__ = [
    "NO_TUMOUR",
    "ClassRoles",
    "GradeParams",
    "Resolution",
    "SlideGrade",
    "UncertaintyParams",
    "assess_uncertainty",
    "explain_grade",
    "grade_slide",
]
