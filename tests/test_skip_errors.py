"""One meaning of --skip-errors: go on past any per-slide failure, record it, finish every
table, and exit with EXIT_SOME_FAILED (3) so a scheduler sees the failure."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.exitcodes import EXIT_ERROR, EXIT_SOME_FAILED
from histoduo.runtime.slides import run_slides


def _loop(skip_errors: bool, exc: Exception) -> tuple[list[str], list[tuple[str, str]]]:
    done: list[str] = []
    failed: list[tuple[str, str]] = []

    def process(item: str) -> None:
        if item == "b":
            raise exc
        done.append(item)

    error = run_slides(
        ["a", "b", "c"],
        process=process,
        failed=lambda item, e, status, s: failed.append((item, status)),
        skip_errors=skip_errors,
        errors=(HistoduoError,),
    )
    assert (error is None) == (skip_errors or not failed)
    return done, failed


def test_the_loop_goes_on_past_any_failure_with_skip_errors() -> None:
    assert EXIT_SOME_FAILED not in (0, EXIT_ERROR, 2)  # 2: the option parser's usage error
    assert _loop(True, OSError("disk full while drawing maps")) == (["a", "c"], [("b", "error")])
    assert _loop(True, HistoduoError("b.svs", "bad")) == (["a", "c"], [("b", "error")])
    # without it: a typed error stops the run (recorded); anything else is a bug and raises
    assert _loop(False, HistoduoError("b.svs", "bad")) == (["a"], [("b", "error")])
    with pytest.raises(OSError):
        _loop(False, OSError("boom"))


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(level0_width=1024, level0_height=768, mpp=0.5, seed=5)
    path = tmp_path_factory.mktemp("skip") / "good.svs"
    write_synthetic_slide(path, spec, workers=1)
    return path


@pytest.fixture()
def slides(small_slide: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "good.svs").symlink_to(small_slide)
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    return folder


@pytest.mark.parametrize("command", ["tile", "tissue"])
def test_tile_and_tissue_exit_3_after_skipped_slides(
    command: str, slides: Path, tmp_path: Path
) -> None:
    out = tmp_path / ("tiles.h5" if command == "tile" else "masks")
    args = [command, str(slides), "--out", str(out)]
    if command == "tile":
        args += ["--mpp", "2.0", "--tile-size", "64", "--workers", "0", "--quiet"]
    stopped = CliRunner().invoke(app, args)
    assert stopped.exit_code == EXIT_ERROR, stopped.output
    result = CliRunner().invoke(app, [*args, "--skip-errors"])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "broken.svs" in result.output
    if command == "tile":  # the good slide is in the store; the report lists the bad one
        report = json.loads(Path(f"{out}.report.json").read_text())
        status = {Path(r["path"]).name: r["status"] for r in report["slides"]}
        assert status == {"good.svs": "done", "broken.svs": "error"}
    else:
        assert (out / "good_mask.png").exists()


def test_predict_goes_on_past_an_oserror_and_finishes_its_tables(
    small_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError while drawing one slide's maps once aborted the run before slides.csv and
    the manifest; with --skip-errors it is that slide's recorded failure."""
    from histoduo.predict import run as predict_run_module
    from tests.test_predict import make_checkpoint

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("one", "two"):  # copies: links to one file would be one slide
        shutil.copyfile(small_slide, folder / f"{name}.svs")
    checkpoint = make_checkpoint(tmp_path / "tiny.pt", target_mpp=2.0)
    original = predict_run_module.write_slide_outputs

    def full_disk(slide_dir: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if slide_dir.name.lstrip(".").startswith("one."):  # its staging folder
            raise OSError(28, "No space left on device")
        return original(slide_dir, *args, **kwargs)

    monkeypatch.setattr(predict_run_module, "write_slide_outputs", full_disk)
    out = tmp_path / "out"
    args = ["predict", str(folder), "--model", str(checkpoint), "--out", str(out)]
    args += ["--workers", "0", "--no-heatmap", "--skip-errors", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    status = {s["slide"]: (s["status"], s.get("error") or "") for s in manifest["slides"]}
    assert status["two"][0] == "done"
    assert status["one"][0] == "error" and "No space left" in status["one"][1]
    assert "two" in (out / "slides.csv").read_text()


def _options_of(command: str) -> set[str]:
    group = typer.main.get_command(app)
    return {opt for p in group.commands[command].params for opt in getattr(p, "opts", [])}


def test_no_tissue_advice_names_options_that_exist() -> None:
    import numpy as np

    from histoduo.predict.scoring import NO_TISSUE_HINT as PREDICT_HINT
    from histoduo.tiling.run import NO_TISSUE_HINT as TILE_HINT
    from histoduo.tissue import TissueMask, require_tissue

    empty = TissueMask(np.zeros((4, 4), bool), 16.0, np.zeros((4, 4, 3), np.uint8), 0.5)
    with pytest.raises(HistoduoError) as tissue_error:
        require_tissue(empty, "x.svs")
    for command, text in [("tile", TILE_HINT), ("predict", PREDICT_HINT),
                          ("tissue", str(tissue_error.value))]:  # fmt: skip
        # "`histoduo other` (--its-options)" names another command's options
        for other, inner in re.findall(r"`histoduo (\w+)` \(([^)]*)\)", text):
            found = set(re.findall(r"--[a-z][a-z0-9-]+", inner))
            assert found <= _options_of(other), (other, found - _options_of(other))
        own_text = re.sub(r"`histoduo \w+` \([^)]*\)", "", text)
        named = set(re.findall(r"--[a-z][a-z0-9-]+", own_text))
        assert named, text
        assert named <= _options_of(command), (command, named - _options_of(command))
    assert "--min-tissue" not in TILE_HINT  # it filters tiles; it finds no tissue


def test_import_exits_3_after_leaving_out_an_image(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("benign", "tumour"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"img{i}.png")
    (tmp_path / "images" / "tumour" / "broken.png").write_bytes(b"\x89PNG truncated")
    args = ["import", str(tmp_path / "images"), "--out", str(tmp_path / "t.h5"), "--mpp", "0.5"]
    args += ["--workers", "0", "--quiet"]
    stopped = CliRunner().invoke(app, args)
    assert stopped.exit_code == EXIT_ERROR, stopped.output
    result = CliRunner().invoke(app, [*args, "--skip-errors"])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    report = json.loads((tmp_path / "t.h5.report.json").read_text())
    assert [s["image"] for s in report["skipped"]] == ["tumour/broken.png"]
