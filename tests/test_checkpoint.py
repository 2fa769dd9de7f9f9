"""Checkpoints: class roles for grading, and clear errors for files that are not ours."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from model_configs import tiny, tiny_meta

from histoduo.grading import ClassRoles
from histoduo.models import ModelConfig, build_model
from histoduo.models.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    convert_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


@pytest.mark.parametrize(
    ("names", "grades", "normal", "necrosis", "other"),
    [
        (
            ["normal", "low_grade", "high_grade", "necrosis"],
            ["low_grade", "high_grade"],
            ["normal"],
            ["necrosis"],
            [],
        ),
        (["normal", "cancer", "necrosis"], ["cancer"], ["normal"], ["necrosis"], []),
        (["G3", "G1", "benign", "G2"], ["G1", "G2", "G3"], ["benign"], [], []),
        (
            ["high_grade", "low_grade", "stroma", "fat"],
            ["low_grade", "high_grade"],
            ["stroma"],
            [],
            ["fat"],
        ),
    ],
)
def test_roles_inferred_from_names(names, grades, normal, necrosis, other) -> None:
    roles = ClassRoles.infer(names)
    assert (roles.grades, roles.normal, roles.necrosis, roles.other) == (
        grades,
        normal,
        necrosis,
        other,
    )


def test_explicit_grade_order_and_validation() -> None:
    roles = ClassRoles.infer(["a", "b", "c"], grades=["c", "b"])
    assert roles.grades == ["c", "b"] and roles.other == ["a"]
    with pytest.raises(ValueError, match="unknown classes"):
        ClassRoles.infer(["a", "b"], grades=["z"])


def _tiny_meta(config: ModelConfig) -> CheckpointMeta:
    return tiny_meta(config, ["normal", "tumour"])


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    config = tiny(num_classes=2)
    model = build_model(config).eval()
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), _tiny_meta(config))
    rebuilt, meta = load_model(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), rebuilt(x))
    assert meta.roles.grades == ["tumour"] and meta.class_names == ["normal", "tumour"]
    assert not (tmp_path / "m.pt.tmp").exists()


def test_foreign_files_fail_with_their_name(tmp_path: Path) -> None:
    plain = tmp_path / "resnet_weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a histoduo checkpoint") as err:
        load_checkpoint(plain)
    assert "resnet_weights.pth" in str(err.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: the file is empty"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    config = tiny(num_classes=2)
    state = build_model(config).state_dict()
    wrong = config.replace(embed_dim=64, scale_heads=2)
    path = save_checkpoint(tmp_path / "m.pt", state, _tiny_meta(wrong))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


def test_file_is_safetensors_with_json_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    config = tiny(num_classes=2)
    path = save_checkpoint(tmp_path / "m.pt", build_model(config).state_dict(), _tiny_meta(config))
    with safe_open(str(path), framework="pt") as handle:  # readable by any safetensors tool
        metadata = handle.metadata()
        assert metadata["format"] == "histoduo-checkpoint" and metadata["format_version"] == "2"
        assert json.loads(metadata["histoduo"])["meta"]["class_names"] == ["normal", "tumour"]
        assert all(k.startswith("model_state/") for k in handle.keys())  # noqa: SIM118


def test_training_state_round_trips_exactly(tmp_path: Path) -> None:
    import random

    import numpy as np

    config = tiny(num_classes=2)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),  # int-keyed state, tuple betas, tensor steps
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": [{"epoch": 1, "val_loss": float("nan")}],
    }
    path = save_checkpoint(tmp_path / "last.pt", model.state_dict(), _tiny_meta(config), state)
    back = load_checkpoint(path)["train_state"]
    assert back["python_rng"] == state["python_rng"]  # tuples stay tuples: setstate accepts
    np.random.set_state(back["numpy_rng"])
    assert np.random.get_state()[1].tolist() == state["numpy_rng"][1].tolist()
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    assert math.isnan(back["history"][0]["val_loss"])
    saved, loaded = state["optimizer"], back["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"]
    assert set(loaded["state"]) == set(saved["state"])  # int parameter ids, not strings
    for index, moments in saved["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    again = torch.optim.AdamW(model.parameters(), lr=1e-3)
    again.load_state_dict(loaded)
    assert again.state_dict()["state"].keys() == saved["state"].keys()


def _old_format(path: Path, config: ModelConfig, **extra: object) -> Path:
    """A checkpoint as histoduo 0.1 wrote it: a torch.save pickle."""
    import numpy as np

    payload = {
        "format": "histoduo-checkpoint",
        "format_version": 1,
        "histoduo_version": "0.1.0",
        "meta": _tiny_meta(config).to_dict(),
        "model_state": build_model(config).state_dict(),
        "train_state": {"numpy_rng": np.random.get_state()},
        **extra,
    }
    torch.save(payload, path)
    return path


def test_old_pickled_checkpoint_needs_trust(tmp_path: Path, capsys) -> None:
    config = tiny(num_classes=2)
    old = _old_format(tmp_path / "old.pt", config)
    with pytest.raises(CheckpointError, match=r"old\.pt: .*pickle.*--trust-checkpoint"):
        load_model(old)
    model, meta = load_model(old, trust=True)
    warning = capsys.readouterr().err
    assert "old.pt is a pickle" in warning and "runs any code" in warning
    assert meta.class_names == ["normal", "tumour"]
    new = convert_checkpoint(old, tmp_path / "new.pt")
    rebuilt, _ = load_model(new)  # no trust needed any more
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert isinstance(load_checkpoint(new)["train_state"]["numpy_rng"][1], np.ndarray)


class _Payload:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_does_not_run(tmp_path: Path, container: str) -> None:
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"format": "histoduo-checkpoint", "meta": _Payload(marker)}
    if container == "torch-zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pt: .*pickle.*--trust-checkpoint"):
        load_model(evil)
    assert not marker.exists()


def test_tensors_that_share_memory_are_saved(tmp_path: Path) -> None:
    config = tiny(num_classes=2)
    state = build_model(config).state_dict()
    first = next(k for k, v in state.items() if v.ndim == 2)
    state["tied_copy"] = state[first]  # tied weights: safetensors refuses shared storage
    state["a_view"] = state[first][1:]  # same storage, another offset
    path = save_checkpoint(tmp_path / "m.pt", state, _tiny_meta(config))
    loaded = load_checkpoint(path)["model_state"]
    assert torch.equal(loaded["tied_copy"], state[first])
    assert torch.equal(loaded["a_view"], state[first][1:])
