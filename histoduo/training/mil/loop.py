"""``train_mil``: a slide-level model from slide labels and per-slide feature files.

One bag (slide) per step, as attention MIL is usually trained; bags stream from their files
through a DataLoader worker. The best epoch is chosen on validation only (balanced accuracy,
then loss); the test split is touched once, by the final report. With ``folds=K`` every
fold is a full run in ``out/fold_<k>``, and ``out/report.json`` holds their mean and spread.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoduo.grading import ClassRoles
from histoduo.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from histoduo.models.mil import MILModelConfig, build_mil_model
from histoduo.runtime.files import atomic_write, atomic_write_text, remove_stale_temporaries
from histoduo.runtime.progress import EpochProgress
from histoduo.training.data import LabelError
from histoduo.training.mil.config import MILConfig
from histoduo.training.mil.data import (
    BagDataset,
    Cohort,
    EpochSlides,
    MILLabelError,
    fold_of_patient,
    fold_splits,
    load_cohort,
    read_splits_csv,
    split_by_patient,
    write_splits_csv,
)
from histoduo.training.mil.report import METRICS, evaluate, final_report, summarise_folds
from histoduo.training.mil.run import MILRun


@dataclass
class MILResult:
    run_dir: Path
    report: dict[str, Any] = field(default_factory=dict)
    fold_dirs: list[Path] = field(default_factory=list)


def train_mil(
    config: MILConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> MILResult:
    """Train (and evaluate) a slide-level model; returns the run folder and its report.

    ``out_dir`` receives config.json, splits.csv, metrics.csv, best.pt, last.pt,
    training_curves.png, confusion_val.png / confusion_test.png, predictions.csv,
    attention.csv and report.json (per fold in ``fold_<k>/`` with ``folds > 1``).
    ``resume`` continues an interrupted run from its last.pt (finished folds are kept).
    """
    say = log or (lambda message: None)
    cohort = load_cohort(config.features_dir, config.labels_csv, config.grades)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"{len(cohort.frame)} labelled slides, {cohort.frame['patient'].nunique()} patients, "
        f"classes {cohort.label_counts()}, encoder {cohort.info.encoder} "
        f"({cohort.info.embedding_dim}-d)"
    )
    if config.folds == 1:
        report = _train_one(config, cohort, out, None, resume, progress, say)
        return MILResult(out, report, [out])
    fold_of = fold_of_patient(cohort, config.folds, config.seed)
    _write_folds(out / "folds.csv", cohort, fold_of)
    reports, dirs = [], []
    for fold in range(config.folds):
        fold_dir = out / f"fold_{fold}"
        done = (fold_dir / "report.json").is_file() and resume
        if done:
            say(f"fold {fold}: finished earlier, kept")
            reports.append(json.loads((fold_dir / "report.json").read_text()))
        else:
            say(f"fold {fold + 1} of {config.folds}")
            split_of = fold_splits(cohort, config.folds, fold, config.seed)
            resume_fold = resume and (fold_dir / "last.pt").is_file()
            reports.append(
                _train_one(config, cohort, fold_dir, split_of, resume_fold, progress, say)
            )
        dirs.append(fold_dir)
    summary = summarise_folds(config, cohort, reports)
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "config.json", json.dumps(_config_json(config, cohort), indent=2))
    for split in ("val", "test"):
        block = summary[split]
        say(
            f"{config.folds}-fold {split}: "
            + ", ".join(f"{m} {block[m]:.3f} +/- {block['std'][m]:.3f}" for m in METRICS)
        )
    return MILResult(out, summary, dirs)


# --- one run (one split) -------------------------------------------------------------------


def _config_json(config: MILConfig, cohort: Cohort) -> dict[str, Any]:
    return {
        "train_mil": config.to_dict(),
        "class_names": cohort.class_names,
        "ordinal": cohort.ordinal,
        "encoder": cohort.info.encoder,
        "encoder_weights_sha256": cohort.info.weights_sha256,
        "embedding_dim": cohort.info.embedding_dim,
        "slides": len(cohort.frame),
    }


def _setup(config: MILConfig, cohort: Cohort, out: Path, split_of: dict[str, str]) -> MILRun:
    import torch

    from histoduo.runtime.device import resolve_device

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed)
    model_config = MILModelConfig(
        aggregator=config.aggregator,
        in_dim=cohort.info.embedding_dim,
        n_classes=len(cohort.class_names),
        hidden_dim=config.hidden_dim,
        attention_dim=config.attention_dim,
        dropout=config.dropout,
        multi_branch=config.multi_branch,
        heads=config.heads,
        encoder=cohort.info.encoder,
        encoder_weights_sha256=cohort.info.weights_sha256,
        encoder_info={
            "mpp": cohort.info.mpp,
            "input_size_px": cohort.info.input_size_px,
            **dict(cohort.info.extra),
        },
    )
    device = resolve_device(config.device)
    model = build_mil_model(model_config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    return MILRun(
        config=config,
        cohort=cohort,
        out=out,
        split_of=split_of,
        model_config=model_config,
        model=model,
        optimizer=optimizer,
        device=device,
    )


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train_one(
    config: MILConfig,
    cohort: Cohort,
    out: Path,
    split_of: dict[str, str] | None,
    resume: bool,
    progress: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # a killed run's half-written checkpoint or CSV
    if resume:
        split_of = read_splits_csv(out / "splits.csv", cohort)
    elif split_of is None:
        try:
            split_of = split_by_patient(
                cohort, config.val_fraction, config.test_fraction, config.seed
            )
        except LabelError as exc:
            raise MILLabelError(config.labels_csv, str(exc)) from exc
    run = _setup(config, cohort, out, split_of)
    train_rows, val_rows = run.rows("train"), run.rows("val")
    missing = sorted(set(range(len(cohort.class_names))) - set(train_rows["label"]))
    if missing:
        names = [cohort.class_names[i] for i in missing]
        raise MILLabelError(config.labels_csv, f"no training slides of class(es) {names}")
    if val_rows.empty:
        raise MILLabelError(config.labels_csv, "no validation slides: too few patients")
    start, best, history = 1, (-1.0, -np.inf), []
    if resume:
        start, best, history = _restore(run, say)
    else:
        write_splits_csv(out / "splits.csv", cohort, split_of)
        atomic_write_text(out / "config.json", json.dumps(_config_json(config, cohort), indent=2))
    say(
        f"{out}: train {cohort.label_counts(train_rows)}, val {cohort.label_counts(val_rows)}, "
        f"test {cohort.label_counts(run.rows('test'))}"
    )
    sampler = EpochSlides(train_rows["label"].to_numpy(), config.seed, config.balanced_sampler)
    loader = _loader(
        BagDataset(train_rows["path"], train_rows["label"], config.qc), sampler, config
    )
    stale = _epochs_since_best(history)  # a resumed run keeps counting toward its patience
    with EpochProgress(progress) as bars:
        for epoch in range(start, config.epochs + 1):
            sampler.set_epoch(epoch)
            row = _train_epoch(run, loader, bars, epoch)
            evaluation = evaluate(run, val_rows, want_attention=False)
            row.update({f"val_{k}": v for k, v in evaluation.scores.items()})
            history.append(row)
            score = _score(row)
            improved = score > best
            best, stale = (score, 0) if improved else (best, stale + 1)
            _save_epoch(run, row, epoch, best, history, improved)
            say(
                f"epoch {epoch}: loss {row['train_loss']:.4f}, val balanced accuracy "
                f"{row['val_balanced_accuracy']:.3f}, val loss {row['val_loss']:.4f}"
                + (" (best)" if improved else "")
            )
            patience = config.early_stopping_patience
            if patience is not None and stale >= patience:
                say(f"early stop: no validation gain in {stale} epochs")
                break
    return final_report(run, history)


def _loader(dataset: BagDataset, sampler: Any, config: MILConfig) -> Any:
    from torch.utils.data import DataLoader

    from histoduo.runtime.pool import pool_context

    workers = config.num_workers
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        # One worker reads the next bags while the model works on this one; the queue is
        # short so only a few bags are ever in memory.
        prefetch_factor=2 if workers else None,
        persistent_workers=workers > 0,
        multiprocessing_context=pool_context() if workers else None,
    )


def _train_epoch(run: MILRun, loader: Any, bars: EpochProgress, epoch: int) -> dict[str, Any]:
    import torch

    config, model = run.config, run.model
    model.train()
    criterion = torch.nn.CrossEntropyLoss()
    tile_seed = int(np.random.default_rng([config.seed, epoch, 0x7113]).integers(2**62))
    generator = torch.Generator().manual_seed(tile_seed)  # which tiles a capped bag keeps
    losses, tiles = [], 0
    bars.start(f"epoch {epoch}", len(loader.sampler))
    started = time.perf_counter()
    for features, label, _ in loader:
        if config.max_train_tiles is not None and len(features) > config.max_train_tiles:
            keep = torch.randperm(len(features), generator=generator)[: config.max_train_tiles]
            features = features[keep]
        features = features.to(run.device, non_blocking=True)
        logits, _ = model(features)
        loss = criterion(logits[None], torch.tensor([label], device=run.device))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        losses.append(float(loss.detach()))
        tiles += len(features)
        elapsed = time.perf_counter() - started
        bars.advance(losses[-1], run.optimizer.param_groups[0]["lr"], tiles / max(elapsed, 1e-9))
    seconds = time.perf_counter() - started
    return {
        "epoch": epoch,
        "train_loss": float(np.mean(losses)),
        "train_seconds": seconds,
        "train_tiles_per_s": tiles / max(seconds, 1e-9),
    }


# --- checkpoints -----------------------------------------------------------------------------


def _meta(run: MILRun, metrics: dict[str, Any], epoch: int) -> CheckpointMeta:
    info = run.cohort.info
    names = run.cohort.class_names
    return CheckpointMeta(
        model_config=run.model_config.to_dict(),
        class_names=list(names),
        class_roles=ClassRoles.infer(names, run.config.grades).to_dict(),
        target_mpp=info.mpp,
        tile_size_px=int(info.extra.get("tile_size_px", info.input_size_px)),
        input_size_px=info.input_size_px,
        mean=list(info.mean),
        std=list(info.std),
        train_config=run.config.to_dict(),
        metrics=metrics,
        epoch=epoch,
    )


def _save_epoch(
    run: MILRun,
    row: dict[str, Any],
    epoch: int,
    best: tuple[float, float],
    history: list[dict[str, Any]],
    improved: bool,
) -> None:
    import torch

    metrics = {"best_val_balanced_accuracy": best[0], **{k: v for k, v in row.items()}}
    meta = _meta(run, metrics, epoch)
    state = run.model.state_dict()
    train_state = {
        "optimizer": run.optimizer.state_dict(),
        "epoch": epoch,
        "best": list(best),
        "history": history,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    if improved:
        save_checkpoint(run.out / "best.pt", state, meta)
    save_checkpoint(run.out / "last.pt", state, meta, train_state)
    _write_metrics(run.out, history)


def _score(row: dict[str, Any]) -> tuple[float, float]:
    """What model selection maximises: validation balanced accuracy, then minus its loss."""
    return (row["val_balanced_accuracy"], -row["val_loss"])


def _epochs_since_best(history: list[dict[str, Any]]) -> int:
    if not history:
        return 0
    scores = [_score(row) for row in history]
    first_best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # strict gains only
    return len(scores) - 1 - first_best


def _restore(run: MILRun, say: Callable[[str], None]) -> tuple[int, tuple[float, float], list]:
    import torch

    last = run.out / "last.pt"
    payload = load_checkpoint(last)
    state = payload.get("train_state")
    if state is None:
        raise MILLabelError(last, "has no training state to resume from")
    stored = MILModelConfig.from_dict(CheckpointMeta.from_dict(payload["meta"]).model_config)
    if replace(stored, encoder_info={}) != replace(run.model_config, encoder_info={}):
        raise MILLabelError(last, "was trained with other settings or features; use a new --out")
    run.model.load_state_dict(payload["model_state"])
    run.optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    epoch = int(state["epoch"])
    say(f"resuming after epoch {epoch}")
    best = state["best"]
    return epoch + 1, (float(best[0]), float(best[1])), list(state["history"])


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    # The curves PNG is drawn once, by the final report: matplotlib costs ~1 s per figure.
    with atomic_write(out / "metrics.csv", "w", newline="") as handle:
        pd.DataFrame(history).to_csv(handle, index=False)


def _write_folds(path: Path, cohort: Cohort, fold_of: dict[str, int]) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "fold"])
        for slide, patient in cohort.frame[["slide", "patient"]].itertuples(index=False):
            writer.writerow([slide, patient, fold_of[patient]])
