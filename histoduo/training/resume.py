"""Resuming a run: the same splits, and a schedule that can be extended (docs/training.md).

``--resume`` continues the run in ``--out``. The splits are the run's own ``splits.csv``,
never recomputed from the flags, and flags that decide the splits must match the run's
``config.json``: otherwise a validation or test slide could move into training.

``--resume --epochs N`` with N above the run's epochs extends the run: the learning-rate
schedule the first run planned (OneCycle or cosine over its epochs) is replaced, from the
current step, by a cosine *tail* over every remaining step (what the old schedule had left
plus the added epochs), down to zero from the current learning rate or a tenth of ``--lr``,
whichever is larger. A run that had finished its schedule sits at an annealed, near-zero
rate, so its tail restarts from a tenth of ``--lr`` (a warm restart) and the added epochs
still learn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histoduo.training.config import TrainConfig
from histoduo.training.data import LabelError

# TrainConfig fields that decide which slide is in which split, and the flag of each.
SPLIT_FLAGS = {
    "seed": "--seed",
    "val_fraction": "--val-fraction",
    "test_fraction": "--test-fraction",
    "split_by": "--split-by",
    "splits_csv": "--splits",
    "slide_labels_csv": "--slide-labels",
}
RESTART_FRACTION = 0.1  # a finished schedule's tail starts from this fraction of --lr


def run_config(out: Path) -> dict[str, Any]:
    path = out / "config.json"
    if not path.exists():
        raise LabelError(f"{path}: not found; --resume continues a run in --out that has one")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabelError(f"{path}: unreadable run configuration ({exc})") from None


def resume_splits(out: Path, config: TrainConfig) -> Path:
    """The run's ``splits.csv``, once the split-relevant settings match its config.json.

    Raises LabelError naming the first flag that differs and the value the run used.
    """
    saved = run_config(out).get("train", {})
    for field, flag in SPLIT_FLAGS.items():
        ours, theirs = getattr(config, field), saved.get(field)
        if ours != theirs:
            shown = "not given" if theirs is None else repr(theirs)
            raise LabelError(
                f"{out / 'config.json'}: the run used {flag} {shown}, this call gives "
                f"{'none' if ours is None else repr(ours)}; resuming with another value "
                f"could move slides between train, validation and test. Give {flag} as the "
                "run did, or start a new run in another --out"
            )
    splits = out / "splits.csv"
    if not splits.exists():
        raise LabelError(f"{splits}: not found; the run's splits are needed to resume it")
    return splits


def schedule_epochs(state: dict[str, Any], out: Path) -> int:
    """The epochs the saved scheduler was planned for (config.json's for older runs)."""
    if "schedule_epochs" in state:
        return int(state["schedule_epochs"])
    return int(run_config(out).get("train", {}).get("epochs", 0))


def cosine_tail(optimizer: Any, start_lr: float, steps: int) -> Any:
    """A cosine from ``start_lr`` to zero over ``steps`` optimiser steps."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = start_lr
        group["initial_lr"] = start_lr  # the schedule's base, not the first run's
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))


def tail_start_lr(current_lr: float, config: TrainConfig) -> float:
    return max(current_lr, RESTART_FRACTION * config.lr)
