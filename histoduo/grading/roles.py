"""What each class means for the slide-level grade: tumour grades (ordered), normal, necrosis."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

_NORMAL_NAMES = {"normal", "benign", "healthy", "non_tumor", "non-tumor", "nontumor", "stroma"}
_NECROSIS_NAMES = {"necrosis", "necrotic"}
_LOW_WORDS = ("low",)
_HIGH_WORDS = ("high",)


@dataclass
class ClassRoles:
    """What each class means for slide-level grading.

    ``grades`` are tumour classes ordered from lowest to highest grade (one entry = tumour
    without grades, e.g. TCGA's "cancer"); ``normal`` and ``necrosis`` are reported as area
    fractions; ``other`` classes are ignored by the grade rule.
    """

    grades: list[str] = field(default_factory=list)
    normal: list[str] = field(default_factory=list)
    necrosis: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> ClassRoles:
        return cls(**{k: list(v) for k, v in data.items()})

    def validate(self, class_names: list[str]) -> None:
        named = self.grades + self.normal + self.necrosis + self.other
        unknown = sorted(set(named) - set(class_names))
        if unknown:
            raise ValueError(f"class roles name unknown classes {unknown}; classes: {class_names}")
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise ValueError(f"classes given more than one role: {twice}")

    @classmethod
    def infer(cls, class_names: list[str], grades: list[str] | None = None) -> ClassRoles:
        """Roles from class names: normal/benign, necrosis, and grades ordered low -> high
        (``low_grade`` < ``high_grade``; ``grade_1`` < ``grade_2``; ``G1`` < ``G4``).

        ``grades`` overrides the inferred grade order; every other class that is neither
        normal nor necrosis is a tumour grade of its own only if nothing else is a grade.
        """
        roles = cls()
        rest: list[str] = []
        for name in class_names:
            key = name.strip().lower()
            if grades is not None and name in grades:
                continue
            if key in _NORMAL_NAMES:
                roles.normal.append(name)
            elif key in _NECROSIS_NAMES:
                roles.necrosis.append(name)
            else:
                rest.append(name)
        if grades is not None:
            roles.grades = list(grades)
            roles.other = rest
        else:
            graded = [n for n in rest if _grade_rank(n) is not None]
            roles.grades = sorted(graded, key=lambda n: _grade_rank(n) or 0.0)
            roles.other = [n for n in rest if n not in graded]
            if not roles.grades and len(roles.other) == 1:
                roles.grades, roles.other = roles.other, []  # e.g. "cancer", "tumor"
        roles.validate(class_names)
        return roles


def _grade_rank(name: str) -> float | None:
    key = name.strip().lower()
    number = re.search(r"(?:grade|^g)[ _-]?(\d)", key)
    if number:
        return float(number.group(1))
    if any(word in key for word in _LOW_WORDS):
        return 1.0
    if any(word in key for word in _HIGH_WORDS):
        return 3.0
    if "grade" in key or "tumo" in key or "cancer" in key or "carcinoma" in key:
        return 2.0
    return None
