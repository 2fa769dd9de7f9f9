"""The training loop: slide-level splits, checkpoints that carry their metadata, resume.

Multi-GPU: launch the same command under torchrun, e.g.
``torchrun --nproc-per-node 4 -m histoduo train tiles.h5 --out runs/x``; every rank draws
the same global batches and keeps its slice, gradients are averaged by DDP, and rank 0 alone
writes files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoduo.grading import ClassRoles
from histoduo.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from histoduo.runtime.files import atomic_write, atomic_write_text, remove_stale_temporaries
from histoduo.runtime.progress import EpochProgress
from histoduo.store import TileStore, require_pixels
from histoduo.training.augment import EvalTransform
from histoduo.training.config import TrainConfig
from histoduo.training.data import (
    LabelError,
    SequentialBatches,
    TileTable,
    read_splits,
    tile_table,
    write_splits,
)
from histoduo.training.epoch import _predict_rows, train_epoch, validate
from histoduo.training.metrics import classification_report
from histoduo.training.session import (  # noqa: F401 - _seed_everything, _loader: used by tests
    TrainSession,
    _dataset,
    _device,
    _Dist,
    _loader,
    _rows,
    _seed_everything,
    _workers,
    setup_session,
)


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True  # False on every torchrun rank but 0: only rank 0 reports


def _meta(
    model_config: Any,
    table: TileTable,
    store: TileStore,
    config: TrainConfig,
    mean: list[float],
    std: list[float],
    metrics: dict[str, Any],
    epoch: int,
) -> CheckpointMeta:
    first = store.record(store.slides[0])
    roles = ClassRoles.infer(table.class_names, config.grades)
    eval_resize = "center_crop" if config.augment.center_crop_fraction < 1.0 else "resize"
    return CheckpointMeta(
        model_config=model_config.to_dict(),
        class_names=list(table.class_names),
        class_roles=roles.to_dict(),
        target_mpp=first.target_mpp,
        tile_size_px=first.tile_size_px,
        input_size_px=int(model_config.input_size_px),
        mean=list(mean),
        std=list(std),
        eval_resize=eval_resize,
        train_config=config.to_dict(),
        metrics=metrics,
        epoch=epoch,
        class_display_names=dict(config.class_display_names),
    )


def train(
    store_path: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    model_config: Any = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    trust_checkpoint: bool = False,
) -> TrainResult:
    """Train a classifier on the labelled tiles of a store; returns where everything is.

    ``out_dir`` receives config.json, splits.csv, metrics.csv, last.pt, best.pt,
    training_curves.png, confusion_val.png / confusion_test.png and report.json.
    ``resume=True`` continues from ``out_dir/last.pt`` exactly where it stopped.
    ``trust_checkpoint`` allows pickled (old-format) checkpoints and backbone weight files.
    """
    import torch

    from histoduo.runtime.device import maybe_compile, reset_peak_memory

    config = config or TrainConfig()
    session = setup_session(
        Path(store_path), Path(out_dir), config, model_config, trust_weights=trust_checkpoint
    )
    dist, out = session.dist, session.out
    say = (log if dist.main else None) or (lambda message: None)  # one rank talks
    start_epoch, best_score, history = _resume_or_start(session, resume, say, trust_checkpoint)
    net = maybe_compile(session.model, config.compile)
    if dist.enabled:
        device = session.device
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader = _loader(session.train_set, session.sampler, session.workers, session.device)
    reset_peak_memory(session.device)
    first_epoch = start_epoch
    epochs_without_gain = 0
    with EpochProgress(progress and dist.main) as bars:
        for epoch in range(start_epoch, config.epochs + 1):
            row = train_epoch(session, net, loader, bars, epoch)
            score = validate(session, row)
            history.append(row)
            improved = score > best_score
            if improved:
                best_score, epochs_without_gain = score, 0
            else:
                epochs_without_gain += 1
            if dist.main:
                _save_epoch(session, row, epoch, best_score, history, improved)
            say(_epoch_line(row))
            patience = config.early_stopping_patience
            if patience is not None and epochs_without_gain >= patience:
                say(f"early stop: no validation gain in {epochs_without_gain} epochs")
                break
    rates = [r["train_tiles_per_s"] for r in history if r["epoch"] >= first_epoch]
    final = _final_report(session, history, rates, trust_checkpoint) if dist.main else {}
    if dist.enabled:  # waits for rank 0's report, and every rank returns it
        shared = [final]
        torch.distributed.broadcast_object_list(shared, src=0)
        final = shared[0]
    if session.owns_group:
        torch.distributed.destroy_process_group()
    return TrainResult(out, out / "best.pt", out / "last.pt", final, main_process=dist.main)


def _resume_or_start(
    session: TrainSession, resume: bool, say: Callable[[str], None], trust: bool = False
) -> tuple[int, float, list[dict[str, Any]]]:
    """(first epoch, best score, history): from last.pt, or a fresh run's config and splits."""
    import torch

    out = session.out
    remove_stale_temporaries(out)  # a killed run's half-written checkpoint or metrics
    if resume:
        last = out / "last.pt"
        payload = load_checkpoint(last, trust=trust)
        state = payload.get("train_state")
        if state is None:
            raise LabelError(f"{last}: has no training state to resume from")
        session.model.load_state_dict(payload["model_state"])
        session.optimizer.load_state_dict(state["optimizer"])
        session.scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"]) + 1
        say(f"resuming after epoch {start_epoch - 1}")
        return start_epoch, float(state["best_score"]), list(state["history"])
    if session.dist.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_config(session)
        write_splits(out / "splits.csv", session.table, session.split_of)
    return 1, -1.0, []


def _write_config(session: TrainSession) -> None:
    config = {
        "train": session.config.to_dict(),
        "model": session.model_config.to_dict(),
        "store": str(session.store_path),
        "class_names": session.table.class_names,
        "tiles": {
            "train": len(session.train_rows),
            "val": len(session.val_rows),
            "test": len(session.test_rows),
        },
    }
    atomic_write_text(session.out / "config.json", json.dumps(config, indent=2))


def _save_epoch(
    session: TrainSession,
    row: dict[str, Any],
    epoch: int,
    best_score: float,
    history: list[dict[str, Any]],
    improved: bool,
) -> None:
    """The checkpoint step: best.pt when improved, last.pt (with training state), metrics."""
    import torch

    metrics = {
        "best_val_balanced_accuracy": best_score if len(session.val_rows) else None,
        **{k: v for k, v in row.items() if k != "epoch"},
    }
    meta = _meta(
        model_config=session.model_config,
        table=session.table,
        store=session.store,
        config=session.config,
        mean=session.mean,
        std=session.std,
        metrics=metrics,
        epoch=epoch,
    )
    train_state = {
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "epoch": epoch,
        "best_score": best_score,
        "history": history,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    out, state = session.out, session.model.state_dict()
    if improved:
        save_checkpoint(out / "best.pt", state, meta)
    save_checkpoint(out / "last.pt", state, meta, train_state)
    _write_metrics(out, history)


def _epoch_line(row: dict[str, Any]) -> str:
    text = f"epoch {row['epoch']}: loss {row['train_loss']:.4f}"
    if "val_balanced_accuracy" in row:
        text += f", val balanced accuracy {row['val_balanced_accuracy']:.3f}"
    return text + f", {row['train_tiles_per_s']:.0f} tiles/s"


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    from histoduo.training.plots import training_curves

    frame = pd.DataFrame(history)
    with atomic_write(out / "metrics.csv", "w", newline="") as handle:
        frame.to_csv(handle, index=False)
    training_curves(frame, out / "training_curves.png")


def _final_report(
    session: TrainSession,
    history: list[dict[str, Any]],
    rates: list[float] | None = None,
    trust: bool = False,
) -> dict[str, Any]:
    """Evaluate best.pt on validation and test; write report.json and confusion PNGs.

    ``rates``: this run's training tiles/s per epoch, for report.json's ``throughput``."""
    import time

    from histoduo.models.checkpoint import load_model
    from histoduo.runtime.device import throughput_report
    from histoduo.training.plots import confusion_matrix_plot

    out, table = session.out, session.table
    model, meta = load_model(out / "best.pt", trust=trust)  # an old run's best.pt: a pickle
    model = model.to(session.device)
    report: dict[str, Any] = {
        "best_epoch": meta.epoch,
        "epochs_run": len(history),
        "class_names": table.class_names,
    }
    eval_tiles, eval_seconds = 0, 0.0
    for split, rows in (("val", session.val_rows), ("test", session.test_rows)):
        if not len(rows):
            continue
        loader = _loader(
            _dataset(session.store_path, rows, session.eval_transform, session.encoded),
            SequentialBatches(len(rows), 64),
            session.workers,
            session.device,
        )
        started = time.perf_counter()
        truth, predicted, _ = _predict_rows(model, loader, session.device, session.autocast)
        eval_seconds += time.perf_counter() - started
        eval_tiles += len(truth)
        report[split] = classification_report(truth, predicted, table.class_names)
        confusion_matrix_plot(
            np.array(report[split]["confusion_matrix"]),
            table.class_names,
            out / f"confusion_{split}.png",
            f"{split}: balanced accuracy {report[split]['balanced_accuracy']:.3f}",
        )
    for split in ("val", "test"):
        if split in report:
            report[f"{split}_balanced_accuracy"] = report[split]["balanced_accuracy"]
    report["throughput"] = throughput_report(
        session.device,
        rates or [],
        eval_tiles / eval_seconds if eval_seconds > 0 else None,
        precision="bf16 autocast" if session.autocast else "fp32",
        decode="device" if session.encoded else "worker",
        world_size=session.dist.world_size,
        batch_size=session.config.batch_size,
    )
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def evaluate(
    store_path: str | Path,
    checkpoint: str | Path,
    split: str = "all",
    splits_csv: str | Path | None = None,
    *,
    slide_labels_csv: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    trust_checkpoint: bool = False,
    decode: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """The classification report of a checkpoint on a store's labelled tiles.

    ``split`` other than "all" needs ``splits_csv`` (default: ``splits.csv`` beside the
    checkpoint, as ``train`` writes it). On a GPU the model runs as ``predict`` runs it
    (bf16 weights, channels_last) on tiles decoded there (accel.py, decode.py); batch size
    default 256 on GPU, 64 on CPU.
    """
    from histoduo.models.checkpoint import load_model

    model, meta = load_model(checkpoint, trust=trust_checkpoint)
    store = TileStore(store_path)
    require_pixels(store)
    table = tile_table(store, slide_labels_csv)
    if table.class_names != meta.class_names:
        raise LabelError(
            f"{store_path}: classes {table.class_names} differ from the checkpoint's "
            f"{meta.class_names} ({checkpoint})"
        )
    rows = table.frame
    if split != "all":
        path = Path(splits_csv) if splits_csv else Path(checkpoint).parent / "splits.csv"
        split_of = read_splits(path, table)
        rows = _rows(table, split_of, split)
        if rows.empty:
            raise LabelError(f"{path}: no tiles in split {split!r}")
    import time

    from histoduo.runtime.decode import decode_on_device
    from histoduo.runtime.device import Runtime, default_batch_size
    from histoduo.runtime.pool import default_workers

    runtime = Runtime.create(device, precision)
    model = runtime.prepare_model(model)
    encoded = decode_on_device(decode, runtime.device)
    if num_workers is None:
        num_workers = default_workers("bytes") if encoded else _workers(TrainConfig())
    transform = EvalTransform(meta.input_size_px, meta.mean, meta.std, meta.eval_resize)
    loader = _loader(
        _dataset(Path(store_path), rows, transform, encoded),
        SequentialBatches(len(rows), batch_size or default_batch_size(runtime.device)),
        num_workers,
        runtime.device,
    )
    started = time.perf_counter()
    truth, predicted, loss = _predict_rows(
        model, loader, runtime.device, runtime.precision == "bf16"
    )
    seconds = time.perf_counter() - started
    report = classification_report(truth, predicted, meta.class_names)
    report.update(split=split, loss=loss, checkpoint=str(checkpoint), store=str(store_path))
    report["throughput"] = {
        **runtime.describe(),
        "decode": "device" if encoded else "worker",
        "tiles_per_s": len(truth) / seconds if seconds > 0 else None,
        "peak_gpu_memory_gib": runtime.peak_memory_gib(),
    }
    return report
