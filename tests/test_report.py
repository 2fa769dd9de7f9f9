"""report.html and the result tables as a pathologist meets them: documented columns, honest
calls of a chance-level model, display names, and the page in a real headless browser."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_predict import CLASSES, make_checkpoint
from typer.testing import CliRunner

from histoduo.predict import PredictParams, predict_run
from histoduo.slide.sources import SlideSource

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ROOT / "test-artefacts"  # git-ignored; CI keeps it
DISPLAY = {"low_grade": "ISUP grade 1-2", "high_grade": "ISUP grade 3-4"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, svs_slide, svs_slide_b) -> Path:  # noqa: ANN001
    """Two slides predicted by an untrained (chance-level) model that names its grades."""
    folder = tmp_path_factory.mktemp("report")
    checkpoint = make_checkpoint(folder / "untrained.pt", display_names=DISPLAY)
    out = folder / "run"
    params = PredictParams(workers=0, thumbnail_max_px=256)
    sources = [SlideSource(svs_slide.path), SlideSource(svs_slide_b.path)]
    predict_run(checkpoint, out, params, sources=sources)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _header(path: Path) -> list[str]:
    with path.open() as handle:
        return next(csv.reader(handle))


def _documented_columns(table: str, classes: list[str], grades: list[str]) -> list[str]:
    """The column table of docs/prediction.md for one file, templates expanded."""
    text = (ROOT / "docs" / "prediction.md").read_text()
    columns: list[str] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] == table:
            name = cells[1].strip("`")
            assert cells[2], f"{name}: no unit documented"
            if "<class>" in name:
                columns += [name.replace("<class>", c) for c in classes]
            elif "<grade>" in name:
                columns += [name.replace("<grade>", g) for g in grades]
            else:
                columns.append(name)
    return columns


def test_documented_columns_are_the_real_headers(run: Path) -> None:
    grades = ["low_grade", "high_grade"]
    tiles = _header(run / "svs_a" / "tiles.csv")
    slides = _header(run / "slides.csv")
    assert tiles == _documented_columns("tiles.csv", CLASSES, grades)
    assert slides == _documented_columns("slides.csv", CLASSES, grades)
    assert len(set(slides)) == len(slides) and len(set(tiles)) == len(tiles)


def test_chance_level_model_is_flagged_uncertain(run: Path) -> None:
    rows = _rows(run / "slides.csv")
    assert [r["slide"] for r in rows] == ["svs_a", "svs_b"]
    for row in rows:
        assert float(row["confidence"]) == pytest.approx(0.25, abs=0.05)  # chance: 1/4
        assert row["uncertain"] == "True"
        assert "low_confidence" in row["uncertainty_codes"].split(";")
        assert "chance for 4 classes is 0.25" in row["uncertainty_reason"]
        summary = json.loads((run / row["slide"] / "summary.json").read_text())
        assert summary["grade"]["uncertain"] is True
        assert summary["model_mpp"] == 1.0
    assert "uncertain" in (run / "report.html").read_text()


def test_display_names_reach_every_output(run: Path) -> None:
    rows = _rows(run / "slides.csv")
    expected = {"no tumour": "No tumour", **DISPLAY}
    for row in rows:
        assert row["call_display_name"] == expected[row["call"]]
    tiles = _rows(run / "svs_a" / "tiles.csv")
    shown = {"normal": "Normal", "necrosis": "Necrosis", **DISPLAY}
    assert all(t["pred_display_name"] == shown[t["pred"]] for t in tiles)
    features = json.loads((run / "svs_a" / "tiles.geojson").read_text())["features"]
    for feature in features:
        props = feature["properties"]
        assert props["classification"]["name"] in CLASSES  # the id: QuPath keys classes by it
        assert props["name"] == shown[props["classification"]["name"]]
    html = (run / "report.html").read_text()
    assert "ISUP grade 1-2" in html and "ISUP grade 3-4" in html
    summary = json.loads((run / "svs_a" / "summary.json").read_text())
    assert summary["class_display_names"]["high_grade"] == "ISUP grade 3-4"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")
        for key in ("src", "href"):
            if re.match(r"^(https?:)?//", values.get(key) or ""):
                self.external.append(values[key] or "")


def _refs(html_path: Path) -> _Refs:
    parser = _Refs()
    parser.feed(html_path.read_text())
    return parser


def test_report_is_self_contained(run: Path) -> None:
    refs = _refs(run / "report.html")
    assert refs.external == []  # no CDN, nothing from the network
    # 4 maps, the QC overlay and 1 per class, per slide
    assert len(refs.images) == 2 * (5 + len(CLASSES))
    for src in refs.images + [h for h in refs.links if not h.startswith("#")]:
        assert src.startswith("data:") or (run / src).is_file(), src
    hrefs = set(refs.links)
    for name in ("slides.csv", "svs_a/tiles.csv", "svs_a/tiles.geojson", "svs_b/tissue.geojson"):
        assert name in hrefs
    assert not list(run.glob(".report.html.*"))  # atomic write left no temporary file


def test_heatmap_redraws_the_report(run: Path, tmp_path: Path) -> None:
    from histoduo.cli import app

    out = tmp_path / "redrawn"
    result = CliRunner().invoke(app, ["heatmap", str(run), "--out", str(out), "--alpha", "0.7"])
    assert result.exit_code == 0, result.output
    report = out / "report.html"
    refs = _refs(report)
    assert len(refs.images) == 2 * (5 + len(CLASSES))  # the QC overlay is redrawn too
    for src in refs.images:
        assert (out / src).is_file() and (out / src).resolve().is_relative_to(out.resolve())
    # tables link back to the run that made them
    assert any((out / h).resolve() == (run / "slides.csv").resolve() for h in refs.links)


def test_template_ships_as_package_data() -> None:
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["histoduo"]
    templates = list((ROOT / "histoduo" / "results" / "templates").iterdir())
    assert templates
    for path in templates:
        rel = path.relative_to(ROOT / "histoduo")
        assert any(rel.match(g) for g in globs), f"{rel} is not package data"


# --- a real browser -------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Appended to a test copy of the page: after load, record which images failed to decode.
CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var marker = document.createElement("pre");
  marker.id = "histoduo-test";
  marker.textContent = "IMAGES=" + images.length + " BROKEN=" + broken.length + " " +
    broken.map(function (i) { return i.getAttribute("src"); }).join(" ");
  document.body.appendChild(marker);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")


def _browse(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    command = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    chromium_profile = tmp_path / "profile"
    # The page as a person sees it: a screenshot, kept as a test artefact.
    shot = tmp_path / "report.png"
    result = _browse(
        ["--window-size=1280,2600", f"--screenshot={shot}", (run / "report.html").as_uri()],
        chromium_profile,
    )
    assert shot.exists(), result.stderr[-2000:]
    ARTEFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTEFACTS / "report.png")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2600, 1280) and pixels.std() > 10  # not a blank page

    # The DOM after load, from a copy (beside the original, so relative images resolve).
    copy = run / "report.test-copy.html"
    copy.write_text((run / "report.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        result = _browse(
            ["--virtual-time-budget=10000", "--dump-dom", copy.as_uri()], chromium_profile
        )
    finally:
        copy.unlink()
    dom = result.stdout
    marker = re.search(r"IMAGES=(\d+) BROKEN=(\d+)([^<]*)", dom)
    assert marker, f"the check script did not run: {result.stderr[-2000:]}"
    assert int(marker.group(1)) == 2 * (5 + len(CLASSES))  # maps, QC overlay, prob maps
    assert int(marker.group(2)) == 0, f"broken images: {marker.group(3)}"
    text = re.sub(r"<[^>]+>", " ", dom)
    for row in _rows(run / "slides.csv"):
        assert row["slide"] in text and row["call_display_name"] in text
        assert f"{float(row['confidence']):.2f}" in text


def test_display_names_defaults_and_older_checkpoints() -> None:
    from histoduo.models.checkpoint import CheckpointMeta
    from histoduo.results.display import default_display_name, display_names

    assert default_display_name("high_grade") == "High grade"
    assert default_display_name("grade_3") == "Grade 3"
    assert default_display_name("ISUP_3") == "ISUP 3"  # mixed case kept as written
    assert display_names(CLASSES, DISPLAY) == {
        "normal": "Normal",
        "low_grade": "ISUP grade 1-2",
        "high_grade": "ISUP grade 3-4",
        "necrosis": "Necrosis",
    }
    meta = CheckpointMeta(
        model_config={}, class_names=CLASSES, class_roles={}, target_mpp=0.5,
        tile_size_px=64, input_size_px=64, mean=[0.0] * 3, std=[1.0] * 3,
        class_display_names=DISPLAY,
    )  # fmt: skip
    assert CheckpointMeta.from_dict(meta.to_dict()).class_display_names == DISPLAY
    older = meta.to_dict()
    del older["class_display_names"]  # checkpoints written before display names
    assert CheckpointMeta.from_dict(older).class_display_names == {}


def test_train_cli_rejects_malformed_display_name(tmp_path: Path) -> None:
    from histoduo.cli import app

    store = tmp_path / "tiles.h5"
    store.write_bytes(b"")
    result = CliRunner().invoke(
        app, ["train", str(store), "--out", str(tmp_path / "run"), "--display-name", "oops"]
    )
    assert result.exit_code != 0
    assert "--display-name must look like" in " ".join(result.output.split())
