"""Classification metrics from a confusion matrix (no scikit-learn needed)."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows = truth, columns = prediction."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``truth`` (NaN without any)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in np.unique(truth)]
    return float(np.mean(recalls)) if recalls else float("nan")


def classification_report(
    truth: np.ndarray, predicted: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Balanced accuracy (mean recall over classes present), accuracy, per-class recall,
    precision and F1, and the confusion matrix, as a JSON-able dict."""
    matrix = confusion_matrix(truth, predicted, len(class_names))
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    hits = np.diag(matrix)
    recall = np.divide(hits, support, out=np.zeros(len(hits)), where=support > 0)
    precision = np.divide(hits, predicted_count, out=np.zeros(len(hits)), where=predicted_count > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros(len(hits)), where=denominator > 0
    )
    present = support > 0
    return {
        "n_tiles": int(support.sum()),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "accuracy": float(hits.sum() / max(support.sum(), 1)),
        "per_class": {
            name: {"recall": float(r), "precision": float(p), "f1": float(f), "support": int(n)}
            for name, r, p, f, n in zip(class_names, recall, precision, f1, support)
        },
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "class_names": list(class_names),
        "confusion_matrix": matrix.tolist(),
    }
