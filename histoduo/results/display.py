"""Names people read: class display names ("ISUP grade 3-4") beside the class ids models use.

A checkpoint may carry ``class_display_names`` ({class id: display name}); classes it does not
name get a default derived from the id ("high_grade" -> "High grade"). Ids stay the keys in
every machine-read field (CSV ``pred``/``call``, GeoJSON classification); display names go
to every place a person reads (maps, report, ``*_display_name`` CSV columns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def default_display_name(class_name: str) -> str:
    """ "high_grade" -> "High grade", "grade_3" -> "Grade 3"; mixed-case ids ("ISUP3") kept."""
    text = " ".join(class_name.replace("_", " ").split())
    if text and text == text.lower():
        text = text[0].upper() + text[1:]
    return text or class_name


def display_names(
    class_names: Sequence[str], given: Mapping[str, str] | None = None
) -> dict[str, str]:
    """{class id: display name} for every class, ``given`` first, else the default."""
    given = given or {}
    return {c: (given.get(c) or default_display_name(c)) for c in class_names}
