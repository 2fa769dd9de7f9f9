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


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count half)."""
    import pandas as pd

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()  # ties share a rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_vs_rest_auc(truth: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in ``truth`` (NaN if only one is)."""
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    present = np.unique(truth)
    if len(present) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:  # binary: one curve, the positive class's score
        return _binary_auc(probabilities[:, 1], truth == 1)
    return float(np.mean([_binary_auc(probabilities[:, c], truth == c) for c in present]))


def quadratic_weighted_kappa(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Cohen's kappa with quadratic weights: agreement on an ordinal scale (classes in order),
    1 = perfect, 0 = chance; a call one grade off costs less than one three grades off."""
    observed = confusion_matrix(truth, predicted, n_classes).astype(np.float64)
    total = observed.sum()
    if total == 0:
        return float("nan")
    grid = np.arange(n_classes)
    weights = (grid[:, None] - grid[None, :]) ** 2 / max((n_classes - 1) ** 2, 1)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    denominator = (weights * expected).sum()
    if denominator == 0:  # one class only, on both sides: agreement is total but uninformative
        return 1.0 if (weights * observed).sum() == 0 else 0.0
    return float(1.0 - (weights * observed).sum() / denominator)
