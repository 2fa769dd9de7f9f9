"""Maps from saved scores, without a model: sizes, tissue-only colour, averaging, redraw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoduo.heatmap import (
    HeatmapStyle,
    SlideScores,
    class_map,
    mean_probabilities,
    redraw,
    render_slide_maps,
)

CLASSES = ["normal", "low_grade", "high_grade", "necrosis"]


def _scores(stride0: int = 100) -> SlideScores:
    """A 1000 x 800 level-0 slide, thumbnail at downsample 10 (100 x 80), tissue = left half."""
    size0 = 100
    xs, ys = np.meshgrid(np.arange(0, 901, stride0), np.arange(0, 701, stride0))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    probs = np.zeros((len(coords), 4), dtype=np.float32)
    probs[:, 1] = 0.7  # low grade everywhere ...
    probs[:, 0] = 0.3
    high = coords[:, 1] < 400
    probs[high] = [0.1, 0.2, 0.7, 0.0]  # ... high grade in the top half
    mask = np.zeros((40, 50), dtype=bool)  # mask at downsample 20
    mask[:, :25] = True
    thumbnail = np.full((80, 100, 3), 230, dtype=np.uint8)
    return SlideScores(
        slide="toy",
        probs=probs,
        coords=coords,
        tissue_fraction=np.ones(len(coords), dtype=np.float32),
        tile_size_level0=size0,
        stride_level0=stride0,
        class_names=CLASSES,
        class_colors=np.array([[60, 160, 220], [250, 200, 40], [220, 40, 40], [120, 60, 160]]),
        thumbnail=thumbnail,
        thumbnail_downsample=10.0,
        tissue_mask=mask,
        mask_downsample=20.0,
        slide_width=1000,
        slide_height=800,
        slide_mpp=0.5,
        target_mpp=0.5,
        tile_size_px=200,
    )


def test_class_map_colours_only_tissue(tmp_path: Path) -> None:
    scores = _scores()
    paths = render_slide_maps(scores, tmp_path)
    overlay = np.asarray(Image.open(paths["class_overlay"]))
    assert overlay.shape == scores.thumbnail.shape
    changed = (overlay != scores.thumbnail).any(axis=2)
    assert changed[:, :50].all() and not changed[:, 50:].any()  # tissue = left half
    # alpha 0.4 of high-grade red over grey 230 in the top half
    expected = np.round(230 * 0.6 + np.array([220, 40, 40]) * 0.4)
    assert np.abs(overlay[10, 10].astype(int) - expected).max() <= 1
    grade = np.asarray(Image.open(paths["grade_map"]))
    assert grade.shape == (13, 16, 3)  # ceil(800 / 64), ceil(1000 / 64)
    assert (grade[:, 10:] == 255).all()
    for key in ("class_map", "prob_high_grade", "prob_normal"):
        assert paths[key].exists() and Image.open(paths[key]).size[0] > 100


def test_overlapping_tiles_are_averaged() -> None:
    scores = _scores(stride0=50)
    scores.probs[:] = 0.0
    scores.probs[:, 0] = (scores.coords[:, 0] == 100).astype(np.float32)  # one column of tiles
    mean, covered = mean_probabilities(scores, 10.0, (80, 100))
    assert covered.all()
    # x in [100, 150) is covered by tiles at x=50 (p=0) and x=100 (p=1): mean 0.5
    assert mean[40, 12, 0] == pytest.approx(0.5)
    assert mean[40, 17, 0] == pytest.approx(0.5)  # x in [150, 200): tiles at 100 and 150
    assert mean[40, 22, 0] == pytest.approx(0.0)


def test_style_subset_and_colours(tmp_path: Path) -> None:
    scores = _scores()
    style = HeatmapStyle(alpha=1.0, classes=["high_grade"], colors={"high_grade": (0, 0, 255)})
    painted = class_map(scores, style)
    assert (painted.overlay[10, 10] == [0, 0, 255]).all()
    assert (painted.overlay[70, 10] == 230).all()  # low grade not painted
    with pytest.raises(ValueError):
        class_map(scores, HeatmapStyle(classes=["nope"]))


def test_redraw_cli_without_model(tmp_path: Path) -> None:
    from histoduo.cli import app

    slide_dir = tmp_path / "run" / "toy"
    slide_dir.mkdir(parents=True)
    _scores().save(slide_dir / "scores.npz")
    loaded = SlideScores.load(slide_dir / "scores.npz")
    assert loaded.class_names == CLASSES and loaded.tissue_mask.dtype == bool
    result = CliRunner().invoke(
        app,
        [
            "heatmap",
            str(tmp_path / "run"),
            "--alpha",
            "0.6",
            "--classes",
            "high_grade,low_grade",
            "--color",
            "high_grade=#0000ff",
            "--percentile",
            "99",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (slide_dir / "prob_high_grade.png").exists()
    assert not (slide_dir / "prob_normal.png").exists()
    bad = CliRunner().invoke(app, ["heatmap", str(tmp_path / "nothing")])
    assert bad.exit_code != 0
    with pytest.raises(FileNotFoundError):
        redraw(tmp_path / "nothing", HeatmapStyle())
