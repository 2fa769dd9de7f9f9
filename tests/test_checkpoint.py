"""Checkpoints: class roles for grading, and clear errors for files that are not ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_configs import tiny

from histoduo.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    ClassRoles,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from histoduo.models import ModelConfig, build_model


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
    return CheckpointMeta(
        model_config=config.to_dict(),
        class_names=["normal", "tumour"],
        class_roles=ClassRoles.infer(["normal", "tumour"]).to_dict(),
        target_mpp=1.0,
        tile_size_px=64,
        input_size_px=64,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )


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
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    config = tiny(num_classes=2)
    state = build_model(config).state_dict()
    wrong = config.replace(embed_dim=64, scale_heads=2)
    path = save_checkpoint(tmp_path / "m.pt", state, _tiny_meta(wrong))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)
