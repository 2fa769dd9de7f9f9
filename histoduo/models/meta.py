"""What a checkpoint says about its model besides the weights: :class:`CheckpointMeta`, and
its validation before anything is built."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histoduo.grading.roles import ClassRoles
from histoduo.models.pickles import CheckpointError


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
    # derived from the id (histoduo.results.display). Absent in older checkpoints.
    class_display_names: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        """The metadata of a checkpoint file, type- and range-checked (ValueError/TypeError
        saying which field): every value here sizes a model or a tiling run."""
        if not isinstance(data, dict):
            raise TypeError(f"meta must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        names = data.get("class_display_names") or {}
        if not isinstance(names, dict):
            raise TypeError("class_display_names must be a JSON object")
        data["class_display_names"] = {str(k): str(v) for k, v in names.items()}
        meta = cls(**data)
        meta.validate()
        return meta

    def validate(self) -> None:
        """ValueError naming the first field that is of the wrong type or out of range."""

        def number(name: str, value: Any, low: float, high: float) -> None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name} must be in {low:g}-{high:g}, got {value}")

        number("target_mpp", self.target_mpp, 1e-3, 1000.0)
        for name in ("tile_size_px", "input_size_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            number(name, value, 8, 8192)
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, numbers.Integral):
            raise ValueError(f"epoch must be an integer, got {self.epoch!r}")
        if not isinstance(self.model_config, dict):
            raise ValueError("model_config must be a JSON object")
        if (
            not isinstance(self.class_names, list)
            or not 1 <= len(self.class_names) <= 10_000
            or not all(isinstance(n, str) and n for n in self.class_names)
        ):
            raise ValueError(f"class_names must be a list of names, got {self.class_names!r:.80}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, list) or not 1 <= len(values) <= 64:
                raise ValueError(f"{name} must be a list of per-channel numbers, got {values!r}")
            for value in values:
                number(name, value, -1e6 if name == "mean" else 1e-12, 1e6)
        if self.eval_resize not in ("resize", "center_crop"):
            raise ValueError(f"eval_resize must be resize or center_crop, got {self.eval_resize!r}")
        if not isinstance(self.class_roles, dict):
            raise ValueError("class_roles must be a JSON object")

    @property
    def roles(self) -> ClassRoles:
        return ClassRoles.from_dict(self.class_roles)


# --- plain-type encoding of training state ------------------------------------------------
# JSON has no tensors, tuples or int dict keys, and optimizer state needs all three (its
# ``state`` is keyed by parameter index). Tagged objects keep them; decoding accepts only
# these tags, JSON scalars, lists and str-keyed dicts.


def check_meta(path: Path, meta: Any) -> CheckpointMeta:
    """The checkpoint's metadata and model config, validated, or a CheckpointError naming
    the file and the field (a config asking for 10**6 layers never reaches the builder)."""
    from histoduo.models.config import ModelConfig

    try:
        parsed = CheckpointMeta.from_dict(meta)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(path, f"checkpoint metadata is incomplete ({exc})") from exc
    except ValueError as exc:
        raise CheckpointError(path, f"checkpoint metadata is not usable: {exc}") from exc
    if parsed.model_config.get("kind") == "mil":  # a slide model: load_mil_model checks it
        return parsed
    try:
        ModelConfig.from_dict(parsed.model_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"the stored model config is not usable ({exc})") from exc
    return parsed
