"""``evaluate``: a checkpoint's classification report on a store's labelled tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from histoduo.models.checkpoint import CheckpointMeta
from histoduo.store import TileStore, require_pixels
from histoduo.training.augment import EvalTransform
from histoduo.training.config import TrainConfig
from histoduo.training.data import (
    LabelError,
    SequentialBatches,
    read_splits,
    tile_table,
)
from histoduo.training.epoch import _predict_rows
from histoduo.training.metrics import classification_report
from histoduo.training.session import _dataset, _loader, _rows, _workers


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
    features_dir: str | Path | None = None,
    encoder_weights: str | Path | None = None,
) -> dict[str, Any]:
    """The classification report of a checkpoint on a store's labelled tiles.

    A head trained on cached features is evaluated on ``features_dir`` (the store's
    ``features_<encoder>`` folder, made with the same weights: checked by hash).

    ``split`` other than "all" needs ``splits_csv`` (default: ``splits.csv`` beside the
    checkpoint, as ``train`` writes it). On a GPU the model runs as ``predict`` runs it
    (bf16 weights, channels_last) on tiles decoded there (accel.py, decode.py); batch size
    default 256 on GPU, 64 on CPU.
    """
    from histoduo.models.checkpoint import load_model

    model, meta = load_model(checkpoint, trust=trust_checkpoint, encoder_weights=encoder_weights)
    store = TileStore(store_path)
    head = meta.model_config.get("arch") in ("linear", "mlp")
    if not head:
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
    features = None
    if head:
        features = _head_features(checkpoint, meta, features_dir, store, rows)
        encoded, num_workers = False, 0  # in memory: nothing to decode
    if num_workers is None:
        num_workers = default_workers("bytes") if encoded else _workers(TrainConfig())
    transform = EvalTransform(meta.input_size_px, meta.mean, meta.std, meta.eval_resize)
    loader = _loader(
        _dataset(Path(store_path), rows, transform, encoded, features),
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


def _head_features(
    checkpoint: str | Path,
    meta: CheckpointMeta,
    features_dir: str | Path | None,
    store: TileStore,
    rows: pd.DataFrame,
) -> Any:
    """The cached features a feature head is evaluated on, from the same encoder weights."""
    from histoduo.training.features import load_feature_set

    encoder = meta.model_config.get("encoder")
    if features_dir is None:
        raise LabelError(
            f"{checkpoint}: a head on {encoder} features; pass --features "
            "DIR/features_<encoder> (histoduo embed of this store)"
        )
    features = load_feature_set(features_dir, store, sorted(rows["slide"].unique()))
    expected = meta.model_config.get("encoder_weights_sha256", "")
    if features.info.weights_sha256 != expected:
        raise LabelError(
            f"{features_dir}: features made with weights {features.info.weights_sha256[:16]}..., "
            f"the head {checkpoint} was trained on {expected[:16]}... features"
        )
    return features
