"""``histoduo model-info`` from flags and from a checkpoint."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.models import ModelConfig
from histoduo.models.checkpoint import CheckpointMeta, save_checkpoint

SMALL = [
    "--backbone", "resnet18", "--embed-dim", "32", "--scale-depth", "1", "--patch-depth", "1",
    "--scale-heads", "2", "--patch-heads", "2", "--input-size", "64",
]  # fmt: skip


def test_model_info_flags_json() -> None:
    result = CliRunner().invoke(app, ["model-info", *SMALL, "--json", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["info"]["tokens_per_patch"] == 86
    assert data["info"]["activation_bytes"] > 0
    assert data["config"]["backbone"] == "resnet18"


def test_model_info_checkpoint_table(tmp_path) -> None:
    config = ModelConfig(arch="hybrid", backbone="resnet18", embed_dim=32, patch_depth=1,
                         patch_heads=2, input_size_px=64)  # fmt: skip
    meta = CheckpointMeta(
        model_config=config.to_dict(), class_names=["a", "b", "c"], class_roles={},
        target_mpp=0.5, tile_size_px=64, input_size_px=64, mean=[0.5] * 3, std=[0.25] * 3,
    )  # fmt: skip
    path = save_checkpoint(tmp_path / "model.pt", {}, meta)
    result = CliRunner().invoke(app, ["model-info", "--model", str(path), "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "hybrid" in result.output and "GFLOPs" in result.output


def test_model_info_rejects_a_foreign_checkpoint(tmp_path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    result = CliRunner().invoke(app, ["model-info", "--model", str(path), "--no-memory"])
    assert result.exit_code == 1
    assert "not a histoduo checkpoint" in " ".join(result.output.split())


def test_model_info_invalid_config_fails_cleanly() -> None:
    result = CliRunner().invoke(app, ["model-info", *SMALL, "--patch-size", "24"])
    assert result.exit_code == 1
    assert "not a multiple" in result.output


def test_architecture_flag_and_its_deprecated_spellings(tmp_path) -> None:
    """--architecture picks the model; --arch still works for a release, with a warning;
    --model on model-info is a checkpoint (as on predict and evaluate)."""
    runner = CliRunner()
    args = ["model-info", *SMALL, "--json", "--no-memory"]
    new = runner.invoke(app, [*args, "--architecture", "resnet"])
    assert new.exit_code == 0, new.output
    assert json.loads(new.stdout)["config"]["arch"] == "resnet"
    old = runner.invoke(app, [*args, "--arch", "resnet"])
    assert old.exit_code == 0, old.output
    assert json.loads(old.stdout)["config"]["arch"] == "resnet"
    assert "deprecated" in old.stderr and "--architecture resnet" in old.stderr
    as_checkpoint = runner.invoke(app, [*args, "--model", str(tmp_path / "missing.pt")])
    assert as_checkpoint.exit_code == 1
    assert "missing.pt" in as_checkpoint.output


def test_train_model_flag_means_a_checkpoint_now() -> None:
    """`train --model duoformer` keeps working (warned); a checkpoint-like value is refused with
    the new flag named, before any work."""
    import typer

    from histoduo.cli._model_options import resolve_architecture

    assert resolve_architecture("duoformer", None) == "duoformer"
    assert resolve_architecture("duoformer", "hybrid") == "hybrid"
    with pytest.raises(typer.Exit):
        resolve_architecture("duoformer", "runs/x/best.pt")
