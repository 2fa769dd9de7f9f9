"""The run report of ``histoduo tile``: one row per slide, as JSON and CSV."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from histoduo import __version__
from histoduo.runtime.files import atomic_write, atomic_write_text
from histoduo.runtime.slides import FAILED_STATUSES, FINISHED_STATUSES


@dataclass
class SlideResult:
    """One row of the run report."""

    slide: str
    path: str
    status: str  # done | skipped | no_tissue | error
    n_tiles: int = 0
    tissue_area_mm2: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class TilingReport:
    store: str
    params: dict[str, Any]
    results: list[SlideResult]

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status in FAILED_STATUSES]

    def write(self, base: Path) -> tuple[Path, Path]:
        """``<base>.report.json`` and ``<base>.report.csv``, atomically."""
        json_path = base.with_name(base.name + ".report.json")
        csv_path = base.with_name(base.name + ".report.csv")
        payload = {
            "store": self.store,
            "histoduo_version": __version__,
            "params": self.params,
            "slides": [asdict(r) for r in self.results],
        }
        atomic_write_text(json_path, json.dumps(payload, indent=2, default=str))
        fields = list(asdict(SlideResult("", "", "")).keys())
        with atomic_write(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for r in self.results:
                writer.writerow(asdict(r))
        return json_path, csv_path


def summarise(report: TilingReport) -> dict[str, Any]:
    done = [r for r in report.results if r.status in FINISHED_STATUSES]
    return {
        "slides": len(report.results),
        "tiled": sum(r.status == "done" for r in report.results),
        "skipped": sum(r.status == "skipped" for r in report.results),
        "failed": len(report.failed),
        "tiles": sum(r.n_tiles for r in done),
    }
