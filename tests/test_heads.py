"""Heads on cached features: train, evaluate, and predict slides through their encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histoduo.models import ModelConfig
from histoduo.models.checkpoint import CheckpointError, load_checkpoint, load_model
from histoduo.models.encoders import EncoderSpec, create_trunk, register_encoder
from histoduo.predict import PredictParams, predict_run
from histoduo.predict.embed import EmbedParams, embed_store
from histoduo.training import LabelError, TrainConfig, evaluate, train

SPEC = EncoderSpec(
    name="test-heads-vit",
    timm_name="vit_small_patch16_224",
    timm_kwargs={
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 0,
    },
    embedding_dim=32,
    input_size_px=32,
    mpp=1.0,
)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, labelled_slides):  # noqa: ANN001, ANN201
    """Five labelled synthetic slides (1 um/px, 64 px), embedded by a tiny random ViT."""
    from safetensors.torch import save_file

    from histoduo.synthetic import DEFAULT_CLASSES
    from histoduo.tiling import TilingParams, tile_slides

    register_encoder(SPEC, replace=True)
    folder = tmp_path_factory.mktemp("heads")
    sources, annotations = labelled_slides
    store = folder / "tiles.h5"
    tile_slides(
        sources, store, TilingParams(target_mpp=1.0, tile_size_px=64),
        annotations_dir=annotations, class_names=list(DEFAULT_CLASSES), labelled_only=True,
        workers=0, progress=False,
    )  # fmt: skip
    torch.manual_seed(0)
    weights = folder / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_trunk(SPEC).state_dict().items()}, str(weights))
    params = EmbedParams(encoder=SPEC.name, weights=str(weights), workers=0, quiet=True)
    result = embed_store(store, folder / "feats", params)
    return store, weights, result.features_dir, folder


def _config(features_dir: Path, **changes: object) -> TrainConfig:
    settings: dict = dict(
        epochs=3, iterations_per_epoch=10, batch_size=32, lr=3e-3, num_workers=0, seed=0
    )
    settings.update(changes)
    return TrainConfig(features_dir=str(features_dir), **settings)


def test_linear_head_trains_evaluates_and_predicts_slides(embedded, tmp_path: Path) -> None:  # noqa: ANN001
    store, weights, features_dir, _ = embedded
    result = train(
        store,
        tmp_path / "run",
        _config(features_dir),
        model_config=ModelConfig(arch="linear"),
        progress=False,
    )
    run = result.run_dir
    for name in ("best.pt", "last.pt", "splits.csv", "metrics.csv", "report.json"):
        assert (run / name).exists(), name
    report = json.loads((run / "report.json").read_text())
    assert report["val_balanced_accuracy"] > 0.4  # chance is 0.25 on four classes
    meta = load_checkpoint(run / "best.pt")["meta"]
    config = meta["model_config"]
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (config["arch"], config["encoder"], config["features_dim"]) == ("linear", SPEC.name, 32)
    assert config["encoder_weights_sha256"] == digest
    assert (meta["input_size_px"], meta["tile_size_px"], meta["target_mpp"]) == (32, 64, 1.0)

    # evaluate reads the features again: the test split gives report.json's numbers
    again = evaluate(store, run / "best.pt", "test", features_dir=features_dir, device="cpu")
    assert again["balanced_accuracy"] == pytest.approx(report["test_balanced_accuracy"])
    with pytest.raises(LabelError, match="--features"):
        evaluate(store, run / "best.pt", device="cpu")

    # predict on tiles: encoder (from the user's weights) + head = the head on the features
    out = tmp_path / "pred"
    params = PredictParams(workers=0, heatmap=False, encoder_weights=str(weights), device="cpu")
    predicted = predict_run(run / "best.pt", out, params, tiles_store=store)
    assert {o.status for o in predicted.outcomes} == {"done"}
    head, _ = load_model(run / "best.pt")
    from histoduo.store.features import feature_file_path, read_feature_bag

    slide = predicted.outcomes[0].slide
    scores = np.load(out / slide / "scores.npz")
    bag = read_feature_bag(feature_file_path(features_dir, slide))
    order = {tuple(xy): i for i, xy in enumerate(bag.coords)}
    rows = [order[tuple(xy)] for xy in scores["coords"]]
    with torch.no_grad():
        expected = head(torch.from_numpy(bag.features[rows])).softmax(1).numpy()
    np.testing.assert_allclose(scores["probs"], expected, atol=5e-3)

    # another weights file, or none: refused before any tile is read
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in create_trunk(SPEC).state_dict().items()}, str(other))
    with pytest.raises(CheckpointError, match="sha256 .* is not the"):
        predict_run(
            run / "best.pt", tmp_path / "p2", PredictParams(encoder_weights=str(other)),
            tiles_store=store,
        )  # fmt: skip
    with pytest.raises(CheckpointError, match="--encoder-weights"):
        predict_run(run / "best.pt", tmp_path / "p3", PredictParams(), tiles_store=store)
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p3").exists()


def test_mlp_head_from_the_command_line(embedded, tmp_path: Path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from histoduo.cli import app

    store, weights, features_dir, _ = embedded
    run = tmp_path / "mlp"
    common = ["--epochs", "1", "--iterations", "5", "--workers", "0", "--quiet"]
    result = CliRunner().invoke(
        app,
        ["train", str(store), "--out", str(run), "--features", str(features_dir),
         "--architecture", "mlp", "--hidden-dim", "16", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model, _ = load_model(run / "best.pt")
    assert model.head.in_features == 16
    result = CliRunner().invoke(
        app, ["evaluate", str(store), "--model", str(run / "best.pt"), "--features",
              str(features_dir), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_tiles"] > 100
    # a tile architecture on features, and a head without its encoder: clear errors
    result = CliRunner().invoke(
        app, ["train", str(store), "--out", str(tmp_path / "x"), "--features",
              str(features_dir), *common],
    )  # fmt: skip
    assert result.exit_code == 1 and "--architecture linear or mlp" in result.output
    result = CliRunner().invoke(
        app, ["predict", "--tiles", str(store), "--model", str(run / "best.pt"), "--out",
              str(tmp_path / "p")],
    )  # fmt: skip
    assert result.exit_code == 1 and "--encoder-weights" in result.output
    assert "Traceback" not in result.output


def test_duoformer_on_the_vit_trains_resumes_and_keeps_its_weights_out(
    embedded, tmp_path: Path
) -> None:  # noqa: ANN001
    from safetensors import safe_open

    store, weights, _, _ = embedded
    config = ModelConfig(
        arch="duoformer", backbone=SPEC.name, backbone_weights=str(weights), num_classes=4,
        input_size_px=32, patch_size_px=16, embed_dim=32, scale_depth=1, patch_depth=1,
        scale_heads=2, patch_heads=2, patch_block="prenorm",
    )  # fmt: skip
    settings = dict(iterations_per_epoch=2, batch_size=8, num_workers=0, seed=0, scheduler="none")
    run = tmp_path / "duo"
    train(store, run, TrainConfig(epochs=1, **settings), model_config=config, progress=False)
    result = train(
        store, run, TrainConfig(epochs=2, **settings), model_config=config, resume=True,
        progress=False,
    )  # fmt: skip
    assert json.loads((run / "report.json").read_text())["epochs_run"] == 2
    for name in ("best.pt", "last.pt"):
        with safe_open(str(run / name), "pt") as f:
            keys = list(f.keys())
        assert keys and not any(".backbone.trunk." in k for k in keys), name
    meta = load_checkpoint(result.best_checkpoint)["meta"]["model_config"]
    assert meta["encoder_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    model, _ = load_model(result.best_checkpoint, encoder_weights=weights)
    assert model.backbone.weights_sha256 == meta["encoder_weights_sha256"]
