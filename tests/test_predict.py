"""``predict`` outputs, resume, errors, tile-store mode and a real Aperio slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.predict import PredictParams, predict_run
from histoduo.runtime.exitcodes import EXIT_SOME_FAILED
from histoduo.slide.sources import SlideSource

CLASSES = ["normal", "low_grade", "high_grade", "necrosis"]


def make_checkpoint(
    path: Path,
    target_mpp: float = 1.0,
    seed: int = 0,
    display_names: dict[str, str] | None = None,
) -> Path:
    """A tiny random (chance-level) DuoFormer checkpoint (64 px tiles at ``target_mpp``)."""
    import torch

    from histoduo.grading import ClassRoles
    from histoduo.models import ModelConfig, build_model
    from histoduo.models.checkpoint import CheckpointMeta, save_checkpoint

    torch.manual_seed(seed)
    config = ModelConfig(
        arch="duoformer",
        backbone="resnet18",
        input_size_px=64,
        patch_size_px=32,
        embed_dim=32,
        scale_depth=1,
        patch_depth=1,
        scale_heads=2,
        patch_heads=2,
        num_classes=len(CLASSES),
    )
    meta = CheckpointMeta(
        model_config=config.to_dict(),
        class_names=CLASSES,
        class_roles=ClassRoles.infer(CLASSES).to_dict(),
        target_mpp=target_mpp,
        tile_size_px=64,
        input_size_px=64,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        class_display_names=dict(display_names or {}),
    )
    return save_checkpoint(path, build_model(config).state_dict(), meta)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, svs_slide) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("predict")
    params = PredictParams(heatmap=True, workers=0, thumbnail_max_px=512)
    predict_run(checkpoint, out, params, sources=[SlideSource(svs_slide.path)])
    return out


def test_tiles_csv_and_scores(run_dir: Path, svs_slide) -> None:  # noqa: ANN001
    slide_dir = run_dir / "svs_a"
    assert (slide_dir / "done").exists()
    with (slide_dir / "tiles.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) > 10
    for row in rows:
        assert row["slide"] == "svs_a" and row["pred"] in CLASSES
        assert row["pred_display_name"] == row["pred"].replace("_", " ").capitalize()
        # 64 px at 1 um/px = 64 um of tissue = 256 level-0 px at 0.25 um/px
        assert int(row["width_level0_px"]) == int(row["height_level0_px"]) == 256
        assert int(row["tile_size_px"]) == 64
        assert float(row["tile_mpp"]) == pytest.approx(1.0)
        assert float(row["tile_width_um"]) == pytest.approx(64.0)
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-3)
        assert 0.25 <= float(row["tissue_fraction"]) <= 1.0
        assert 0 <= int(row["x_level0_px"]) <= 3072 - 256
        assert 0 <= int(row["y_level0_px"]) <= 2048 - 256
    scores = np.load(slide_dir / "scores.npz")
    assert scores["probs"].shape == (len(rows), 4)
    assert scores["coords"].dtype == np.int64
    assert list(scores["class_names"]) == CLASSES
    assert scores["tissue_mask"].any()


def test_geojson_level0_inside_slide(run_dir: Path) -> None:
    tiles = json.loads((run_dir / "svs_a" / "tiles.geojson").read_text())
    assert tiles["type"] == "FeatureCollection" and tiles["features"]
    for feature in tiles["features"]:
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"] in CLASSES
        assert len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {f"prob_{c}" for c in CLASSES}
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert ring[0].tolist() == ring[-1].tolist()
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 3072
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= 2048
        assert ring[:, 0].max() - ring[:, 0].min() == 256
    tissue = json.loads((run_dir / "svs_a" / "tissue.geojson").read_text())
    assert tissue["features"][0]["properties"]["objectType"] == "annotation"


def test_heatmap_png_size_and_tissue_only(run_dir: Path) -> None:
    from histoduo.results.maps import HeatmapStyle, class_map, mask_on_canvas
    from histoduo.results.scores import SlideScores

    scores = SlideScores.load(run_dir / "svs_a" / "scores.npz")
    thumbnail = scores.thumbnail
    overlay = class_map(scores, HeatmapStyle()).overlay  # what class_overlay.png shows
    assert overlay.shape == thumbnail.shape
    changed = (overlay != thumbnail).any(axis=2)
    # Resample the tissue mask onto the thumbnail: colour never leaves the tissue.
    inside = mask_on_canvas(scores, scores.thumbnail_downsample, thumbnail.shape[:2])
    assert changed.any() and not (changed & ~inside).any()
    assert scores.grade_classes == ["low_grade", "high_grade"]
    assert scores.display_names == ["Normal", "Low grade", "High grade", "Necrosis"]
    names = ["thumbnail", "class_overlay", "class_map", "grade_map"] + [
        f"prob_{c}" for c in CLASSES
    ]
    for name in names:
        assert max(Image.open(run_dir / "svs_a" / f"{name}.png").size) >= 800


def test_run_level_reports(run_dir: Path) -> None:
    with (run_dir / "slides.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "done" and int(row["tiles"]) > 10
    assert float(row["tissue_area_mm2"]) > 0
    assert row["call"] in ("low_grade", "high_grade", "no tumour")
    assert 0 <= float(row["confidence"]) <= 1
    assert sum(float(row[f"fraction_{c}"]) for c in CLASSES) == pytest.approx(1.0)
    assert len(set(rows[0])) == len(rows[0])  # no column twice
    assert "normal_fraction" not in row and "necrosis_fraction" not in row
    assert float(row["tile_mpp"]) == float(row["model_mpp"]) == 1.0
    assert float(row["slide_mpp"]) == pytest.approx(0.25)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["torch_version"] and manifest["histoduo_version"]
    assert manifest["checkpoint"]["class_names"] == CLASSES
    assert manifest["params"]["grade"]["min_grade_fraction"] == 0.05
    assert manifest["slides"][0]["status"] == "done"


def test_rerun_skips_and_interrupted_resumes(
    tmp_path: Path,
    checkpoint: Path,
    svs_slide,  # noqa: ANN001
    svs_slide_b,  # noqa: ANN001
) -> None:
    params = PredictParams(workers=1, thumbnail_max_px=256)
    sources = [SlideSource(svs_slide.path), SlideSource(svs_slide_b.path)]
    first = predict_run(checkpoint, tmp_path, params, sources=sources)
    assert [o.status for o in first.outcomes] == ["done", "done"]
    # Interrupt slide b: no done marker, a truncated file left behind.
    (tmp_path / "svs_b" / "done").unlink()
    (tmp_path / "svs_b" / "tiles.csv").write_text("slide,x\n")
    again = predict_run(checkpoint, tmp_path, params, sources=sources)
    assert [o.status for o in again.outcomes] == ["skipped", "done"]
    assert len((tmp_path / "svs_b" / "tiles.csv").read_text().splitlines()) > 10
    with (tmp_path / "slides.csv").open() as handle:
        assert [r["slide"] for r in csv.DictReader(handle)] == ["svs_a", "svs_b"]


def test_shards_accumulate(tmp_path: Path, checkpoint: Path, svs_slide, svs_slide_b) -> None:  # noqa: ANN001
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(svs_slide.path),
            str(svs_slide_b.path),
            "--model",
            str(checkpoint),
            "--out",
            str(tmp_path),
            "--workers",
            "0",
            "--shard",
            "1/2",
            "--stride",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(svs_slide.path),
            str(svs_slide_b.path),
            "--model",
            str(checkpoint),
            "--out",
            str(tmp_path),
            "--workers",
            "0",
            "--shard",
            "2/2",
            "--stride",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    with (tmp_path / "slides.csv").open() as handle:
        assert sorted(r["slide"] for r in csv.DictReader(handle)) == ["svs_a", "svs_b"]
    assert len(list(tmp_path.glob("manifest.shard-*-of-2.json"))) == 2
    summary = json.loads((tmp_path / "svs_a" / "summary.json").read_text())
    assert summary["stride_level0"] == 128 and summary["tile_size_level0"] == 256


def test_not_a_checkpoint_fails_clearly(tmp_path: Path, svs_slide) -> None:  # noqa: ANN001
    bogus = tmp_path / "weights.pt"
    import torch

    torch.save({"state_dict": {}}, bogus)
    result = CliRunner().invoke(
        app, ["predict", str(svs_slide.path), "--model", str(bogus), "--out", str(tmp_path)]
    )
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "weights.pt" in text and "not a histoduo checkpoint" in text


def test_no_mpp_and_no_tissue_fail_clearly(
    tmp_path: Path,
    checkpoint: Path,
    no_mpp_slide,  # noqa: ANN001
    svs_slide,  # noqa: ANN001
) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((512, 512, 3), 245, dtype=np.uint8)).save(blank)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", str(no_mpp_slide.path), "--model", str(checkpoint), "--out", str(out)]
    )
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "nompp.svs" in text and "--slide-mpp" in text
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(blank),
            str(no_mpp_slide.path),
            str(svs_slide.path),
            "--model",
            str(checkpoint),
            "--out",
            str(out),
            "--slide-mpp",
            "0.25",
            "--workers",
            "0",
            "--skip-errors",
        ],
    )
    assert result.exit_code == EXIT_SOME_FAILED  # some slides failed, the rest went on
    text = " ".join(result.output.split())
    assert "blank.png" in text and "no tissue" in text
    with (out / "slides.csv").open() as handle:
        status = {r["slide"]: r["status"] for r in csv.DictReader(handle)}
    assert status == {"blank": "no_tissue", "nompp": "done", "svs_a": "done"}


def test_tile_store_mode(tmp_path: Path, checkpoint: Path, svs_slide) -> None:  # noqa: ANN001
    from histoduo.tiling import TilingParams, tile_slides

    store = tmp_path / "tiles.h5"
    tile_slides(
        [SlideSource(svs_slide.path)],
        store,
        TilingParams(target_mpp=1.0, tile_size_px=64),
        workers=0,
        progress=False,
    )
    out = tmp_path / "out"
    report = predict_run(checkpoint, out, PredictParams(workers=1, heatmap=True), tiles_store=store)
    assert [o.status for o in report.outcomes] == ["done"]
    with (out / "svs_a" / "tiles.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == report.outcomes[0].n_tiles
    assert (out / "svs_a" / "class_map.png").exists()


def test_real_aperio_slide(tmp_path: Path, real_slide: Path, checkpoint: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(real_slide),
            "--model",
            str(checkpoint),
            "--out",
            str(out),
            "--heatmap",
            "--workers",
            "1",
            "--tta",
        ],
    )
    assert result.exit_code == 0, result.output
    slide_dir = out / "CMU-1-Small-Region"
    assert (slide_dir / "done").exists()
    summary = json.loads((slide_dir / "summary.json").read_text())
    assert summary["slide_mpp"] == pytest.approx(0.499, abs=1e-3)
    assert summary["n_tiles"] > 5
    tiles = json.loads((slide_dir / "tiles.geojson").read_text())["features"]
    xs = np.array([f["geometry"]["coordinates"][0] for f in tiles])[..., 0]
    assert xs.max() <= 2220
