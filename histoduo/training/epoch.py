"""One training epoch and its validation, over a :class:`TrainSession`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from histoduo.training.metrics import classification_report
from histoduo.training.session import TrainSession


def _predict_rows(model: Any, loader: Any, device: Any, autocast: bool) -> tuple[Any, Any, float]:
    """(truth, predicted, mean loss) over a loader, in order."""
    import torch

    from histoduo.runtime.decode import device_batches

    truths, preds, losses, n = [], [], 0.0, 0
    model.eval()
    dtype = next(model.parameters()).dtype  # bf16 weights (accel.Runtime) take bf16 input
    with torch.inference_mode():
        for x, y in device_batches(loader, device, dtype=dtype):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x).float()
            losses += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            truths.append(y.cpu().numpy())
            preds.append(logits.argmax(1).cpu().numpy())
    if not truths:
        return np.empty(0, int), np.empty(0, int), float("nan")
    return np.concatenate(truths), np.concatenate(preds), losses / max(n, 1)


def train_epoch(
    session: TrainSession, net: Any, loader: Any, bars: Any, epoch: int
) -> dict[str, Any]:
    """One pass over the training batches; the epoch's metrics row (loss, lr, throughput)."""
    import torch

    from histoduo.runtime.decode import device_batches

    config, device, optimizer = session.config, session.device, session.optimizer
    session.sampler.set_epoch(epoch)
    net.train()
    bars.start(f"epoch {epoch}/{config.epochs}", session.iterations)
    loss_sum, seen, started = 0.0, 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    lr_used = optimizer.param_groups[0]["lr"]
    batches = device_batches(loader, device, channels_last=config.channels_last)
    for step, (x, y) in enumerate(batches, start=1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=session.autocast):
            loss = session.criterion(net(x).float(), y)
        (loss / config.grad_accumulation).backward()
        if step % config.grad_accumulation == 0 or step == session.iterations:
            lr_used = optimizer.param_groups[0]["lr"]  # what this step trained with
            optimizer.step()
            session.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.item() * len(y)
        seen += len(y)
        rate = seen * session.dist.world_size / max(time.perf_counter() - started, 1e-9)
        bars.advance(loss_sum / seen, lr_used, rate)
    if session.dist.enabled:  # the loss over all ranks: every rank sees the same history
        totals = torch.tensor([loss_sum, seen], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        loss_sum, seen = float(totals[0]), int(totals[1])
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "lr": lr_used,
        "train_tiles_per_s": seen / max(time.perf_counter() - started, 1e-9),
    }


def validate(session: TrainSession, row: dict[str, Any]) -> float:
    """Adds validation metrics to ``row``; returns the score that picks the best epoch."""
    if not len(session.val_rows):
        return -row["train_loss"]  # no validation slides: keep the latest
    truth, predicted, val_loss = _predict_rows(
        session.model, session.val_loader, session.device, session.autocast
    )
    report = classification_report(truth, predicted, session.table.class_names)
    row.update(
        val_loss=val_loss,
        val_balanced_accuracy=report["balanced_accuracy"],
        val_accuracy=report["accuracy"],
    )
    return report["balanced_accuracy"]
