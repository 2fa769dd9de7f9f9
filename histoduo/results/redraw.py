"""Redraw a results folder's maps and report from saved scores, without the model."""

from __future__ import annotations

from pathlib import Path

from histoduo.results.layout import REPORT_FILE, SCORES_FILE, SUMMARY_FILE
from histoduo.results.maps import HeatmapStyle, render_slide_maps
from histoduo.results.report import write_report
from histoduo.results.scores import SlideScores


def redraw(
    results: str | Path, style: HeatmapStyle, out_dir: str | Path | None = None
) -> list[Path]:
    """Redraw maps for one slide folder or every slide folder of a run; returns the folders.

    ``out_dir``: where to write (``<out_dir>/<slide>/``); default the slide folders themselves.
    """
    results = Path(results)
    missing: list[Path] = []
    if (results / SCORES_FILE).exists():
        folders = [results]
    elif results.is_dir():
        folders = sorted(p for p in results.iterdir() if (p / SCORES_FILE).exists())
        # Slide folders (they hold a summary) without scores: said, not silently skipped.
        missing = sorted(
            p for p in results.iterdir() if (p / SUMMARY_FILE).exists() and p not in folders
        )
    else:
        folders = []
    if not folders:
        raise FileNotFoundError(f"{results}: no {SCORES_FILE} here or in its sub-folders")
    for folder in folders:
        scores = SlideScores.load(folder / SCORES_FILE)
        target = folder if out_dir is None else Path(out_dir) / folder.name
        render_slide_maps(scores, target, style)
    # The run's report.html, with the redrawn maps (a single slide folder: its run's report).
    run_dir = folders[0].parent
    write_report(run_dir, out_dir, Path(out_dir or run_dir) / REPORT_FILE)
    if missing:
        names = ", ".join(p.name for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{missing[0] / SCORES_FILE}: not found; {len(missing)} slide folder(s) have no "
            f"{SCORES_FILE} and were not redrawn ({names}); the other {len(folders)} were. "
            "Run predict for those slides again to write their scores"
        )
    return folders
