"""The training loop: slide-level splits, checkpoints that carry their metadata, resume.

Multi-GPU: launch the same command under torchrun, e.g.
``torchrun --nproc-per-node 4 -m histoduo train tiles.h5 --out runs/x``; every rank draws
the same global batches and keeps its slice, gradients are averaged by DDP, and rank 0 alone
writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoduo.checkpoint import CheckpointMeta, ClassRoles, load_checkpoint, save_checkpoint
from histoduo.store import TileStore
from histoduo.training.augment import EvalTransform, TrainTransform
from histoduo.training.config import TrainConfig
from histoduo.training.data import (
    BalancedBatches,
    LabelError,
    SequentialBatches,
    ShuffledBatches,
    TileBatches,
    TileTable,
    make_splits,
    read_splits,
    tile_table,
    write_splits,
)
from histoduo.training.metrics import classification_report


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Dist:
    """torchrun's environment: rank, world size, and whether this rank writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> _Dist:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _device(name: str, dist: _Dist) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _workers(config: TrainConfig) -> int:
    if config.num_workers is not None:
        return config.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(4, (cores or 1) - 1))


def _loader(dataset: TileBatches, sampler: Any, workers: int) -> Any:
    """Workers persist across epochs (the sampler, iterated in this process, changes the
    batches; each batch carries its own augmentation seed)."""
    from torch.utils.data import DataLoader

    from histoduo.tiling import _pool_context

    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=_pool_context() if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def _rows(table: TileTable, split_of: dict[str, str], split: str) -> pd.DataFrame:
    return table.frame[table.frame["group"].map(split_of) == split].reset_index(drop=True)


def _dataset(store_path: Path, rows: pd.DataFrame, transform: Any) -> TileBatches:
    return TileBatches(
        store_path,
        rows["slide"].to_numpy(),
        rows["tile"].to_numpy(),
        rows["label"].to_numpy(),
        transform,
    )


def _predict_rows(model: Any, loader: Any, device: Any, autocast: bool) -> tuple[Any, Any, float]:
    """(truth, predicted, mean loss) over a loader, in order."""
    import torch

    truths, preds, losses, n = [], [], 0.0, 0
    model.eval()
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x).float()
            losses += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            truths.append(y.cpu().numpy())
            preds.append(logits.argmax(1).cpu().numpy())
    if not truths:
        return np.empty(0, int), np.empty(0, int), float("nan")
    return np.concatenate(truths), np.concatenate(preds), losses / max(n, 1)


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
    first = store.attrs(store.slides[0])
    roles = ClassRoles.infer(table.class_names, config.grades)
    eval_resize = "center_crop" if config.augment.center_crop_fraction < 1.0 else "resize"
    return CheckpointMeta(
        model_config=model_config.to_dict(),
        class_names=list(table.class_names),
        class_roles=roles.to_dict(),
        target_mpp=float(first["target_mpp"]),
        tile_size_px=int(first["tile_size_px"]),
        input_size_px=int(model_config.input_size_px),
        mean=list(mean),
        std=list(std),
        eval_resize=eval_resize,
        train_config=config.to_dict(),
        metrics=metrics,
        epoch=epoch,
        class_display_names=dict(config.class_display_names),
    )


def _check_store_geometry(store: TileStore) -> None:
    sizes = {(store.attrs(s)["tile_size_px"], store.attrs(s)["target_mpp"]) for s in store.slides}
    if len(sizes) > 1:
        raise LabelError(
            f"{store.path}: slides were tiled with different tile sizes or resolutions "
            f"{sorted(sizes)}; a model needs one"
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
) -> TrainResult:
    """Train a classifier on the labelled tiles of a store; returns where everything is.

    ``out_dir`` receives config.json, splits.csv, metrics.csv, last.pt, best.pt,
    training_curves.png, confusion_val.png / confusion_test.png and report.json.
    ``resume=True`` continues from ``out_dir/last.pt`` exactly where it stopped.
    """
    import torch

    from histoduo.models import ModelConfig, build_model, maybe_compile

    config = config or TrainConfig()
    dist = _Dist.from_env()
    say = (log if dist.main else None) or (lambda message: None)  # one rank talks
    if dist.enabled and config.batch_size < dist.world_size:
        raise ValueError(
            f"batch size {config.batch_size} is smaller than the {dist.world_size} processes: "
            "every process needs tiles from each global batch"
        )
    device = _device(config.device, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL: each rank on its own GPU
    owns_group = dist.enabled and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    autocast = config.bf16 == "on" or (config.bf16 == "auto" and device.type == "cuda")
    out = Path(out_dir)
    store_path = Path(store_path)
    store = TileStore(store_path)
    if not store.slides:
        raise LabelError(f"{store_path}: the tile store holds no complete slides")
    _check_store_geometry(store)
    table = tile_table(store, config.slide_labels_csv, config.split_by)
    n_classes = len(table.class_names)
    unnamed = sorted(set(config.class_display_names) - set(table.class_names))
    if unnamed:
        raise LabelError(f"display names for unknown classes {unnamed}: {table.class_names}")
    split_of = (
        read_splits(config.splits_csv, table)
        if config.splits_csv
        else make_splits(table, config.val_fraction, config.test_fraction, config.seed)
    )
    train_rows = _rows(table, split_of, "train")
    val_rows = _rows(table, split_of, "val")
    test_rows = _rows(table, split_of, "test")
    missing = sorted(set(range(n_classes)) - set(train_rows["label"]))
    if missing:
        names = [table.class_names[i] for i in missing]
        raise LabelError(f"{store_path}: no training tiles for class(es) {names}")

    model_config = model_config or ModelConfig()
    if model_config.num_classes != n_classes:
        model_config = model_config.replace(num_classes=n_classes)
    _seed_everything(config.seed)
    model = build_model(model_config)
    mean, std = (list(v) for v in model.normalization)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_cls(trainable, lr=config.lr, weight_decay=config.weight_decay)

    world_batch = config.batch_size
    iterations = config.iterations_per_epoch or max(1, len(train_rows) // world_batch)
    steps_per_epoch = math.ceil(iterations / config.grad_accumulation)
    total_steps = steps_per_epoch * config.epochs
    if config.scheduler == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps
        )
    elif config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    counts = np.bincount(train_rows["label"], minlength=n_classes)
    class_weight = None
    if config.weighted_loss:
        class_weight = torch.tensor(
            counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device
        )
    criterion = torch.nn.CrossEntropyLoss(
        weight=class_weight, label_smoothing=config.label_smoothing
    )
    train_transform = TrainTransform(config.augment, model_config.input_size_px, mean, std)
    eval_resize = "center_crop" if config.augment.center_crop_fraction < 1.0 else "resize"
    eval_transform = EvalTransform(model_config.input_size_px, mean, std, eval_resize)
    if config.balanced_sampler and not config.weighted_loss:
        sampler: Any = BalancedBatches(
            train_rows["label"].to_numpy(),
            world_batch,
            iterations,
            config.seed,
            dist.rank,
            dist.world_size,
        )
    else:
        sampler = ShuffledBatches(
            len(train_rows), world_batch, config.seed, dist.rank, dist.world_size
        )
        iterations = len(sampler)
    workers = _workers(config)
    train_set = _dataset(store_path, train_rows, train_transform)
    val_loader = _loader(
        _dataset(store_path, val_rows, eval_transform),
        SequentialBatches(len(val_rows), max(world_batch, 64)),
        workers,
    )

    start_epoch, best_score, history = 1, -1.0, []
    if resume:
        last = out / "last.pt"
        payload = load_checkpoint(last)
        state = payload.get("train_state")
        if state is None:
            raise LabelError(f"{last}: has no training state to resume from")
        model.load_state_dict(payload["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_score = float(state["best_score"])
        history = list(state["history"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        say(f"resuming after epoch {start_epoch - 1}")
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            json.dumps(
                {
                    "train": config.to_dict(),
                    "model": model_config.to_dict(),
                    "store": str(store_path),
                    "class_names": table.class_names,
                    "tiles": {
                        "train": len(train_rows),
                        "val": len(val_rows),
                        "test": len(test_rows),
                    },
                },
                indent=2,
            )
        )
        write_splits(out / "splits.csv", table, split_of)

    net = maybe_compile(model, config.compile)
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader = _loader(train_set, sampler, workers)
    bars = _Bars(progress and dist.main)
    epochs_without_gain = 0
    with bars:
        for epoch in range(start_epoch, config.epochs + 1):
            sampler.set_epoch(epoch)
            net.train()
            bars.start(f"epoch {epoch}/{config.epochs}", iterations)
            loss_sum, seen, started = 0.0, 0, time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            lr_used = optimizer.param_groups[0]["lr"]
            for step, (x, y) in enumerate(loader, start=1):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = criterion(net(x).float(), y)
                (loss / config.grad_accumulation).backward()
                if step % config.grad_accumulation == 0 or step == iterations:
                    lr_used = optimizer.param_groups[0]["lr"]  # what this step trained with
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item() * len(y)
                seen += len(y)
                rate = seen * dist.world_size / max(time.perf_counter() - started, 1e-9)
                bars.advance(loss_sum / seen, lr_used, rate)
            if dist.enabled:  # the loss over all ranks: every rank sees the same history
                totals = torch.tensor([loss_sum, seen], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(totals)
                loss_sum, seen = float(totals[0]), int(totals[1])
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                "lr": lr_used,
                "train_tiles_per_s": seen / max(time.perf_counter() - started, 1e-9),
            }
            if len(val_rows):
                truth, predicted, val_loss = _predict_rows(model, val_loader, device, autocast)
                report = classification_report(truth, predicted, table.class_names)
                row.update(
                    val_loss=val_loss,
                    val_balanced_accuracy=report["balanced_accuracy"],
                    val_accuracy=report["accuracy"],
                )
                score = report["balanced_accuracy"]
            else:
                score = -row["train_loss"]  # no validation slides: keep the latest
            history.append(row)
            improved = score > best_score
            if improved:
                best_score, epochs_without_gain = score, 0
            else:
                epochs_without_gain += 1
            if dist.main:
                metrics = {
                    "best_val_balanced_accuracy": best_score if len(val_rows) else None,
                    **{k: v for k, v in row.items() if k != "epoch"},
                }
                meta = _meta(model_config, table, store, config, mean, std, metrics, epoch)
                train_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "best_score": best_score,
                    "history": history,
                    "python_rng": random.getstate(),
                    "numpy_rng": np.random.get_state(),
                    "torch_rng": torch.get_rng_state(),
                }
                if improved:
                    save_checkpoint(out / "best.pt", model.state_dict(), meta)
                save_checkpoint(out / "last.pt", model.state_dict(), meta, train_state)
                _write_metrics(out, history)
            say(_epoch_line(row))
            if (
                config.early_stopping_patience is not None
                and epochs_without_gain >= config.early_stopping_patience
            ):
                say(f"early stop: no validation gain in {epochs_without_gain} epochs")
                break

    final: dict[str, Any] = {}
    if dist.main:
        final = _final_report(
            out,
            store_path,
            table,
            val_rows,
            test_rows,
            eval_transform,
            workers,
            device,
            autocast,
            history,
        )
    if dist.enabled:  # waits for rank 0's report, and every rank returns it
        shared = [final]
        torch.distributed.broadcast_object_list(shared, src=0)
        final = shared[0]
    if owns_group:
        torch.distributed.destroy_process_group()
    return TrainResult(out, out / "best.pt", out / "last.pt", final)


def _epoch_line(row: dict[str, Any]) -> str:
    text = f"epoch {row['epoch']}: loss {row['train_loss']:.4f}"
    if "val_balanced_accuracy" in row:
        text += f", val balanced accuracy {row['val_balanced_accuracy']:.3f}"
    return text + f", {row['train_tiles_per_s']:.0f} tiles/s"


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    from histoduo.training.plots import training_curves

    frame = pd.DataFrame(history)
    tmp = out / "metrics.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(out / "metrics.csv")
    training_curves(frame, out / "training_curves.png")


def _final_report(
    out: Path,
    store_path: Path,
    table: TileTable,
    val_rows: pd.DataFrame,
    test_rows: pd.DataFrame,
    eval_transform: EvalTransform,
    workers: int,
    device: Any,
    autocast: bool,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Evaluate best.pt on validation and test; write report.json and confusion PNGs."""
    from histoduo.checkpoint import load_model
    from histoduo.training.plots import confusion_matrix_plot

    model, meta = load_model(out / "best.pt")
    model = model.to(device)
    report: dict[str, Any] = {
        "best_epoch": meta.epoch,
        "epochs_run": len(history),
        "class_names": table.class_names,
    }
    for split, rows in (("val", val_rows), ("test", test_rows)):
        if not len(rows):
            continue
        loader = _loader(
            _dataset(store_path, rows, eval_transform), SequentialBatches(len(rows), 64), workers
        )
        truth, predicted, _ = _predict_rows(model, loader, device, autocast)
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
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    return report


def evaluate(
    store_path: str | Path,
    checkpoint: str | Path,
    split: str = "all",
    splits_csv: str | Path | None = None,
    *,
    slide_labels_csv: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """The classification report of a checkpoint on a store's labelled tiles.

    ``split`` other than "all" needs ``splits_csv`` (default: ``splits.csv`` beside the
    checkpoint, as ``train`` writes it).
    """
    from histoduo.checkpoint import load_model

    model, meta = load_model(checkpoint)
    store = TileStore(store_path)
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
    torch_device = _device(device, _Dist())
    model = model.to(torch_device)
    transform = EvalTransform(meta.input_size_px, meta.mean, meta.std, meta.eval_resize)
    loader = _loader(
        _dataset(Path(store_path), rows, transform),
        SequentialBatches(len(rows), batch_size),
        _workers(TrainConfig(num_workers=num_workers)),
    )
    truth, predicted, loss = _predict_rows(model, loader, torch_device, torch_device.type == "cuda")
    report = classification_report(truth, predicted, meta.class_names)
    report.update(split=split, loss=loss, checkpoint=str(checkpoint), store=str(store_path))
    return report


class _Bars:
    """A rich progress bar per epoch with loss, lr and throughput (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bars:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[rate]}"),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(
                description, total=total, loss="-", lr="-", rate=""
            )

    def advance(self, loss: float, lr: float, rate: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                advance=1,
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                rate=f"{rate:.0f} tiles/s",
            )
