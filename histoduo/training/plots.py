"""Pictures of a training run: curves and confusion matrices (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _figure():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:  # noqa: ANN001
    from histoduo.runtime.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")


def training_curves(metrics: pd.DataFrame, path: Path) -> Path:
    """Loss and validation balanced accuracy per epoch, side by side."""
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(metrics["epoch"], metrics["train_loss"], marker="o", label="train loss")
    if "val_loss" in metrics and metrics["val_loss"].notna().any():
        left.plot(metrics["epoch"], metrics["val_loss"], marker="o", label="validation loss")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    left.legend()
    if "val_balanced_accuracy" in metrics and metrics["val_balanced_accuracy"].notna().any():
        right.plot(
            metrics["epoch"], metrics["val_balanced_accuracy"], marker="o", color="tab:green"
        )
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_ylabel("validation balanced accuracy")
    right.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def confusion_matrix_plot(
    matrix: np.ndarray, class_names: list[str], path: Path, title: str
) -> Path:
    """Row-normalised confusion matrix with counts in each cell."""
    plt = _figure()
    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = 1.2 + 0.9 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=35, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
                fontsize=9,
            )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
