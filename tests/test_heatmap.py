"""Maps from saved scores, without a model: sizes, tissue-only colour, averaging, redraw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoduo.results.maps import (
    OTHER_TISSUE_RGB,
    HeatmapStyle,
    class_map,
    grade_map,
    mean_probabilities,
    render_slide_maps,
)
from histoduo.results.redraw import redraw
from histoduo.results.scores import SlideScores

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
        level0_width=1000,
        level0_height=800,
        slide_mpp=0.5,
        target_mpp=0.5,
        tile_size_px=200,
    )


def test_class_map_colours_only_tissue(tmp_path: Path) -> None:
    scores = _scores()
    overlay = class_map(scores, HeatmapStyle()).overlay  # the pixels class_overlay.png shows
    assert overlay.shape == scores.thumbnail.shape
    changed = (overlay != scores.thumbnail).any(axis=2)
    assert changed[:, :50].all() and not changed[:, 50:].any()  # tissue = left half
    # alpha 0.4 of high-grade red over grey 230 in the top half
    expected = np.round(230 * 0.6 + np.array([220, 40, 40]) * 0.4)
    assert np.abs(overlay[10, 10].astype(int) - expected).max() <= 1
    grade = grade_map(scores, HeatmapStyle())
    assert grade.shape == (13, 16, 3)  # ceil(800 / 64), ceil(1000 / 64)
    assert (grade[:, 10:] == 255).all()
    assert (grade[2, 2] == [220, 40, 40]).all()  # no grade classes recorded: all classes


def test_grade_map_paints_only_grades() -> None:
    scores = _scores()
    scores.grade_classes = ["high_grade"]  # low grade becomes "other tissue"
    grade = grade_map(scores, HeatmapStyle())
    assert (grade[2, 2] == [220, 40, 40]).all()
    assert (grade[10, 2] == OTHER_TISSUE_RGB).all()
    assert (grade[:, 10:] == 255).all()


def test_every_map_is_a_labelled_figure(tmp_path: Path) -> None:
    """Titles, keys and scale bars are drawn: each PNG is large and differs from the bare map."""
    scores = _scores()
    scores.class_display_names = ["Benign", "ISUP grade 1-2", "ISUP grade 3-4", "Necrosis"]
    paths = render_slide_maps(scores, tmp_path)
    expected = {"thumbnail", "class_overlay", "class_map", "grade_map"}
    expected |= {f"prob_{c}" for c in CLASSES}
    assert set(paths) == expected
    for path in paths.values():
        image = np.asarray(Image.open(path).convert("RGB"))
        assert max(image.shape[:2]) >= 800  # the 100 x 80 px canvas enlarged
        # Black ink (title, scale bar, legend text) exists: the bare maps have none.
        assert ((image < 40).all(axis=2)).sum() > 200


def test_scale_bar_lengths() -> None:
    from histoduo.results.figures import format_length, nice_length_um, upsample_nearest

    assert nice_length_um(500.0) == 100.0  # a fifth of 500 um
    assert nice_length_um(12_000.0) == 2000.0
    assert nice_length_um(80.0) == 10.0
    assert format_length(2000.0) == "2 mm" and format_length(50.0) == "50 µm"
    big, k = upsample_nearest(np.arange(6, dtype=np.uint8).reshape(2, 3), 800)
    assert k == 267 and big.shape == (534, 801)
    assert (big[:267, :267] == 0).all() and (big[267:, 534:] == 5).all()  # no blending


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
