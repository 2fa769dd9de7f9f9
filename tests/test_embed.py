"""``embed``: features of every store tile equal a direct timm forward; resume; checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.models.encoders import EncoderSpec, create_trunk, register_encoder
from histoduo.predict.embed import LOCK_NAME, EmbedError, EmbedParams, embed_store
from histoduo.runtime.locks import LockedError
from histoduo.store import TileStore
from histoduo.store.features import feature_file_path, read_feature_bag

SPEC = EncoderSpec(
    name="test-embed-vit",
    timm_name="vit_small_patch16_224",
    timm_kwargs={
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1e-5,
        "num_classes": 0,
        "reg_tokens": 1,
    },
    embedding_dim=32,
    input_size_px=32,
    mpp=0.5,  # the store holds 1.0 um/px tiles: a resolution warning is expected
    mean=(0.6, 0.5, 0.7),
    std=(0.2, 0.25, 0.15),
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, svs_slide, svs_slide_b) -> Path:  # noqa: ANN001
    from histoduo.slide.sources import SlideSource
    from histoduo.tiling import TilingParams, tile_slides

    register_encoder(SPEC, replace=True)
    path = tmp_path_factory.mktemp("embed") / "tiles.h5"
    tile_slides(
        [SlideSource(svs_slide.path), SlideSource(svs_slide_b.path)],
        path,
        TilingParams(target_mpp=1.0, tile_size_px=64),
        workers=0,
        progress=False,
    )
    return path


def _weights(path: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    trunk = create_trunk(SPEC).eval()
    for p in trunk.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    return path, trunk


def _direct(trunk: torch.nn.Module, tiles: np.ndarray, spec: EncoderSpec) -> np.ndarray:
    """The reference: resize, normalise and run timm by hand."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(spec.input_size_px,) * 2, mode="bilinear", antialias=True)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return trunk(x).numpy()


def test_embed_equals_timm_forward_and_resumes(store: Path, tmp_path: Path) -> None:
    weights, trunk = _weights(tmp_path / "w.safetensors", seed=0)
    out = tmp_path / "out"
    params = EmbedParams(encoder=SPEC.name, weights=str(weights), workers=0, quiet=True)
    result = embed_store(store, out, params)
    assert result.features_dir == out / f"features_{SPEC.name}"
    assert set(result.status.values()) == {"written"}
    assert any("1 um/px but test-embed-vit was trained at 0.5" in w for w in result.warnings)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    with TileStore(store) as tiles:
        assert sorted(result.status) == tiles.slides and len(tiles.slides) == 2
        for slide in tiles.slides:
            bag = read_feature_bag(feature_file_path(result.features_dir, slide))
            n = tiles.num_tiles(slide)
            assert n > 4 and bag.features.shape == (n, 32)
            np.testing.assert_array_equal(bag.coords, tiles.coords(slide))
            expected = _direct(trunk, tiles.read_tiles(slide, np.arange(n)), SPEC)
            np.testing.assert_allclose(bag.features, expected, atol=2e-3, rtol=2e-3)
            assert bag.info.weights_sha256 == digest and bag.info.encoder == SPEC.name
            assert (bag.info.mpp, bag.info.input_size_px) == (1.0, 32)
            assert bag.info.mean == SPEC.mean
            import h5py

            with h5py.File(feature_file_path(result.features_dir, slide)) as f:
                attrs = dict(f["coords"].attrs)
            expected_attrs = tiles.record(slide).trident_attrs()
            assert set(expected_attrs) <= set(attrs)
            assert attrs["patch_size"] == 64 and attrs["name"] == slide
            # The store's QC flags ride along row for row, for train-mil to leave out.
            checked = tiles.qc(slide)
            assert checked is not None and bag.qc_mode == "exclude"
            np.testing.assert_array_equal(bag.qc_flags, checked["qc_flags"])
    # Weights are recorded by hash, never copied.
    assert not any(p.suffix == ".safetensors" for p in out.rglob("*"))
    assert (result.features_dir / "embed.json").is_file()
    assert not (result.features_dir / LOCK_NAME).exists()

    # Same encoder + weights: every slide is kept as it is.
    first = feature_file_path(result.features_dir, tiles.slides[0])
    stamp = first.stat().st_mtime_ns
    again = embed_store(store, out, params)
    assert set(again.status.values()) == {"skipped"} and first.stat().st_mtime_ns == stamp
    # A file from before QC flags were copied (none, and no record of them) is redone.
    from dataclasses import replace

    from histoduo.store.features import write_feature_file

    old = read_feature_bag(first)
    extra = {k: v for k, v in old.info.extra.items() if k != "qc_flags"}
    write_feature_file(first, replace(old.info, extra=extra), old.features, old.coords)
    assert read_feature_bag(first).qc_flags is None
    redone = embed_store(store, out, params)
    assert redone.status[tiles.slides[0]] == "written"
    assert set(redone.status.values()) == {"written", "skipped"}
    assert read_feature_bag(first).qc_flags is not None
    # Other weights: redone, with the new hash and the new features.
    other, trunk2 = _weights(tmp_path / "w2.safetensors", seed=1)
    redo = embed_store(
        store, out, EmbedParams(encoder=SPEC.name, weights=str(other), workers=0, quiet=True)
    )
    assert set(redo.status.values()) == {"written"}
    bag = read_feature_bag(first)
    assert bag.info.weights_sha256 == hashlib.sha256(other.read_bytes()).hexdigest()
    with TileStore(store) as tiles:
        slide = tiles.slides[0]
        expected = _direct(trunk2, tiles.read_tiles(slide, np.arange(tiles.num_tiles(slide))), SPEC)
    np.testing.assert_allclose(bag.features, expected, atol=2e-3, rtol=2e-3)


def test_checkpoint_as_encoder(store: Path, tmp_path: Path) -> None:
    from model_configs import tiny, tiny_meta

    from histoduo.models import build_model
    from histoduo.models.checkpoint import load_model, save_checkpoint

    config = tiny(arch="resnet")
    ckpt = tmp_path / "runx" / "best.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, build_model(config).state_dict(), tiny_meta(config, ["a", "b", "c"]))
    # From the command line, as MIL users run it: the checkpoint is the encoder and its weights
    args = ["embed", str(store), "--encoder", str(ckpt), "--out", str(tmp_path / "out")]
    cli = CliRunner().invoke(app, [*args, "--workers", "0", "--quiet"])
    assert cli.exit_code == 0, cli.output
    assert "warning" not in cli.output  # the checkpoint's own 1.0 um/px
    features_dir = tmp_path / "out" / "features_histoduo-runx-best"
    model, meta = load_model(ckpt)
    with TileStore(store) as tiles:
        slide = tiles.slides[1]
        pixels = tiles.read_tiles(slide, np.arange(tiles.num_tiles(slide)))
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - 0.5) / 0.25  # the checkpoint's normalisation; tiles already 64 px
    with torch.no_grad():
        expected = model.forward_features(x).numpy()
    bag = read_feature_bag(feature_file_path(features_dir, slide))
    assert bag.features.shape == (len(pixels), 512)
    assert bag.info.extra["encoder_arg"] == str(ckpt)
    assert bag.info.weights_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    np.testing.assert_allclose(bag.features, expected, atol=2e-2, rtol=2e-3)


def test_bad_inputs_fail_clearly(store: Path, tmp_path: Path) -> None:
    with pytest.raises(EmbedError, match="never downloaded"):
        embed_store(store, tmp_path, EmbedParams(encoder="uni", quiet=True))
    with pytest.raises(EmbedError, match="unknown encoder"):
        embed_store(store, tmp_path, EmbedParams(encoder="nope", quiet=True))
    weights, _ = _weights(tmp_path / "w.safetensors", seed=0)
    params = EmbedParams(encoder=SPEC.name, weights=str(weights), workers=0, quiet=True)
    folder = tmp_path / "out" / f"features_{SPEC.name}"
    folder.mkdir(parents=True)
    live = {"host": socket.gethostname(), "pid": os.getppid()}  # a live writer
    (folder / LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(LockedError, match="being written by another run"):
        embed_store(store, tmp_path / "out", params)
    assert not list(folder.glob("*.h5"))
    dead = {"host": socket.gethostname(), "pid": 999999999}  # a killed writer's lock
    (folder / LOCK_NAME).write_text(json.dumps(dead))  # is taken over
    assert set(
        embed_store(
            store,
            tmp_path / "out",
            params,
        ).status.values()
    ) == {"written"}


def test_embed_command(store: Path, tmp_path: Path) -> None:
    weights, _ = _weights(tmp_path / "w.safetensors", seed=0)
    base = ["embed", str(store), "--encoder", SPEC.name, "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*base, "--weights", str(weights), "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "2 written" in result.output and "trained at 0.5" in result.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights")
    result = CliRunner().invoke(app, [*base, "--weights", str(bad), "-q"])
    assert result.exit_code == 1 and str(bad) in result.output
    assert "Traceback" not in result.output


def test_features_beyond_float16_are_kept_in_float32() -> None:
    from histoduo.predict.embed import _storage_dtype

    small = np.ones((3, 4), dtype=np.float32)
    assert _storage_dtype(small, "float16") == "float16"
    assert _storage_dtype(small * 1e5, "float16") == "float32"
    assert _storage_dtype(small * 1e5, "float32") == "float32"
