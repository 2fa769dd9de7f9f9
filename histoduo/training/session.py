"""Training setup: the distributed runtime, the data, the model and its optimiser.

:func:`setup_session` turns a store and a :class:`TrainConfig` into a :class:`TrainSession`,
everything an epoch needs; ``loop.train`` then runs epochs over it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoduo.store import TileStore, require_pixels
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
)
from histoduo.training.features import FeatureBatches, FeatureSet, load_feature_set


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
    from histoduo.runtime.device import resolve_device

    return resolve_device(name, dist.local_rank)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _workers(config: TrainConfig) -> int:
    if config.num_workers is not None:
        return config.num_workers
    from histoduo.runtime.pool import default_workers

    return default_workers("training")


def _loader(dataset: TileBatches, sampler: Any, workers: int, device: Any = None) -> Any:
    """Workers persist across epochs (the sampler, iterated in this process, changes the
    batches; each batch carries its own augmentation seed). Pinned batches for a GPU."""
    import torch
    from torch.utils.data import DataLoader

    from histoduo.runtime.device import loader_options
    from histoduo.runtime.pool import pool_context
    from histoduo.tiling.read import WORKER_PRELOAD

    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        multiprocessing_context=pool_context(WORKER_PRELOAD) if workers else None,
        persistent_workers=workers > 0,
        **loader_options(device or torch.device("cpu"), workers),
    )


def _rows(table: TileTable, split_of: dict[str, str], split: str) -> pd.DataFrame:
    return table.frame[table.frame["group"].map(split_of) == split].reset_index(drop=True)


def _dataset(
    store_path: Path,
    rows: pd.DataFrame,
    transform: Any,
    encoded: bool = False,
    features: FeatureSet | None = None,
) -> TileBatches:
    """Workers decode + transform, or (``encoded``) only read, for the GPU (decode.py);
    with ``features``, the rows' cached encoder features instead of tiles."""
    from histoduo.training.data import EncodedTileBatches

    if features is not None:
        labels = rows["label"].to_numpy()
        batches = FeatureBatches(
            features.rows(rows["slide"].to_numpy(), rows["tile"].to_numpy()), labels
        )
        return batches  # type: ignore[return-value]

    return (EncodedTileBatches if encoded else TileBatches)(
        store_path,
        rows["slide"].to_numpy(),
        rows["tile"].to_numpy(),
        rows["label"].to_numpy(),
        transform,
    )


def _check_store_geometry(store: TileStore) -> None:
    records = [store.record(s) for s in store.slides]
    sizes = {(r.tile_size_px, r.target_mpp) for r in records}
    if len(sizes) > 1:
        raise LabelError(
            f"{store.path}: slides were tiled with different tile sizes or resolutions "
            f"{sorted(sizes)}; a model needs one"
        )


@dataclass
class TrainSession:
    """Everything one training run holds between setup and its last epoch."""

    config: TrainConfig
    dist: _Dist
    device: Any
    owns_group: bool  # this call started torch.distributed and must end it
    autocast: bool
    encoded: bool  # workers only read; the device decodes and augments (decode.py)
    out: Path
    store_path: Path
    store: TileStore
    table: TileTable
    split_of: dict[str, str]
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    test_rows: pd.DataFrame
    model_config: Any
    model: Any
    mean: list[float]
    std: list[float]
    optimizer: Any
    scheduler: Any
    criterion: Any
    sampler: Any
    iterations: int
    workers: int
    train_set: TileBatches
    val_loader: Any
    eval_transform: EvalTransform
    features: FeatureSet | None = None  # training a head on cached encoder features
    steps_per_epoch: int = 1  # optimiser (and scheduler) steps per epoch
    schedule_epochs: int = 0  # the epochs the scheduler is planned for (resume.py)
    tail: dict[str, Any] | None = None  # a resumed run's cosine tail: start_lr, steps


def _runtime(config: TrainConfig) -> tuple[_Dist, Any, bool]:
    """(ranks, this rank's device, whether this call owns the process group)."""
    import torch

    dist = _Dist.from_env()
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
    return dist, device, owns_group


def _data(
    store_path: Path, config: TrainConfig, splits_path: Path | None = None
) -> tuple[TileStore, TileTable, dict[str, str], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The store, its labelled tiles, the slide-level split and the rows of each split."""
    store = TileStore(store_path)
    if not store.slides:
        raise LabelError(f"{store_path}: the tile store holds no complete slides")
    _check_store_geometry(store)
    if config.features_dir is None:
        require_pixels(store)  # a --dry-run store would fail at the first batch
    table = tile_table(store, config.slide_labels_csv, config.split_by, qc=config.qc)
    unnamed = sorted(set(config.class_display_names) - set(table.class_names))
    if unnamed:
        raise LabelError(f"display names for unknown classes {unnamed}: {table.class_names}")
    if splits_path is not None:  # a resumed run: its own splits.csv, never recomputed
        split_of = read_splits(splits_path, table)
    elif config.splits_csv:
        split_of = read_splits(config.splits_csv, table)
    else:
        split_of = make_splits(table, config.val_fraction, config.test_fraction, config.seed)
    train_rows = _rows(table, split_of, "train")
    missing = sorted(set(range(len(table.class_names))) - set(train_rows["label"]))
    if missing:
        names = [table.class_names[i] for i in missing]
        raise LabelError(f"{store_path}: no training tiles for class(es) {names}")
    val_rows, test_rows = _rows(table, split_of, "val"), _rows(table, split_of, "test")
    return store, table, split_of, train_rows, val_rows, test_rows


def _optimiser(config: TrainConfig, model: Any, total_steps: int) -> tuple[Any, Any]:
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_cls(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if config.scheduler == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps
        )
    elif config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def _criterion(config: TrainConfig, labels: np.ndarray, n_classes: int, device: Any) -> Any:
    import torch

    class_weight = None
    if config.weighted_loss:
        counts = np.bincount(labels, minlength=n_classes)
        class_weight = torch.tensor(
            counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device
        )
    return torch.nn.CrossEntropyLoss(weight=class_weight, label_smoothing=config.label_smoothing)


def _sampler(config: TrainConfig, train_rows: pd.DataFrame, dist: _Dist) -> tuple[Any, int]:
    """The training batch sampler and the iterations of one epoch."""
    world_batch = config.batch_size
    iterations = config.iterations_per_epoch or max(1, len(train_rows) // world_batch)
    if config.balanced_sampler and not config.weighted_loss:
        sampler: Any = BalancedBatches(
            train_rows["label"].to_numpy(),
            world_batch,
            iterations,
            config.seed,
            dist.rank,
            dist.world_size,
        )
        return sampler, iterations
    sampler = ShuffledBatches(len(train_rows), world_batch, config.seed, dist.rank, dist.world_size)
    return sampler, len(sampler)


def setup_session(
    store_path: Path,
    out: Path,
    config: TrainConfig,
    model_config: Any,
    *,
    trust_weights: bool = False,
    splits_path: Path | None = None,
) -> TrainSession:
    """Runtime, data, model, optimiser, sampler and loaders of a training run.

    ``trust_weights`` allows a pickled --backbone-weights file (see models/weights.py);
    ``splits_path`` is a resumed run's own splits.csv.
    """
    import torch

    from histoduo.models import ModelConfig, build_model

    dist, device, owns_group = _runtime(config)
    autocast = config.bf16 == "on" or (config.bf16 == "auto" and device.type == "cuda")
    from histoduo.runtime.decode import decode_on_device

    encoded = decode_on_device(config.decode, device)  # the GPU decodes and augments
    store, table, split_of, train_rows, val_rows, test_rows = _data(store_path, config, splits_path)
    n_classes = len(table.class_names)
    model_config = model_config or ModelConfig()
    features = None
    if config.features_dir is not None:
        features = load_feature_set(
            config.features_dir, store, sorted(table.frame["slide"].unique())
        )
        model_config = _head_config(model_config, features)
        encoded = False  # nothing to decode
        config = dataclasses.replace(config, channels_last=False)  # (B, D) batches
    if model_config.num_classes != n_classes:
        model_config = model_config.replace(num_classes=n_classes)
    _seed_everything(config.seed)
    model = build_model(model_config, trust_weights=trust_weights)
    from histoduo.models.encoders.pyramid import foundation_weights_sha256

    if foundation_weights_sha256(model):  # checkpoints name the ViT's weights, never hold them
        model_config = model_config.replace(
            encoder=model_config.backbone,
            encoder_weights_sha256=foundation_weights_sha256(model),
        )
    if features is not None:  # the encoder's input statistics, for predict on slides
        mean, std = list(features.info.mean), list(features.info.std)
    else:
        mean, std = (list(v) for v in model.normalization)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The scheduler's length follows the sampler's nominal iterations, as it always has.
    nominal = config.iterations_per_epoch or max(1, len(train_rows) // config.batch_size)
    steps_per_epoch = math.ceil(nominal / config.grad_accumulation)
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = _optimiser(config, model, total_steps)
    criterion = _criterion(config, train_rows["label"].to_numpy(), n_classes, device)
    train_transform = TrainTransform(config.augment, model_config.input_size_px, mean, std)
    eval_resize = "center_crop" if config.augment.center_crop_fraction < 1.0 else "resize"
    eval_transform = EvalTransform(model_config.input_size_px, mean, std, eval_resize)
    sampler, iterations = _sampler(config, train_rows, dist)
    workers = 0 if features is not None else _workers(config)  # features are in memory
    val_loader = _loader(
        _dataset(store_path, val_rows, eval_transform, encoded, features),
        SequentialBatches(len(val_rows), max(config.batch_size, 64)),
        workers,
        device,
    )
    return TrainSession(
        config=config,
        dist=dist,
        device=device,
        owns_group=owns_group,
        autocast=autocast,
        encoded=encoded,
        out=out,
        store_path=store_path,
        store=store,
        table=table,
        split_of=split_of,
        train_rows=train_rows,
        val_rows=val_rows,
        test_rows=test_rows,
        model_config=model_config,
        model=model,
        mean=mean,
        std=std,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=criterion,
        sampler=sampler,
        iterations=iterations,
        workers=workers,
        train_set=_dataset(store_path, train_rows, train_transform, encoded, features),
        val_loader=val_loader,
        eval_transform=eval_transform,
        features=features,
        steps_per_epoch=steps_per_epoch,
        schedule_epochs=config.epochs,
    )


def _head_config(model_config: Any, features: FeatureSet) -> Any:
    """The head's config: the architecture asked for, the encoder the features came from."""
    from histoduo.models.config import FEATURE_ARCHS

    if model_config.arch not in FEATURE_ARCHS:
        raise LabelError(
            f"{features.folder}: cached features train a head: --architecture "
            f"{' or '.join(FEATURE_ARCHS)}, not {model_config.arch}"
        )
    return model_config.replace(
        encoder=features.encoder_arg,
        encoder_weights_sha256=features.info.weights_sha256,
        features_dim=features.embedding_dim,
        input_size_px=features.info.input_size_px,
        backbone=features.encoder,
        stages=None,
    )
