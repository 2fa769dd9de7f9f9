"""DuoFormer on a registry ViT through the simple feature pyramid (tiny ViT, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histoduo.models import ModelConfig, build_model, feature_levels
from histoduo.models.encoders import (
    EncoderSpec,
    create_trunk,
    register_encoder,
    unregister_encoder,
)
from histoduo.models.encoders.pyramid import pyramid_blocks

TINY_VIT = EncoderSpec(
    name="test-pyramid-vit",
    timm_name="vit_small_patch16_224",
    timm_kwargs={
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 4,
        "num_heads": 2,
        "num_classes": 0,
        "reg_tokens": 2,
    },
    embedding_dim=32,
    input_size_px=32,
    mean=(0.7, 0.6, 0.7),
    std=(0.2, 0.2, 0.2),
)


@pytest.fixture
def vit():
    register_encoder(TINY_VIT, replace=True)
    yield TINY_VIT
    unregister_encoder(TINY_VIT.name)


def _config(**changes: object) -> ModelConfig:
    settings: dict = dict(
        arch="duoformer",
        backbone=TINY_VIT.name,
        num_classes=3,
        input_size_px=32,
        patch_size_px=16,
        embed_dim=32,
        scale_depth=1,
        patch_depth=1,
        scale_heads=2,
        patch_heads=2,
        patch_block="prenorm",
    )
    settings.update(changes)
    return ModelConfig(**settings)


def test_pyramid_levels_follow_the_patch_size(vit) -> None:  # noqa: ANN001
    # patch 8 -> strides 2, 4, 8, 16 (1/4 .. 2 x the token grid)
    assert [(s.index, s.stride_px) for s in feature_levels(vit.name)] == [
        (0, 2),
        (1, 4),
        (2, 8),
        (3, 16),
    ]
    assert [s.stride_px for s in feature_levels("uni2-h")] == [7, 14, 28]  # patch 14
    assert [s.stride_px for s in feature_levels("gigapath")] == [4, 8, 16, 32]
    assert pyramid_blocks(24, 4) == [5, 11, 17, 23]
    assert pyramid_blocks(2, 4) == [0, 0, 1, 1]  # shallow ViTs share blocks between levels


def test_duoformer_on_vit_builds_trains_a_step_and_reports_flops(vit, tmp_path: Path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    from histoduo.models.info import model_info

    torch.manual_seed(0)
    trunk = create_trunk(vit)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(weights))
    model = build_model(_config(backbone_weights=str(weights)))
    assert model.normalization == (vit.mean, vit.std)
    vit_params = list(model.backbone.trunk.parameters())
    assert all(not p.requires_grad for p in vit_params)  # frozen by default
    torch.testing.assert_close(vit_params[0], next(iter(trunk.parameters())))
    before = [p.clone() for p in vit_params]
    trainable = [p for p in model.parameters() if p.requires_grad]
    pyramid_before = model.backbone.project[0].weight.clone()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    assert not model.backbone.trunk.training  # the frozen ViT stays in eval mode
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4) % 3)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, vit_params))
    assert not torch.equal(pyramid_before, model.backbone.project[0].weight)

    info = model_info(_config(), measure_memory=False)
    assert info.params_total > info.params_trainable > 0
    assert info.params_total - info.params_trainable == sum(p.numel() for p in trunk.parameters())
    assert info.gflops_per_tile > 0 and info.num_patches == 4


def test_vit_backbone_weights_are_never_downloaded(vit) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="never downloaded"):
        build_model(_config(backbone_weights="timm"))


def test_model_info_command_on_a_vit_backbone(vit) -> None:  # noqa: ANN001
    import json

    from typer.testing import CliRunner

    from histoduo.cli import app

    args = ["model-info", "--architecture", "duoformer", "--backbone", vit.name,
            "--input-size", "32", "--patch-size", "16", "--embed-dim", "32", "--scale-depth",
            "1", "--patch-depth", "1", "--scale-heads", "2", "--patch-heads", "2",
            "--no-memory", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)["info"]
    assert info["gflops_per_tile"] > 0 and info["params_trainable"] < info["params_total"]


def test_checkpoints_never_hold_the_vits_weights(vit, tmp_path: Path) -> None:  # noqa: ANN001
    import hashlib

    from model_configs import tiny_meta
    from safetensors.torch import save_file

    from histoduo.models.checkpoint import CheckpointError, load_model, save_checkpoint
    from histoduo.models.encoders.pyramid import shareable_state

    torch.manual_seed(0)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_trunk(vit).state_dict().items()}, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    model = build_model(_config(backbone_weights=str(weights))).eval()
    state = shareable_state(model)
    assert not any(k.startswith("backbone.trunk.") for k in state)
    assert any(k.startswith("backbone.project.") for k in state)  # the pyramid trains: kept
    config = _config(encoder=vit.name, encoder_weights_sha256=digest)
    ckpt = save_checkpoint(tmp_path / "best.pt", state, tiny_meta(config, ["a", "b", "c"]))

    with pytest.raises(CheckpointError, match="--encoder-weights"):
        load_model(ckpt)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in create_trunk(vit).state_dict().items()}, str(other))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(ckpt, encoder_weights=other)
    loaded, _ = load_model(ckpt, encoder_weights=weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
