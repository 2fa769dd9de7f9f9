"""histoduo checkpoints: weights plus everything needed to use them without repeating flags.

A checkpoint is a ``torch.save`` dict::

    format            "histoduo-checkpoint"
    format_version    1
    histoduo_version  str
    meta              CheckpointMeta.to_dict(): model config, class names and roles, mpp,
                      tile and input size, normalisation, training config, metrics, epoch
    model_state       the model's state_dict (backbone included)
    train_state       optional: optimizer / scheduler / sampler / RNG state for --resume

``predict`` tiles slides from ``meta`` (mpp, tile size) and builds the model from
``meta.model_config``, so a checkpoint rebuilds the identical model with no flags.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histoduo.run.errors import HistoduoError
from histoduo.run.files import atomic_path

CHECKPOINT_FORMAT = "histoduo-checkpoint"
CHECKPOINT_VERSION = 1

_NORMAL_NAMES = {"normal", "benign", "healthy", "non_tumor", "non-tumor", "nontumor", "stroma"}
_NECROSIS_NAMES = {"necrosis", "necrotic"}
_LOW_WORDS = ("low",)
_HIGH_WORDS = ("high",)


class CheckpointError(HistoduoError):
    """A file is not a usable histoduo checkpoint; the message names the file."""


@dataclass
class ClassRoles:
    """What each class means for slide-level grading.

    ``grades`` are tumour classes ordered from lowest to highest grade (one entry = tumour
    without grades, e.g. TCGA's "cancer"); ``normal`` and ``necrosis`` are reported as area
    fractions; ``other`` classes are ignored by the grade rule.
    """

    grades: list[str] = field(default_factory=list)
    normal: list[str] = field(default_factory=list)
    necrosis: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> ClassRoles:
        return cls(**{k: list(v) for k, v in data.items()})

    def validate(self, class_names: list[str]) -> None:
        named = self.grades + self.normal + self.necrosis + self.other
        unknown = sorted(set(named) - set(class_names))
        if unknown:
            raise ValueError(f"class roles name unknown classes {unknown}; classes: {class_names}")
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise ValueError(f"classes given more than one role: {twice}")

    @classmethod
    def infer(cls, class_names: list[str], grades: list[str] | None = None) -> ClassRoles:
        """Roles from class names: normal/benign, necrosis, and grades ordered low -> high
        (``low_grade`` < ``high_grade``; ``grade_1`` < ``grade_2``; ``G1`` < ``G4``).

        ``grades`` overrides the inferred grade order; every other class that is neither
        normal nor necrosis is a tumour grade of its own only if nothing else is a grade.
        """
        roles = cls()
        rest: list[str] = []
        for name in class_names:
            key = name.strip().lower()
            if grades is not None and name in grades:
                continue
            if key in _NORMAL_NAMES:
                roles.normal.append(name)
            elif key in _NECROSIS_NAMES:
                roles.necrosis.append(name)
            else:
                rest.append(name)
        if grades is not None:
            roles.grades = list(grades)
            roles.other = rest
        else:
            graded = [n for n in rest if _grade_rank(n) is not None]
            roles.grades = sorted(graded, key=lambda n: _grade_rank(n) or 0.0)
            roles.other = [n for n in rest if n not in graded]
            if not roles.grades and len(roles.other) == 1:
                roles.grades, roles.other = roles.other, []  # e.g. "cancer", "tumor"
        roles.validate(class_names)
        return roles


def _grade_rank(name: str) -> float | None:
    key = name.strip().lower()
    number = re.search(r"(?:grade|^g)[ _-]?(\d)", key)
    if number:
        return float(number.group(1))
    if any(word in key for word in _LOW_WORDS):
        return 1.0
    if any(word in key for word in _HIGH_WORDS):
        return 3.0
    if "grade" in key or "tumo" in key or "cancer" in key or "carcinoma" in key:
        return 2.0
    return None


@dataclass
class CheckpointMeta:
    """Everything about a trained model except its weights."""

    model_config: dict[str, Any]
    class_names: list[str]
    class_roles: dict[str, list[str]]
    target_mpp: float
    tile_size_px: int
    input_size_px: int
    mean: list[float]
    std: list[float]
    eval_resize: str = "resize"  # how a tile becomes model input: "resize" or "center_crop"
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    # {class id: name people read, e.g. "ISUP grade 3-4"}; missing classes get a default
    # derived from the id (histoduo.display). Absent in older checkpoints.
    class_display_names: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        data = dict(data)
        data["class_display_names"] = {
            str(k): str(v) for k, v in (data.get("class_display_names") or {}).items()
        }
        return cls(**data)

    @property
    def roles(self) -> ClassRoles:
        return ClassRoles.from_dict(self.class_roles)


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, Any],
    meta: CheckpointMeta,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename)."""
    import torch

    from histoduo import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "histoduo_version": __version__,
        "meta": meta.to_dict(),
        "model_state": model_state,
    }
    if train_state is not None:
        payload["train_state"] = train_state
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The checkpoint dict, or a CheckpointError saying why the file is not one."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(path, f"not a readable torch checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            path,
            "not a histoduo checkpoint (no 'format': 'histoduo-checkpoint'); to use backbone "
            "weights from another project, pass the file with --backbone-weights",
        )
    version = int(payload.get("format_version", 0))
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            path, f"checkpoint format {version} is newer than this histoduo; upgrade histoduo"
        )
    try:
        CheckpointMeta.from_dict(payload["meta"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(path, f"checkpoint metadata is incomplete ({exc})") from exc
    return payload


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[Any, CheckpointMeta]:
    """(model in eval mode, meta) rebuilt from a checkpoint alone."""
    from histoduo.models import ModelConfig, build_model

    payload = load_checkpoint(path, map_location)
    meta = CheckpointMeta.from_dict(payload["meta"])
    # The state dict holds the backbone; never re-read the original weights file.
    config = ModelConfig.from_dict(meta.model_config).replace(backbone_weights=None)
    model = build_model(config)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit the stored model config ({exc})") from exc
    model.eval()
    return model, meta
