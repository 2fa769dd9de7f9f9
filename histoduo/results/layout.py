"""What a results folder holds: every file name, and the typed per-slide summary.

``predict`` writes a results folder, ``heatmap`` redraws it, the report and ``slides.csv`` are
rebuilt from it. All of them name files through this module, and ``summary.json`` is written
and read by :class:`SlideSummary` alone, so a field cannot be written under one name and read
under another::

    OUT/
      slides.csv  report.html  manifest.json (manifest.shard-K-of-N.json per shard)
      <slide>/
        tiles.csv  scores.npz  tiles.geojson  tissue.geojson  summary.json  done | error.json
        thumbnail.png  class_overlay.png  class_map.png  grade_map.png  prob_<class>.png
        attention_map.png  mil.json                  (with --slide-model)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.files import atomic_write_text

# The run folder.
SLIDES_CSV = "slides.csv"
REPORT_FILE = "report.html"
MANIFEST_FILE = "manifest.json"
# One slide's folder.
TILES_CSV = "tiles.csv"
SCORES_FILE = "scores.npz"
TILES_GEOJSON = "tiles.geojson"
TISSUE_GEOJSON = "tissue.geojson"
SUMMARY_FILE = "summary.json"
DONE_MARKER = "done"  # written last: a folder without it is unfinished
ERROR_FILE = "error.json"  # a failed slide's status and message
# Maps (PNG), in the order a reader wants them; prob_<class>.png follow in class order.
THUMBNAIL_PNG = "thumbnail.png"
CLASS_OVERLAY_PNG = "class_overlay.png"
CLASS_MAP_PNG = "class_map.png"
GRADE_MAP_PNG = "grade_map.png"
ATTENTION_MAP_PNG = "attention_map.png"  # with --slide-model: where the slide model looked
MIL_FILE = "mil.json"  # with --slide-model: its call, confidence and class probabilities
QC_OVERLAY_PNG = "qc_overlay.png"
MAP_FILES = (
    (THUMBNAIL_PNG, "Thumbnail"),
    (CLASS_MAP_PNG, "Class map"),
    (CLASS_OVERLAY_PNG, "Classes over the tissue"),
    (GRADE_MAP_PNG, "Tumour grade map"),
    (ATTENTION_MAP_PNG, "Slide model attention (evidence for review, not an explanation)"),
    (QC_OVERLAY_PNG, "Artefacts found by QC (pen, blur, folds)"),
)
LINK_FILES = (TILES_CSV, TILES_GEOJSON, TISSUE_GEOJSON, SUMMARY_FILE)


def manifest_name(shard: tuple[int, int] | None) -> str:
    """``manifest.json``, or ``manifest.shard-K-of-N.json`` for one shard of a run."""
    return MANIFEST_FILE if shard is None else f"manifest.shard-{shard[0]}-of-{shard[1]}.json"


def manifest_paths(run_dir: Path) -> list[Path]:
    """The run's manifest first, then every shard's."""
    return [run_dir / MANIFEST_FILE, *sorted(run_dir.glob("manifest.shard-*.json"))]


def safe_file_stem(name: str) -> str:
    """A class or slide name as a file-name part (``prob_<stem>.png``)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def prob_map_name(class_name: str) -> str:
    return f"prob_{safe_file_stem(class_name)}.png"


@dataclass(kw_only=True)
class SlideSummary:
    """``summary.json``: one finished slide's call and everything behind it."""

    slide: str
    path: str
    n_tiles: int
    tissue_area_mm2: float | None = None
    slide_mpp: float | None = None
    target_mpp: float | None = None  # the tiles' resolution
    model_mpp: float | None = None  # the resolution the model was trained at
    class_display_names: dict[str, str] = field(default_factory=dict)
    tile_size_px: int | None = None
    tile_size_level0: int | None = None
    stride_level0: int | None = None
    checkpoint: str = ""  # the checkpoint's absolute path when predicted
    checkpoint_sha256: str = ""  # its content hash: results are credited to this model
    grade_params: dict[str, Any] = field(default_factory=dict)
    seconds_predict: float | None = None
    grade: dict[str, Any] = field(default_factory=dict)  # grading.SlideGrade.to_dict()
    # With --slide-model: mil_call, mil_confidence, mil_agrees, mil_probabilities, slide_model
    mil: dict[str, Any] = field(default_factory=dict)
    # Artefact QC: mode, burdens (share of tissue), excluded_tiles; empty = not checked.
    qc: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideSummary:
        """Unknown keys (a newer histoduo) are ignored; missing ones take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, slide_dir: Path) -> Path:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        return atomic_write_text(Path(slide_dir) / SUMMARY_FILE, text)

    @classmethod
    def read(cls, slide_dir: Path) -> SlideSummary:
        """The summary of a slide folder; ``OSError``/``ValueError`` if absent or unreadable."""
        data = json.loads((Path(slide_dir) / SUMMARY_FILE).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{Path(slide_dir) / SUMMARY_FILE}: not a JSON object")
        return cls.from_dict(data)


def is_done(slide_dir: Path) -> bool:
    return (Path(slide_dir) / DONE_MARKER).exists()


def is_result_file(name: str) -> bool:
    """Whether a file name in a slide folder is one ``predict`` writes (so may replace or
    remove); anything else there is the user's and is never touched."""
    fixed = {TILES_CSV, SCORES_FILE, TILES_GEOJSON, TISSUE_GEOJSON, SUMMARY_FILE, DONE_MARKER}
    fixed |= {ERROR_FILE, MIL_FILE, *(png for png, _ in MAP_FILES)}
    return name in fixed or (name.startswith("prob_") and name.endswith(".png"))


class ResultsConflictError(HistoduoError):
    """A results folder holds results of another model than the one predicting into it."""

    status = "conflict"
