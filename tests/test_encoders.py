"""Encoder registry, meta-device parameter counts and local weights in every layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from histoduo.models.encoders import (
    EncoderError,
    EncoderSpec,
    build_encoder,
    count_parameters,
    create_trunk,
    get_encoder_spec,
    register_encoder,
    registered_encoders,
    resolve_encoder,
    unregister_encoder,
)

# Published parameter counts (millions) from the model cards / papers.
PUBLISHED_M = {
    "uni": 303.4,
    "uni2-h": 681.4,
    "virchow2": 631.2,
    "h-optimus-0": 1134.8,
    "gigapath": 1135.0,
}

TINY_KWARGS = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "init_values": 1e-5,
    "num_classes": 0,
}


@pytest.fixture
def tiny_specs():
    """Two tiny ViTs through the registry: class-token pooling, and Virchow's
    class token + patch mean with register tokens and SwiGLU (UNI2-h / Virchow2 layers)."""
    specs = [
        EncoderSpec(
            name="test-tiny-vit",
            timm_name="vit_small_patch16_224",
            timm_kwargs=TINY_KWARGS,
            embedding_dim=32,
            input_size_px=32,
        ),
        EncoderSpec(
            name="test-tiny-virchow",
            timm_name="vit_small_patch16_224",
            timm_kwargs={
                **TINY_KWARGS,
                "reg_tokens": 2,
                "global_pool": "",
                "mlp_layer": "swiglu_packed",
                "act_layer": "silu",
            },
            embedding_dim=64,
            pooling="cls_mean",
            input_size_px=32,
        ),
    ]
    for spec in specs:
        register_encoder(spec, replace=True)
    yield specs
    for spec in specs:
        unregister_encoder(spec.name)


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_meta_parameter_counts_match_published(name: str) -> None:
    spec = get_encoder_spec(name)
    assert spec.published_params_m == PUBLISHED_M[name]
    assert round(count_parameters(spec) / 1e6, 1) == PUBLISHED_M[name]


def test_every_entry_builds_with_its_embedding_dim() -> None:
    names = {spec.name for spec in registered_encoders()}
    assert {"uni", "uni2-h", "virchow", "virchow2", "h-optimus-0", "h-optimus-1"} <= names
    for spec in registered_encoders():
        with torch.device("meta"):
            trunk = create_trunk(spec, init=False)
        width = trunk.num_features * (2 if spec.pooling == "cls_mean" else 1)
        assert width == spec.embedding_dim, spec.name
        assert trunk.patch_embed.img_size == (spec.input_size_px, spec.input_size_px)
    # H-optimus-1 is H-optimus-0's architecture; Virchow is Virchow2 without registers.
    assert count_parameters(get_encoder_spec("h-optimus-1")) == count_parameters(
        get_encoder_spec("h-optimus-0")
    )
    assert get_encoder_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)


def test_timm_prefix_and_unknown_names() -> None:
    spec = resolve_encoder("timm:resnet18")
    assert (spec.embedding_dim, spec.input_size_px, spec.timm_name) == (512, 224, "resnet18")
    with pytest.raises(EncoderError, match="timm has no model"):
        resolve_encoder("timm:not_a_model_xyz")
    with pytest.raises(EncoderError, match="unknown encoder"):
        resolve_encoder("uni3")
    with pytest.raises(EncoderError, match="never downloaded"):
        build_encoder(get_encoder_spec("uni"))


def _reference(spec: EncoderSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    trunk = create_trunk(spec)
    for p in trunk.parameters():  # init_values leave blocks near identity: make them count
        p.data.add_(torch.randn_like(p) * 0.02)
    return trunk.eval()


def _save_torch(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _save_safetensors(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


LAYOUTS = {
    "plain.safetensors": lambda d, s: _save_safetensors(d / "w.safetensors", s),
    "prefixed.bin": lambda d, s: _save_torch(d / "w.bin", {f"module.{k}": v for k, v in s.items()}),
    "wrapped.pth": lambda d, s: _save_torch(
        d / "w.pth", {"model": {f"backbone.{k}": v for k, v in s.items()}}
    ),
    "folder-safetensors": lambda d, s: (
        _save_safetensors(d / "m" / "model.safetensors", s),
        d / "m",
    )[1],
    "folder-bin": lambda d, s: (_save_torch(d / "m" / "pytorch_model.bin", s), d / "m")[1],
    "half.safetensors": lambda d, s: _save_safetensors(
        d / "h.safetensors", {k: v.half() for k, v in s.items()}
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_weights_layouts_give_timms_output(tmp_path: Path, tiny_specs, layout: str) -> None:
    spec = tiny_specs[1]
    reference = _reference(spec)
    state = dict(reference.state_dict())
    state["head.weight"] = torch.zeros(3, 32)  # a classifier the trunk must ignore
    target = LAYOUTS[layout](tmp_path, state)
    encoder = build_encoder(resolve_encoder(spec.name), target)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = encoder(x)
        tokens = reference.forward_features(x)
    expected = torch.cat([tokens[:, 0], tokens[:, 1 + 2 :].mean(1)], dim=-1)
    assert got.shape == (2, 64)
    tol = 2e-2 if layout.startswith("half") else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    file = target if target.is_file() else next(p for p in target.iterdir())
    assert encoder.weights_sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert all(p.dtype == torch.float32 for p in encoder.parameters())


def test_class_token_pooling_matches_timm(tmp_path: Path, tiny_specs) -> None:
    spec = tiny_specs[0]
    reference = _reference(spec, seed=3)
    path = _save_safetensors(tmp_path / "w.safetensors", reference.state_dict())
    encoder = build_encoder(spec, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference(x))
        # UNI's embedding is the normed class token
        torch.testing.assert_close(encoder(x), reference.forward_features(x)[:, 0])


def test_weights_for_another_architecture_say_what_the_file_holds(
    tmp_path: Path, tiny_specs
) -> None:
    deeper = EncoderSpec(
        name="x",
        timm_name="vit_small_patch16_224",
        timm_kwargs={**TINY_KWARGS, "depth": 3},
        embedding_dim=32,
    )
    path = _save_safetensors(tmp_path / "deep.safetensors", create_trunk(deeper).state_dict())
    with pytest.raises(EncoderError) as info:
        build_encoder(tiny_specs[0], path)
    message = str(info.value)
    assert str(path) in message and "unexpected (e.g. blocks.2" in message
    assert "missing" not in message and "34 of 34 model tensors found" in message
    wider = EncoderSpec(
        name="y",
        timm_name="vit_small_patch16_224",
        timm_kwargs={**TINY_KWARGS, "embed_dim": 48},
        embedding_dim=48,
    )
    path = _save_safetensors(tmp_path / "wide.safetensors", create_trunk(wider).state_dict())
    with pytest.raises(
        EncoderError, match=r"34 with other shapes \(e\.g\. \S+: file \(48,\) vs model \(32,\)"
    ):
        build_encoder(tiny_specs[0], path)
    shallow = EncoderSpec(
        name="z",
        timm_name="vit_small_patch16_224",
        timm_kwargs={**TINY_KWARGS, "depth": 1},
        embedding_dim=32,
    )
    path = _save_safetensors(tmp_path / "shallow.safetensors", create_trunk(shallow).state_dict())
    with pytest.raises(EncoderError, match=r"missing \(e\.g\. blocks\.1\."):
        build_encoder(tiny_specs[0], path)


def test_pickled_objects_are_refused_and_never_run(tmp_path: Path, tiny_specs) -> None:
    marker = tmp_path / "ran"

    class _Runs:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    path = _save_torch(tmp_path / "evil.bin", {"pos_embed": _Runs()})
    with pytest.raises(EncoderError, match=str(path)):
        build_encoder(tiny_specs[0], path)
    assert not marker.exists()
    with pytest.raises(EncoderError, match="not found"):
        build_encoder(tiny_specs[0], tmp_path / "absent.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="model.safetensors or pytorch_model.bin"):
        build_encoder(tiny_specs[0], tmp_path / "empty")


def test_encoders_command_lists_the_published_counts() -> None:
    import json

    from typer.testing import CliRunner

    from histoduo.cli import app

    result = CliRunner().invoke(app, ["encoders", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    for name, millions in PUBLISHED_M.items():
        assert round(rows[name]["params"] / 1e6, 1) == millions
    assert rows["virchow2"]["pooling"] == "cls_mean" and rows["virchow2"]["embedding_dim"] == 2560
    assert rows["uni"]["source"].endswith("MahmoodLab/UNI")
