"""Tests of the optional pre-attention interactions (ACP, CAT) in DuoFormer."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from model_configs import tiny

from histoduo.models import ModelConfig, build_model, patchify
from histoduo.models.blocks import AttentionOnlyBlock, Block
from histoduo.models.info import model_info
from histoduo.models.interaction import (
    AggressiveConvPooling,
    ConceptualAttention,
    TokenGrid,
    TokenLayout,
)

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _pair(config: ModelConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model with the modules, model without) sharing every other weight."""
    with_modules = build_model(config)
    without = build_model(config.replace(acp_levels=0, cat_concepts=0))
    missing, unexpected = with_modules.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and missing and all(".interaction." in k for k in missing)
    return with_modules.eval(), without.eval()


# --- layouts and the modules on their own ---------------------------------------------------


def test_layout_validation() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        TokenLayout(5, (TokenGrid(0, 2, 2), TokenGrid(3, 1, 1)))
    with pytest.raises(ValueError, match="overlaps"):
        TokenLayout(4, (TokenGrid(1, 2, 2),))
    layout = TokenLayout(5, (TokenGrid(1, 2, 2),))
    assert layout.grid_positions() == [1, 2, 3, 4]
    module = AggressiveConvPooling(8, layout, 1)
    with pytest.raises(ValueError, match="built for sequences of 5"):
        module(torch.randn(2, 6, 8))


def test_acp_stitches_patch_windows_into_the_stage_map() -> None:
    """With tiles, ACP on patchified tokens == the pyramid on the whole map, patchified."""
    dim, grid, window = 4, 3, 2
    layout = TokenLayout(1 + window * window, (TokenGrid(1, window, window),), (grid, grid))
    acp = AggressiveConvPooling(dim, layout, levels=2)
    torch.nn.init.normal_(acp.proj.weight)
    fmap = torch.randn(2, dim, grid * window, grid * window)
    tokens = patchify(fmap, window).reshape(2 * grid * grid, window * window, dim)
    seq = torch.cat([torch.randn(2 * grid * grid, 1, dim), tokens], dim=1)
    out = acp(seq)
    assert torch.equal(out[:, 0], seq[:, 0])  # the scale token passes through
    # Reference: normalise, run the pyramid on the map, project, patchify.
    normed = F.layer_norm(fmap.permute(0, 2, 3, 1), (dim,), eps=1e-6).permute(0, 3, 1, 2)
    ref = acp.proj(patchify(acp.pyramid(normed), window)).reshape_as(tokens)
    torch.testing.assert_close(out[:, 1:] - tokens, ref)


def test_acp_pooling_levels_widen_the_receptive_field() -> None:
    layout = TokenLayout(64, (TokenGrid(0, 8, 8),))
    grads = []
    for levels in (1, 3):
        torch.manual_seed(0)
        acp = AggressiveConvPooling(8, layout, levels)
        torch.nn.init.normal_(acp.proj.weight)
        x = torch.randn(1, 64, 8, requires_grad=True)
        (acp(x)[0, 0] - x[0, 0]).sum().backward()  # corner token's update
        grads.append(int((x.grad.abs().sum(-1)[0] > 0).sum()))
    assert grads[0] < grads[1]  # more levels -> more tokens reach the corner


def test_cat_mixes_globally_and_skips_passthrough_tokens() -> None:
    layout = TokenLayout(5, (TokenGrid(1, 2, 2),), (2, 1))  # 2 sequences per image
    cat = ConceptualAttention(8, layout, num_concepts=3)
    torch.nn.init.normal_(cat.proj.weight)
    x = torch.randn(4, 5, 8, requires_grad=True)
    out = cat(x)
    assert out.shape == x.shape and torch.equal(out[:, 0], x[:, 0])
    out[0, 1].sum().backward()
    reach = x.grad.abs().sum(-1) > 0
    assert reach[:2, 1:].all()  # every grid token of image 0 (both of its sequences)
    assert not reach[2:].any() and not reach[:, 0].any()  # not image 1, not CLS tokens


# --- in the model -----------------------------------------------------------------------------

LAYOUTS = [
    dict(stages=(2, 3, 4), scale_token="learned"),
    dict(stages=(1, 2, 3, 4), scale_token="conv"),
    dict(stages=(3, 4), scale_token="first"),
    dict(stages=(2, 3, 4), scale_token="mean"),
]


# Interleaved order needs a per-patch token to write back into, so "mean" is sequential only.
COMBINATIONS = [
    (layout, block_order)
    for layout in LAYOUTS
    for block_order in ("sequential", "interleaved")
    if not (block_order == "interleaved" and layout["scale_token"] == "mean")
]


@pytest.mark.parametrize(
    ("layout", "block_order"),
    COMBINATIONS,
    ids=[f"{d['stages']}-{d['scale_token']}-{o}" for d, o in COMBINATIONS],
)
@pytest.mark.parametrize("patch_block", ["faithful", "prenorm"])
def test_shapes_and_exact_noop_at_init(layout: dict, patch_block: str, block_order: str) -> None:
    config = tiny(
        **layout,
        patch_block=patch_block,
        block_order=block_order,
        acp_levels=2,
        cat_concepts=4,
    )
    model, reference = _pair(config)
    assert isinstance(model.scale_blocks[0].interaction, torch.nn.Sequential)
    assert not isinstance(model.patch_blocks[0].interaction, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3)
        assert torch.equal(out, reference(x))


@pytest.mark.parametrize(
    ("interaction_in", "scale_on", "patch_on"),
    [("scale", True, False), ("patch", False, True), ("both", True, True)],
)
def test_interaction_in_selects_the_blocks(
    interaction_in: str, scale_on: bool, patch_on: bool
) -> None:
    model = build_model(tiny(scale_depth=2, cat_concepts=8, interaction_in=interaction_in))
    for blk in model.scale_blocks:
        assert isinstance(blk.interaction, ConceptualAttention) is scale_on
    for blk in model.patch_blocks:
        assert isinstance(blk, AttentionOnlyBlock)
        assert isinstance(blk.interaction, ConceptualAttention) is patch_on


def test_off_by_default_and_paper_config_unchanged() -> None:
    config = ModelConfig()
    assert (config.acp_levels, config.cat_concepts, config.interaction_in) == (0, 0, "both")
    model = build_model(tiny())
    blocks = [*model.scale_blocks, *model.patch_blocks]
    assert all(isinstance(b.interaction, torch.nn.Identity) for b in blocks)
    assert not any(".interaction." in k for k in model.state_dict())


def test_shared_weights_draw_the_same_random_numbers() -> None:
    torch.manual_seed(1)
    plain = build_model(tiny()).state_dict()
    torch.manual_seed(1)
    extended = build_model(tiny(acp_levels=1, cat_concepts=4)).state_dict()
    for key, value in plain.items():
        assert torch.equal(value, extended[key]), key


@pytest.mark.parametrize("patch_block", ["faithful", "prenorm"])
def test_gradients_reach_the_modules_and_change_the_output(patch_block: str) -> None:
    config = tiny(patch_block=patch_block, acp_levels=2, cat_concepts=4)
    model, reference = _pair(config)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        before = model(x)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, param in model.named_parameters():
            if ".interaction." not in name:
                continue
            if name.endswith("proj.weight"):
                assert param.grad.abs().sum() > 0, name  # zero-init proj learns at step 1
            elif step == 1 and name.endswith(("dwconv.weight", "concepts")):
                assert param.grad.abs().sum() > 0, name  # the rest once proj is non-zero
        opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), before)


def test_checkpoint_round_trip_with_the_options_on(tmp_path) -> None:
    config = tiny(acp_levels=3, cat_concepts=8, interaction_in="scale", stages=(1, 2, 3, 4))
    model = build_model(config).eval()
    for name, param in model.named_parameters():  # make the modules matter
        if name.endswith("proj.weight") and ".interaction" in name:
            torch.nn.init.normal_(param, std=0.1)
    path = tmp_path / "model.pt"
    torch.save({"model_config": config.to_dict(), "state_dict": model.state_dict()}, path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    restored_config = ModelConfig.from_dict(json.loads(json.dumps(data["model_config"])))
    assert restored_config == config
    restored = build_model(restored_config).eval()
    restored.load_state_dict(data["state_dict"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_old_config_dicts_load_with_the_modules_off() -> None:
    data = tiny().to_dict()
    for key in ("acp_levels", "cat_concepts", "interaction_in"):
        data.pop(key)
    config = ModelConfig.from_dict(data)
    assert (config.acp_levels, config.cat_concepts, config.interaction_in) == (0, 0, "both")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(acp_levels=-1), "acp_levels"),
        (dict(cat_concepts=-2), "cat_concepts"),
        (dict(interaction_in="mlp"), "interaction_in"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(arch="hybrid", acp_levels=1), "DuoFormer options"),
        (dict(arch="resnet", cat_concepts=4), "DuoFormer options"),
        (dict(patch_attention=False, cat_concepts=4, interaction_in="patch"), "patch attention"),
    ],
)
def test_invalid_combinations_fail_at_build(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(tiny(**changes))


def test_no_patch_attention_ablation_with_scale_interactions() -> None:
    model = build_model(tiny(patch_attention=False, acp_levels=1)).eval()
    assert isinstance(model.scale_blocks[0], Block)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_model_info_reports_the_interaction_costs() -> None:
    plain = model_info(tiny(), measure_memory=False)
    assert plain.params_interaction == 0 and plain.gflops_interaction == 0
    info = model_info(tiny(acp_levels=2, cat_concepts=8), measure_memory=False)
    assert info.params_total - plain.params_total == info.params_interaction > 0
    extra = info.gflops_per_tile - plain.gflops_per_tile
    assert info.gflops_interaction > 0
    assert extra == pytest.approx(info.gflops_interaction, rel=1e-6)


def test_model_info_cli_flags() -> None:
    from typer.testing import CliRunner

    from histoduo.cli import app

    small = ["--backbone", "resnet18", "--embed-dim", "32", "--scale-depth", "1",
             "--patch-depth", "1", "--scale-heads", "2", "--patch-heads", "2",
             "--input-size", "64", "--no-memory"]  # fmt: skip
    flags = ["--acp-levels", "2", "--cat-concepts", "8", "--interaction-in", "scale"]
    result = CliRunner().invoke(app, ["model-info", *small, *flags, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["config"]["acp_levels"] == 2 and data["config"]["interaction_in"] == "scale"
    assert data["info"]["params_interaction"] > 0 and data["info"]["gflops_interaction"] > 0
    table = CliRunner().invoke(app, ["model-info", *small, *flags], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "interaction" in table.output
    bad = CliRunner().invoke(app, ["model-info", *small, "--interaction-in", "mlp"])
    assert bad.exit_code != 0


def test_scale_grid_window_alternative() -> None:
    model = build_model(tiny(stages=(2, 3, 4), acp_levels=2, interaction_in="scale")).eval()
    assert model.scale_layout().tiles == (2, 2)  # default: whole stage maps
    window = model.scale_layout("window")
    assert window.tiles == (1, 1) and [g.height for g in window.grids] == [1, 2, 4]
    model._attach_interactions("window")
    assert model.scale_blocks[0].interaction.layout == window
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="map' or 'window"):
        model.scale_layout("patch")
