"""``report.html``: one self-contained page per run that a pathologist reads at a glance.

Rendered with jinja2 from the package's ``templates/report.html.j2`` (shipped as package data)
out of what each slide folder already holds (summary.json, error.json, the PNG maps), so
``histoduo predict`` and ``histoduo heatmap`` both rebuild it without the model. No network:
styles are inline and images are the PNG files beside the page (relative links), so the
folder can be zipped, copied or opened offline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from histoduo.grading import GradeParams, SlideGrade, UncertaintyParams, explain_grade
from histoduo.results.layout import (
    LINK_FILES,
    MANIFEST_FILE,
    MAP_FILES,
    REPORT_FILE,
    SLIDES_CSV,
    manifest_paths,
    prob_map_name,
)
from histoduo.results.tables import SlideResult, collect_slides
from histoduo.runtime.files import atomic_write_text


@dataclass
class Figure:
    src: str  # relative to the report
    caption: str


@dataclass
class SlideView:
    """What the template shows for one slide."""

    name: str
    anchor: str
    status: str
    call: str = ""
    call_id: str = ""
    confidence: float | None = None
    uncertain: bool = False
    uncertainty: list[str] = field(default_factory=list)
    tumour_fraction: float | None = None
    grade_fractions: list[tuple[str, float]] = field(default_factory=list)
    tissue_area_mm2: float | None = None
    n_tiles: int = 0
    reasoning: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    prob_figures: list[Figure] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""


def _grade_params(data: dict[str, Any]) -> GradeParams:
    known = {f.name for f in fields(GradeParams)} - {"uncertainty"}
    uncertainty = UncertaintyParams(**data.get("uncertainty", {}))
    return GradeParams(**{k: v for k, v in data.items() if k in known}, uncertainty=uncertainty)


def _slide_grade(data: dict[str, Any]) -> SlideGrade:
    known = {f.name for f in fields(SlideGrade)}
    return SlideGrade(**{k: v for k, v in data.items() if k in known})


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _slide_view(record: SlideResult, maps_dir: Path, report_dir: Path) -> SlideView:
    anchor = "slide-" + "".join(c if c.isalnum() else "-" for c in record.name)
    if record.summary is None:
        error = record.error or {}
        return SlideView(
            record.name, anchor, error.get("status", "error"), error=error.get("error", "")
        )
    summary, display = record.summary, record.display
    grade = _slide_grade(record.grade)
    params = _grade_params(summary.grade_params)
    view = SlideView(
        name=record.name,
        anchor=anchor,
        status="done",
        call=display.get(grade.call, grade.call),
        call_id=grade.call,
        confidence=grade.confidence,
        uncertain=grade.uncertain,
        uncertainty=[u["text"] for u in grade.uncertainty],
        tumour_fraction=grade.tumour_fraction,
        grade_fractions=[(display.get(g, g), v) for g, v in grade.grade_fractions.items()],
        tissue_area_mm2=summary.tissue_area_mm2,
        n_tiles=summary.n_tiles,
        reasoning=explain_grade(grade, params, display),
    )
    images = maps_dir / record.folder.name
    for filename, caption in MAP_FILES:
        if (images / filename).exists():
            view.figures.append(Figure(_rel(images / filename, report_dir), caption))
    for cls, shown in display.items():
        path = images / prob_map_name(cls)
        if path.exists():
            view.prob_figures.append(Figure(_rel(path, report_dir), f"Probability of {shown}"))
    for filename in LINK_FILES:
        if (record.folder / filename).exists():
            view.links.append((filename, _rel(record.folder / filename, report_dir)))
    return view


def _model_line(run_dir: Path) -> str:
    """The checkpoint in words, from the run's (or a shard's) manifest; "" if none."""
    import json

    for path in manifest_paths(run_dir):
        try:
            checkpoint = json.loads(path.read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        name = Path(str(checkpoint.get("path") or "?")).name
        c = {k: checkpoint.get(k, "?") for k in ("arch", "backbone", "target_mpp", "tile_size_px")}
        return (
            f"{name}: {c['arch']} ({c['backbone']}), trained at {c['target_mpp']} µm/px on "
            f"{c['tile_size_px']} px tiles, epoch {checkpoint.get('epoch', '?')}; "
            f"classes {', '.join(checkpoint.get('class_names', []))}"
        )
    return ""


def render_report(run_dir: str | Path, maps_dir: str | Path | None = None,
                  report_path: str | Path | None = None) -> str:  # fmt: skip
    """The report's HTML for the run in ``run_dir`` (maps from ``maps_dir``, default the same)."""
    import jinja2

    run_dir = Path(run_dir)
    maps = Path(maps_dir) if maps_dir is not None else run_dir
    target = Path(report_path) if report_path is not None else run_dir / REPORT_FILE
    report_dir = target.parent
    slides = [_slide_view(r, maps, report_dir) for r in collect_slides(run_dir)]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("histoduo.results", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    from histoduo import __version__

    run_links = [
        (name, _rel(run_dir / name, report_dir))
        for name in (SLIDES_CSV, MANIFEST_FILE)
        if (run_dir / name).exists()
    ]
    return env.get_template("report.html.j2").render(
        model=_model_line(run_dir),
        title=f"histoduo report: {run_dir.resolve().name}",
        run_dir=str(run_dir.resolve()),
        created=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        version=__version__,
        slides=slides,
        n_uncertain=sum(s.uncertain for s in slides),
        n_failed=sum(s.status != "done" for s in slides),
        run_links=run_links,
    )


def write_report(
    run_dir: str | Path, maps_dir: str | Path | None = None, report_path: str | Path | None = None
) -> Path:
    """Write ``report.html`` atomically (default ``run_dir/report.html``); returns its path."""
    target = Path(report_path) if report_path is not None else Path(run_dir) / REPORT_FILE
    atomic_write_text(target, render_report(run_dir, maps_dir, target))
    return target
