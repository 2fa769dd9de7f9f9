"""``predict --slide-model``: the slide model's call beside the rule's, in slides.csv and the
report, with an attention map per slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_predict import make_checkpoint  # the tiny tile model of the predict tests

from histoduo.predict import PredictParams, predict_run
from histoduo.slide import SlideError
from histoduo.slide.sources import SlideSource

DIM = 16


def make_slide_model(path: Path, seed: int = 0) -> Path:
    """An untrained (seeded) ABMIL checkpoint on 16-d features of the encoder "synthetic"."""
    import torch

    from histoduo.grading import ClassRoles
    from histoduo.models.checkpoint import CheckpointMeta, save_checkpoint
    from histoduo.models.mil import MILModelConfig, build_mil_model

    torch.manual_seed(seed)
    names = ["low_grade", "high_grade"]
    config = MILModelConfig(in_dim=DIM, n_classes=2, hidden_dim=8, encoder="synthetic")
    meta = CheckpointMeta(
        model_config=config.to_dict(),
        class_names=names,
        class_roles=ClassRoles.infer(names).to_dict(),
        target_mpp=1.0,
        tile_size_px=64,
        input_size_px=64,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    return save_checkpoint(path, build_mil_model(config).state_dict(), meta)


def write_features(folder: Path, slide: str, width: int, height: int) -> Path:
    """A grid of 256 level-0 px tiles (64 px at 1 um/px on a 0.25 um/px slide)."""
    from histoduo.store.features import FeatureInfo, write_feature_file

    ys, xs = np.mgrid[0:height:256, 0:width:256]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    features = np.random.default_rng(0).standard_normal((len(coords), DIM))
    info = FeatureInfo(
        slide=slide,
        encoder="synthetic",
        embedding_dim=DIM,
        mpp=1.0,
        input_size_px=64,
        extra={"tile_size_px": 64},
    )
    return write_feature_file(folder / f"{slide}.h5", info, features, coords)


def test_predict_with_a_slide_model(tmp_path: Path, svs_slide) -> None:  # noqa: ANN001
    checkpoint = make_checkpoint(tmp_path / "tiles.pt")
    slide_model = make_slide_model(tmp_path / "mil.pt")
    features = tmp_path / "features_synthetic"
    write_features(features, "svs_a", 3072, 2048)
    out = tmp_path / "results"
    params = PredictParams(
        workers=0,
        heatmap=False,
        thumbnail_max_px=512,
        slide_model=str(slide_model),
        slide_features=str(features),
    )
    predict_run(checkpoint, out, params, sources=[SlideSource(svs_slide.path)])

    with (out / "slides.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["mil_call"] in ("low_grade", "high_grade")
    assert 0.5 <= float(row["mil_confidence"]) <= 1.0
    assert row["mil_agrees"] == str(row["mil_call"] == row["call"])
    mil = json.loads((out / "svs_a" / "mil.json").read_text())
    assert mil["mil_call"] == row["mil_call"]
    assert sum(mil["mil_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    summary = json.loads((out / "svs_a" / "summary.json").read_text())
    assert summary["mil"]["slide_model"] == str(slide_model)
    assert (out / "svs_a" / "attention_map.png").stat().st_size > 5000
    html = (out / "report.html").read_text()
    assert "Slide model call" in html and "svs_a/attention_map.png" in html
    flag = "disagrees with the rule-based call" if row["mil_agrees"] == "False" else "agrees"
    assert flag in html


def test_slide_model_without_features_for_a_slide_fails_clearly(
    tmp_path: Path,
    svs_slide,  # noqa: ANN001
) -> None:
    checkpoint = make_checkpoint(tmp_path / "tiles.pt")
    slide_model = make_slide_model(tmp_path / "mil.pt")
    (tmp_path / "features_synthetic").mkdir()
    params = PredictParams(
        workers=0,
        heatmap=False,
        thumbnail_max_px=512,
        slide_model=str(slide_model),
        slide_features=str(tmp_path / "features_synthetic"),
    )
    with pytest.raises(SlideError, match="needed by --slide-model"):
        predict_run(checkpoint, tmp_path / "r", params, sources=[SlideSource(svs_slide.path)])
    with pytest.raises(ValueError, match="--slide-features"):
        PredictParams(slide_model=str(slide_model))
