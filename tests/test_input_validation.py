"""Input validation (issue 18): bad options, slide lists, checkpoints, annotations and files
each end in one clear error naming the file (no traceback, nothing half-written) or in a
correct result. Runs through the real CLI like test_faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_faults import TILE, fails, leftovers, no_store_slides, succeeds

from histoduo.store import TileStore
from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 256 x 256 px synthetic slides at 0.5 um/px."""
    folder = tmp_path_factory.mktemp("validation")
    for i in range(2):
        spec = SyntheticSlideSpec(level0_width=256, level0_height=256, mpp=0.5, seed=i)
        write_synthetic_slide(folder / f"s{i}.svs", spec, workers=1).truth_geojson.unlink()
    return folder


# --- option values refused before any work ------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--label-coverage", "2", ("label coverage", "(0, 1]", "2")),
        ("--label-coverage", "nan", ("label coverage",)),
        ("--mask-mpp", "nan", ("mask_mpp", "finite")),
        ("--mask-mpp", "0", ("mask_mpp", "positive")),
        ("--workers", "-3", ("--workers", "greater than or equal to 0")),
    ],
)
def test_bad_option_values_refused(
    slides: Path, tmp_path: Path, flag: str, value: str, words: tuple[str, ...]
) -> None:
    out = tmp_path / "t.h5"
    fails("tile", slides / "s0.svs", "-o", out, "--tile-size", "64", "-q", flag, value,
          mentions=words)  # fmt: skip
    assert not out.exists() and not leftovers(tmp_path)


# --- slide lists ------------------------------------------------------------------------
def test_symlink_loop_is_a_clear_error(slides: Path, tmp_path: Path) -> None:
    (tmp_path / "a.svs").symlink_to(tmp_path / "b.svs")
    (tmp_path / "b.svs").symlink_to(tmp_path / "a.svs")
    for extra in ([], ["--skip-errors"]):
        fails("tile", tmp_path / "a.svs", slides / "s0.svs", "-o", tmp_path / "t.h5", *TILE,
              *extra, mentions=("a.svs", "symlink loop"))  # fmt: skip
    assert no_store_slides(tmp_path / "t.h5")


def test_csv_listing_a_slide_twice_tiles_it_once(slides: Path, tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{slides / 's0.svs'},0.5\n{slides / 's0.svs'},0.5\n")
    text = succeeds("tile", table, "-o", tmp_path / "t.h5", "--dry-run", *TILE)
    assert "from 1 slide(s)" in text and "1 tiled" in text, text
    assert TileStore(tmp_path / "t.h5").slides == ["s0"]
    report = json.loads((tmp_path / "t.h5.report.json").read_text())
    assert len(report["slides"]) == 1
    # The same slide twice with two different mpp values is ambiguous: refused.
    table.write_text(f"path,mpp\n{slides / 's0.svs'},0.5\n{slides / 's0.svs'},0.4\n")
    fails("tile", table, "-o", tmp_path / "u.h5", *TILE, mentions=("s0.svs", "listed twice"))


def test_csv_with_a_byte_order_mark(slides: Path, tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    # Excel's "CSV UTF-8" starts with a BOM, which used to hide the 'path' column.
    table.write_bytes(b"\xef\xbb\xbf" + f"path,mpp\n{slides / 's1.svs'},0.5\n".encode())
    succeeds("tile", table, "-o", tmp_path / "t.h5", "--dry-run", *TILE)
    assert TileStore(tmp_path / "t.h5").slides == ["s1"]


@pytest.mark.parametrize("mpp", ["inf", "nan", "1e300"])
def test_csv_absurd_mpp(slides: Path, tmp_path: Path, mpp: str) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{slides / 's0.svs'},{mpp}\n")
    text = fails("tile", table, "-o", tmp_path / "t.h5", *TILE, mentions=("slides.csv:2", "mpp"))
    assert ">= inf" not in text
    assert not (tmp_path / "t.h5").exists()
    fails("tile", slides / "s0.svs", "--slide-mpp", mpp, "-o", tmp_path / "t.h5", *TILE,
          mentions=("--slide-mpp", "mpp"))  # fmt: skip
