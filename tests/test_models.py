"""Tests of histoduo.models: shapes, token layout, variants, params, weights, numerics."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from model_configs import tiny

from histoduo.models import (
    ModelConfig,
    WeightsError,
    build_model,
    input_normalization,
    load_backbone_file,
    patchify,
)
from histoduo.models.info import model_info

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- config -------------------------------------------------------------------------------


def test_config_round_trip_and_validation() -> None:
    config = tiny(stages=(2, 3), scale_token="conv", backbone_weights="none")
    data = config.to_dict()
    assert data["stages"] == [2, 3] and data["backbone_weights"] is None
    import json

    assert ModelConfig.from_dict(json.loads(json.dumps(data))) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="scale_token"):
        tiny(scale_token="nope")


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, stages, size",
    [
        ("resnet18", None, 64),
        ("resnet18", (2, 3, 4), 64),
        ("resnet18", (3, 4), 96),
        ("resnet50", (1, 2, 3, 4), 64),
        ("efficientnet_b0", None, 64),
        ("convnext_atto", (0, 1, 2, 3), 64),
        ("regnetx_002", (2, 4), 64),
    ],
)
def test_duoformer_shapes(backbone: str, stages: tuple[int, ...] | None, size: int) -> None:
    model = build_model(tiny(backbone=backbone, stages=stages, input_size_px=size)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        tokens = model.embed_scales(model.backbone(x))
    assert tokens.shape == (2, (size // 32) ** 2, model.seq_len, 32)
    # S = sum over stages of (p / stride)^2, plus the learned scale token.
    strides = [s.stride_px for s in model.stages]
    assert model.seq_len == 1 + sum((32 // s) ** 2 for s in strides)


def test_default_stages_are_s0_to_s3_for_resnets() -> None:
    model = build_model(tiny())
    assert [s.index for s in model.stages] == [1, 2, 3, 4]
    assert [s.stride_px for s in model.stages] == [4, 8, 16, 32]
    assert model.tokens_per_stage() == {1: 64, 2: 16, 3: 4, 4: 1}


@pytest.mark.parametrize("arch", ["resnet", "hybrid"])
def test_baseline_shapes(arch: str) -> None:
    model = build_model(tiny(arch=arch)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(patch_size_px=24), "not a multiple of stage"),
        (dict(patch_size_px=16), "not a multiple of stage"),
        (dict(input_size_px=80), "not a multiple of patch size"),
        (dict(scale_heads=3), "does not divide embed_dim"),
        (dict(patch_heads=5), "does not divide embed_dim"),
        (dict(stages=(1, 7)), "do not exist"),
        (dict(stages=(3, 2)), "increasing"),
        (dict(block_order="interleaved", patch_depth=2), "scale_depth == patch_depth"),
        (dict(block_order="interleaved", scale_token="mean"), "per-patch token"),
    ],
)
def test_invalid_configs_fail_at_build(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(tiny(**changes))


def test_wrong_input_size_is_rejected() -> None:
    model = build_model(tiny()).eval()
    with pytest.raises(ValueError, match="built for 64x64"):
        model(torch.randn(1, 3, 96, 96))


# --- token layout -------------------------------------------------------------------------


def test_patchify_layout() -> None:
    # Every cell encodes (channel, row, col), so any transpose or mixing is detectable.
    batch, channels, size, window = 2, 3, 8, 4
    c, r, q = torch.meshgrid(
        torch.arange(channels), torch.arange(size), torch.arange(size), indexing="ij"
    )
    fmap = (c * 10000 + r * 100 + q).float().expand(batch, -1, -1, -1).clone()
    fmap[1] += 1e6
    tokens = patchify(fmap, window)
    grid = size // window
    assert tokens.shape == (batch, grid * grid, window * window, channels)
    for b in range(batch):
        for n in range(grid * grid):
            for j in range(window * window):
                row = (n // grid) * window + j // window
                col = (n % grid) * window + j % window
                assert torch.equal(tokens[b, n, j], fmap[b, :, row, col])
    # channels_last input gives the same tokens
    assert torch.equal(patchify(fmap.to(memory_format=torch.channels_last), window), tokens)


def test_model_tokens_come_from_the_right_locations() -> None:
    model = build_model(tiny(input_size_px=96)).eval()
    dim = 32
    with torch.no_grad():
        for proj in model.proj:  # identity-like: token = first D channels of the stage map
            proj.weight.copy_(torch.eye(dim, proj.in_features))
            proj.bias.zero_()
        x = torch.randn(2, 3, 96, 96)
        maps = model.backbone(x)
        tokens = model.embed_scales(maps)
    grid = 96 // 32
    assert torch.equal(tokens[:, :, 0], model.scale_token.expand(2, grid * grid, 1, dim)[:, :, 0])
    offset = 1
    for i in model.scale_order:  # coarsest stage first
        k = model.windows[i]
        fmap = maps[i]
        for n in range(grid * grid):
            for j in range(k * k):
                row = (n // grid) * k + j // k
                col = (n % grid) * k + j % k
                torch.testing.assert_close(tokens[:, n, offset + j], fmap[:, :dim, row, col])
        offset += k * k
    assert offset == model.seq_len
    assert [model.windows[i] for i in model.scale_order] == [1, 2, 4, 8]


# --- variants: forward, backward, gradients -----------------------------------------------


VARIANTS = [dict(scale_token=token) for token in ("learned", "conv", "first", "mean")] + [
    dict(patch_block="prenorm"),
    dict(block_order="interleaved"),
    dict(block_order="interleaved", patch_block="prenorm", scale_token="conv"),
    dict(block_order="interleaved", scale_token="first", scale_depth=2, patch_depth=2),
    dict(patch_attention=False),
    dict(patch_attention=False, scale_token="mean"),
    dict(arch="hybrid"),
    dict(arch="resnet"),
]


@pytest.mark.parametrize("changes", VARIANTS, ids=lambda c: "-".join(map(str, c.values())))
def test_variants_forward_backward_all_grads(changes: dict) -> None:
    model = build_model(tiny(dropout=0.1, drop_path=0.1, **changes)).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    # timm zero-inits each residual block's last BN, so inner backbone grads may be 0 at init.
    zero = [
        n
        for n, p in model.named_parameters()
        if not n.startswith("backbone.") and p.grad is not None and not p.grad.any()
    ]
    assert not zero, f"parameters with all-zero gradient: {zero}"


def test_ablation_has_no_patch_parameters() -> None:
    model = build_model(tiny(patch_attention=False))
    assert model.cls_token is None and len(model.patch_blocks) == 0


def test_frozen_backbone_is_a_linear_probe() -> None:
    model = build_model(tiny(arch="resnet", freeze_backbone=True)).train()
    assert not model.backbone.training and model.head.training
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None
    info = model_info(tiny(arch="resnet", freeze_backbone=True), measure_memory=False)
    assert info.params_trainable == 512 * 3 + 3


# --- parameter counts (duoformer.md table), meta device: no memory, no compute -----------


@pytest.mark.parametrize(
    "changes, expected_m",
    [
        (dict(), 102.2),
        (dict(scale_token="conv"), 148.2),
        (dict(stages=(2, 3, 4)), 101.9),
        (dict(scale_depth=12, scale_heads=12, patch_depth=12, patch_heads=12), 140.0),
    ],
)
def test_param_counts_match_paper_table(changes: dict, expected_m: float) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(num_classes=3, **changes))
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params_m - expected_m) / expected_m < 0.005, params_m


def test_model_info_reports_costs() -> None:
    info = model_info(ModelConfig(num_classes=3), measure_memory=False)
    assert abs(info.gflops_per_tile - 499) / 499 < 0.01
    assert info.num_patches == 49 and info.tokens_per_patch == 86
    assert info.tokens_per_stage == {1: 64, 2: 16, 3: 4, 4: 1}
    small = model_info(tiny(), batch_size=2)
    assert small.activation_bytes and small.activation_bytes > 0
    assert small.to_dict()["tokens_per_stage"] == {"1": 64, "2": 16, "3": 4, "4": 1}


# --- weights ------------------------------------------------------------------------------


def _torchvision_resnet18_state() -> dict[str, torch.Tensor]:
    from histoduo.runtime.torchcompat import ensure_torchvision

    ensure_torchvision()
    import torchvision

    return torchvision.models.resnet18(weights=None).state_dict()


def _assert_backbone_equals(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_load_torchvision_layout_pth_with_wrapper(tmp_path) -> None:
    state = _torchvision_resnet18_state()
    path = tmp_path / "swav_r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    # A plain state dict loads through torch's tensors-only loader, without --trust-checkpoint.
    model = build_model(tiny(backbone_weights=str(path), freeze_backbone=True))
    _assert_backbone_equals(model, state)
    report = load_backbone_file(build_model(tiny()).backbone, path)
    assert report.prefix_stripped == "module."
    assert sorted(report.ignored_head) == ["module.fc.bias", "module.fc.weight"]
    assert not report.missing and not report.unexpected


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_weights_pickle_with_code_needs_trust_and_never_runs(tmp_path) -> None:
    state = _torchvision_resnet18_state()
    marker = tmp_path / "payload-ran"
    path = tmp_path / "hostile.pth"
    torch.save({"state_dict": state, "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match=r"hostile\.pth.*pickle.*--trust-checkpoint"):
        build_model(tiny(backbone_weights=str(path)))
    assert not marker.exists(), "the tensors-only loader ran the pickle's code"


def test_load_timm_layout_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    from histoduo.runtime.torchcompat import import_timm

    timm = import_timm()
    state = timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = build_model(tiny(backbone_weights=str(path)))
    _assert_backbone_equals(model, state)
    # A stage subset uses fewer layers: the rest of the file is reported, not fatal.
    report = load_backbone_file(build_model(tiny(stages=(1, 2), patch_size_px=8)).backbone, path)
    assert report.unexpected and all(k.startswith(("layer3", "layer4")) for k in report.unexpected)


def test_weights_for_another_architecture_fail_clearly(tmp_path) -> None:
    state = _torchvision_resnet18_state()
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"r18\.pt does not (fit|look like)"):
        build_model(tiny(backbone="resnet50", backbone_weights=str(path)), trust_weights=True)
    with pytest.raises(WeightsError, match=r"r18\.pt does not look like weights.* tensors match"):
        build_model(
            tiny(backbone="efficientnet_b0", backbone_weights=str(path)), trust_weights=True
        )
    with pytest.raises(WeightsError, match="not found"):
        build_model(tiny(backbone_weights=str(tmp_path / "missing.pth")))


def test_timm_weights_offline_fail_fast() -> None:
    with pytest.raises(WeightsError, match="local weights file"):
        build_model(tiny(backbone_weights="timm"))


def test_hub_probe_fails_fast_without_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode asks the hub with a short timeout first (timm alone hangs ~47 s), and the
    error says to pass a local file; offline mode never touches the network."""
    from histoduo.models import weights

    probes: list[float] = []

    def unreachable(address: tuple[str, int], timeout: float) -> None:
        probes.append(timeout)
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights.socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightsError, match="unreachable.*local weights file"):
        weights.check_hub_reachable("resnet18")
    assert len(probes) == 1 and 0 < probes[0] <= 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights.check_hub_reachable("resnet18")
    assert len(probes) == 1


def test_normalization() -> None:
    model = build_model(tiny())
    mean, std = model.normalization
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx(
        (0.229, 0.224, 0.225)
    )
    assert input_normalization("resnet18") == (mean, std)


# --- numerics -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["duoformer", "hybrid", "resnet"])
def test_eval_deterministic_and_batch_equals_single(arch: str) -> None:
    model = build_model(tiny(arch=arch, dropout=0.2, drop_path=0.2, input_size_px=96)).eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        batch = model(x)
        assert torch.equal(batch, model(x))
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_and_channels_last() -> None:
    model = build_model(tiny(scale_token="conv")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        channels_last = model_cl(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, rtol=0.1, atol=0.1)


def test_bf16_autocast_backward() -> None:
    model = build_model(tiny()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 64, 64)).float().square().mean()
    loss.backward()
    assert model.head.weight.grad is not None
