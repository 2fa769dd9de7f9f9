"""Output files follow the user's umask (a group share or another account can read them).

Each case sets the umask in-process (restored after) and checks the mode of every file a
command wrote: 0644 under umask 022, 0600 under 077.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.predict import PredictParams, predict_run
from histoduo.runtime.files import atomic_path, atomic_write, atomic_write_text
from histoduo.slide.sources import SlideSource
from histoduo.tiling import TilingParams, tile_slides

EXPECTED = {0o022: 0o644, 0o077: 0o600}


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def file_modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(level0_width=1024, level0_height=1024, mpp=0.5, seed=5)
    folder = tmp_path_factory.mktemp("modes_slide")
    return write_synthetic_slide(folder / "modes.svs", spec, workers=1).path


@pytest.mark.parametrize("mask", sorted(EXPECTED))
def test_atomic_writers_follow_umask(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        atomic_write_text(tmp_path / "a.txt", "text")
        with atomic_write(tmp_path / "b.bin", "wb") as handle:
            handle.write(b"\0")
        with atomic_path(tmp_path / "c.dat") as tmp:
            tmp.write_bytes(b"library-written")
    modes = file_modes(tmp_path)
    assert sorted(modes) == ["a.txt", "b.bin", "c.dat"]  # no temporary file left behind
    assert set(modes.values()) == {EXPECTED[mask]}


@pytest.mark.parametrize("mask", sorted(EXPECTED))
def test_tissue_outputs_follow_umask(small_slide: Path, tmp_path: Path, mask: int) -> None:
    out = tmp_path / "tissue"
    with umask(mask):
        result = CliRunner().invoke(app, ["tissue", str(small_slide), "--out", str(out)])
    assert result.exit_code == 0, result.output
    modes = file_modes(out)
    assert sorted(modes) == ["modes_mask.png", "modes_overlay.png", "modes_tissue.geojson"]
    assert set(modes.values()) == {EXPECTED[mask]}, modes


@pytest.mark.parametrize("mask", sorted(EXPECTED))
def test_predict_outputs_follow_umask(small_slide: Path, tmp_path: Path, mask: int) -> None:
    from test_predict import make_checkpoint

    out = tmp_path / "predict"
    with umask(mask):
        checkpoint = make_checkpoint(tmp_path / "ckpt" / "tiny.pt")
        params = PredictParams(heatmap=True, workers=0, thumbnail_max_px=256)
        predict_run(checkpoint, out, params, sources=[SlideSource(small_slide)])
    modes = file_modes(out)
    for name in ("tiles.csv", "scores.npz", "tiles.geojson", "tissue.geojson", "summary.json"):
        assert f"modes/{name}" in modes
    assert any(name.endswith(".png") for name in modes)
    assert "slides.csv" in modes and "manifest.json" in modes
    assert set(modes.values()) == {EXPECTED[mask]}, modes
    assert stat.S_IMODE(checkpoint.stat().st_mode) == EXPECTED[mask]


@pytest.mark.parametrize("mask", sorted(EXPECTED))
def test_tile_store_and_reports_follow_umask(small_slide: Path, tmp_path: Path, mask: int) -> None:
    out = tmp_path / "tiles"
    out.mkdir()
    with umask(mask):
        params = TilingParams(target_mpp=1.0, tile_size_px=64)
        tile_slides([SlideSource(small_slide)], out / "t.h5", params, workers=0, progress=False)
    modes = file_modes(out)
    name = small_slide.stem
    assert sorted(modes) == [
        "t.h5",
        f"t.h5.d/clam/patches/{name}.h5",  # the slide file and its TRIDENT twin (format 2)
        f"t.h5.d/trident/patches/{name}_patches.h5",
        "t.h5.report.csv",
        "t.h5.report.json",
    ]
    assert set(modes.values()) == {EXPECTED[mask]}, modes
