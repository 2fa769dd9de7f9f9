"""The evaluation half of ``train_mil``: scores of a split, and the final report of a run
(best.pt on validation and test, confusion PNGs, predictions.csv, attention.csv) or of a
cross-validation (mean and spread over folds)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from histoduo.models.mil import load_mil_model
from histoduo.runtime.files import atomic_write, atomic_write_text
from histoduo.training.metrics import (
    classification_report,
    one_vs_rest_auc,
    quadratic_weighted_kappa,
)
from histoduo.training.mil.config import MILConfig
from histoduo.training.mil.data import Cohort
from histoduo.training.mil.run import MILRun

METRICS = ("balanced_accuracy", "macro_f1", "auc", "qwk")


@dataclass
class Evaluation:
    slides: list[str]
    truth: np.ndarray
    probabilities: np.ndarray
    scores: dict[str, float]


def evaluate(
    run: MILRun,
    rows: pd.DataFrame,
    *,
    model: Any = None,
    want_attention: bool,
    attention_writer: Any = None,
) -> Evaluation:
    """Probabilities of every slide in ``rows`` and the split's scores; with
    ``attention_writer`` each slide's tile attention is written as it is computed."""
    import torch

    from histoduo.store.features import read_feature_bag

    model = model or run.model
    model.eval()
    n_classes = len(run.cohort.class_names)
    probabilities = np.zeros((len(rows), n_classes))
    losses = []
    with torch.inference_mode():
        for i, (path, label) in enumerate(zip(rows["path"], rows["label"])):
            bag = read_feature_bag(path).kept(run.config.qc)  # as in training
            logits, attention = model(torch.from_numpy(bag.features).to(run.device))
            probabilities[i] = torch.softmax(logits.float(), -1).cpu().numpy()
            losses.append(float(-np.log(max(probabilities[i, label], 1e-12))))
            if want_attention and attention_writer is not None:
                attention_writer(bag, attention.float().cpu().numpy())
    truth = rows["label"].to_numpy()
    predicted = probabilities.argmax(axis=1)
    report = classification_report(truth, predicted, run.cohort.class_names)
    scores = {
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "balanced_accuracy": report["balanced_accuracy"],
        "macro_f1": report["macro_f1"],
        "auc": one_vs_rest_auc(truth, probabilities),
        "qwk": quadratic_weighted_kappa(truth, predicted, n_classes),
    }
    return Evaluation(rows["slide"].tolist(), truth, probabilities, scores)


def _attention_header(run: MILRun) -> list[str]:
    columns = run.model_config.attention_columns
    names = (
        ["attention"] if columns == 1 else [f"attention_{name}" for name in run.cohort.class_names]
    )
    return ["slide", "tile", "x_level0_px", "y_level0_px", *names]


def final_report(run: MILRun, history: list[dict[str, Any]]) -> dict[str, Any]:
    """best.pt on validation and test: report.json, confusion PNGs, predictions.csv and
    attention.csv (rows written slide by slide, never a cohort's attention at once)."""
    from histoduo.training.plots import confusion_matrix_plot, training_curves

    out, names = run.out, run.cohort.class_names
    training_curves(pd.DataFrame(history), out / "training_curves.png")
    model, meta = load_mil_model(out / "best.pt", str(run.device))
    report: dict[str, Any] = {
        "best_epoch": meta.epoch,
        "epochs_run": len(history),
        "class_names": names,
        "ordinal": run.cohort.ordinal,
        "aggregator": run.model_config.aggregator,
        "encoder": run.model_config.encoder,
        "slides": {s: len(run.rows(s)) for s in ("train", "val", "test")},
    }
    predictions: list[list[Any]] = []
    with atomic_write(out / "attention.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_attention_header(run))

        def write_attention(bag: Any, attention: np.ndarray) -> None:
            rows = zip(bag.tile_numbers.tolist(), bag.coords.tolist(), attention)
            for tile, (x, y), values in rows:  # tile: the store's number, QC-dropped or not
                writer.writerow([bag.slide, tile, x, y, *(f"{v:.6g}" for v in values)])

        for split in ("val", "test"):
            rows = run.rows(split)
            if rows.empty:
                continue
            evaluation = evaluate(
                run, rows, model=model, want_attention=True, attention_writer=write_attention
            )
            report[split] = _split_block(evaluation, names)
            matrix = np.array(report[split]["confusion_matrix"])
            title = f"{split}: balanced accuracy {report[split]['balanced_accuracy']:.3f}"
            confusion_matrix_plot(matrix, names, out / f"confusion_{split}.png", title)
            for slide, label, probs in zip(
                evaluation.slides, evaluation.truth, evaluation.probabilities
            ):
                predictions.append(
                    [slide, split, names[label], names[int(probs.argmax())], *probs.round(6)]
                )
    with atomic_write(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "split", "label", "predicted", *(f"prob_{n}" for n in names)])
        writer.writerows(predictions)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def _split_block(evaluation: Evaluation, names: list[str]) -> dict[str, Any]:
    predicted = evaluation.probabilities.argmax(axis=1)
    details = classification_report(evaluation.truth, predicted, names)
    return {
        "n_slides": len(evaluation.slides),
        **{m: evaluation.scores[m] for m in METRICS},
        "loss": evaluation.scores["loss"],
        "accuracy": details["accuracy"],
        "per_class": details["per_class"],
        "confusion_matrix": details["confusion_matrix"],
    }


def summarise_folds(
    config: MILConfig, cohort: Cohort, reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """Mean and spread (sample standard deviation) of each metric over the folds."""
    summary: dict[str, Any] = {
        "folds": config.folds,
        "class_names": cohort.class_names,
        "ordinal": cohort.ordinal,
        "aggregator": config.aggregator,
    }
    for split in ("val", "test"):
        values = {m: [r[split][m] for r in reports if split in r] for m in METRICS}
        summary[split] = {
            **{m: float(np.nanmean(v)) if v else float("nan") for m, v in values.items()},
            "std": {
                m: float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()
            },
            "per_fold": values,
        }
    return summary
