"""Labelled tiles for training: the tile index, slide-level splits, datasets and samplers.

Splits are made over slides (or patients), never tiles, so no slide can be in two splits.
Datasets read whole batches: the DataLoader's sampler yields lists of row numbers, and each
worker opens the tile store itself (TileStore reopens its HDF5 handle per process).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoduo.runtime.decode import EncodedBatch, encoded_pixels
from histoduo.store import UNLABELLED, TileStore

SPLITS = ("train", "val", "test")


class LabelError(ValueError):
    """Labels are missing, unknown or contradictory; the message names the file."""


@dataclass
class TileTable:
    """Every labelled tile: ``frame`` has columns slide, tile, label, group (split unit)."""

    frame: pd.DataFrame
    class_names: list[str]

    def counts(self) -> dict[str, int]:
        values = np.bincount(self.frame["label"].to_numpy(), minlength=len(self.class_names))
        return dict(zip(self.class_names, values.tolist()))


def store_tile_size_px(store_path: str | Path) -> int:
    """The tile size of a store's slides: a model's default input size."""
    from histoduo.store import StoreError

    with TileStore(store_path) as tiles:
        if not tiles.slides:
            raise StoreError(store_path, "the tile store holds no slides")
        return tiles.record(tiles.slides[0]).tile_size_px


def read_slide_labels(path: str | Path) -> pd.DataFrame:
    """A ``slide,label[,patient]`` CSV; a slide listed twice with two labels is an error."""
    path = Path(path)
    if not path.exists():
        raise LabelError(f"{path}: slide-label CSV not found")
    frame = pd.read_csv(path, dtype=str).rename(columns=str.strip)
    frame.columns = [c.lower() for c in frame.columns]
    missing = {"slide", "label"} - set(frame.columns)
    if missing:
        raise LabelError(f"{path}: needs columns slide,label (missing {sorted(missing)})")
    frame = frame.dropna(subset=["slide", "label"])
    frame["slide"] = frame["slide"].str.strip()
    frame["label"] = frame["label"].str.strip()
    conflicts = frame.groupby("slide")["label"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise LabelError(
            f"{path}: slides with more than one label: {', '.join(conflicts.index[:5])}"
        )
    return frame.drop_duplicates("slide")


def tile_table(
    store: TileStore,
    slide_labels_csv: str | Path | None = None,
    split_by: str = "slide",
) -> TileTable:
    """Labelled tiles of a store; slide-level labels (when given) override tile labels."""
    index = store.index()
    class_names = list(store.class_names)
    if slide_labels_csv is not None:
        labels = read_slide_labels(slide_labels_csv)
        known = set(store.slides)
        unknown_slides = sorted(set(labels["slide"]) - known)
        if unknown_slides:
            raise LabelError(
                f"{slide_labels_csv}: slides not in {store.path}: {', '.join(unknown_slides[:5])}"
            )
        if not class_names:
            class_names = sorted(labels["label"].unique())
        unknown = sorted(set(labels["label"]) - set(class_names))
        if unknown:
            raise LabelError(
                f"{slide_labels_csv}: unknown class name(s) {unknown}; "
                f"the store's classes are {class_names}"
            )
        by_slide = dict(zip(labels["slide"], labels["label"]))
        index["label"] = [
            class_names.index(by_slide[s]) if s in by_slide else UNLABELLED for s in index["slide"]
        ]
        if "patient" in labels.columns:
            patients = dict(zip(labels["slide"], labels["patient"]))
            index["patient"] = [patients.get(s, s) for s in index["slide"]]
    if not class_names:
        raise LabelError(
            f"{store.path}: the store has no labels; tile with --annotations, import a labelled "
            "image folder, or pass --slide-labels CSV"
        )
    frame = index[index["label"] >= 0].reset_index(drop=True)
    if frame.empty:
        raise LabelError(f"{store.path}: no labelled tiles")
    if split_by == "patient":
        if "patient" not in frame.columns:
            frame["patient"] = [_store_patient(store, s) for s in frame["slide"]]
        frame["group"] = frame["patient"].astype(str)
    else:
        frame["group"] = frame["slide"]
    return TileTable(frame[["slide", "tile", "label", "group"]].copy(), class_names)


def _store_patient(store: TileStore, slide: str) -> str:
    patient = store.record(slide).patient
    return patient if patient is not None else slide


def make_splits(
    table: TileTable, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """group -> split, stratified by each group's most common class and seeded.

    Groups are ordered by (dominant class, random) and dealt to the split furthest below
    its quota, so every class is spread over the splits as evenly as whole groups allow.
    """
    dominant = table.frame.groupby("group")["label"].agg(lambda s: int(np.bincount(s).argmax()))
    rng = np.random.default_rng(seed)
    groups = list(dominant.index)
    keys = rng.permutation(len(groups))
    order = sorted(range(len(groups)), key=lambda i: (dominant.iloc[i], keys[i]))
    fractions = {
        "train": 1 - val_fraction - test_fraction,
        "val": val_fraction,
        "test": test_fraction,
    }
    counts = dict.fromkeys(SPLITS, 0)
    assignment: dict[str, str] = {}
    for position, i in enumerate(order, start=1):
        split = max(SPLITS, key=lambda s: (fractions[s] * position - counts[s], s == "train"))
        counts[split] += 1
        assignment[groups[i]] = split
    if counts["train"] == 0:
        raise LabelError("too few slides to split: none left for training")
    return assignment


def read_splits(path: str | Path, table: TileTable) -> dict[str, str]:
    """A ``slide,split`` CSV (or ``patient,split`` when splitting by patient)."""
    path = Path(path)
    if not path.exists():
        raise LabelError(f"{path}: splits CSV not found")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "split" not in rows[0]:
        raise LabelError(f"{path}: needs a 'split' column and a slide (or patient) column")
    bad = sorted({row["split"].strip() for row in rows} - set(SPLITS))
    if bad:
        raise LabelError(f"{path}: unknown split name(s) {bad}; use train, val, test")
    if "patient" in rows[0]:
        assignment = {row["patient"].strip(): row["split"].strip() for row in rows}
    else:
        # By slide (as train writes splits.csv); when groups are patients, every slide of a
        # patient must be in the same split.
        by_slide = {row["slide"].strip(): row["split"].strip() for row in rows}
        assignment = {}
        for slide, group in (
            table.frame[["slide", "group"]].drop_duplicates().itertuples(index=False)
        ):
            if slide not in by_slide:
                continue
            if assignment.setdefault(group, by_slide[slide]) != by_slide[slide]:
                raise LabelError(f"{path}: slides of {group!r} are in different splits")
    missing = sorted(set(table.frame["group"]) - set(assignment))
    if missing:
        raise LabelError(f"{path}: no split for {', '.join(missing[:5])}")
    return assignment


def write_splits(path: Path, table: TileTable, assignment: dict[str, str]) -> None:
    rows = (
        table.frame.groupby(["slide", "group"])
        .size()
        .reset_index(name="tiles")
        .assign(split=lambda f: f["group"].map(assignment))
    )
    from histoduo.runtime.files import atomic_write

    with atomic_write(path, "w", newline="") as handle:
        rows[["slide", "group", "split", "tiles"]].to_csv(handle, index=False)


# --- datasets ------------------------------------------------------------------------------


class TileBatches:
    """Map-style dataset whose items are whole batches: ``dataset[[rows...]]``.

    Reads tiles of one batch slide by slide (fewer HDF5 calls), decodes, and applies
    ``transform`` (uint8 tensor batch -> float tensor batch) inside the worker.
    """

    def __init__(
        self,
        store_path: str | Path,
        slides: np.ndarray,
        tiles: np.ndarray,
        labels: np.ndarray,
        transform: Any,
    ) -> None:
        self.store = TileStore(store_path)
        self.slides = slides
        self.tiles = tiles
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tiles)

    def read(self, rows: Sequence[int]) -> np.ndarray:
        rows = np.asarray(rows)
        first = self.store.read_tiles(str(self.slides[rows[0]]), [int(self.tiles[rows[0]])])
        out = np.empty((len(rows), *first.shape[1:]), dtype=np.uint8)
        for slide in np.unique(self.slides[rows]):
            where = np.flatnonzero(self.slides[rows] == slide)
            out[where] = self.store.read_tiles(str(slide), self.tiles[rows[where]])
        return out

    def __getitem__(self, item: Sequence[int] | tuple[int, Sequence[int]]) -> tuple[Any, Any]:
        """``rows`` (evaluation) or ``(batch_seed, rows)`` (training): augmentation draws
        from a generator seeded per batch, so results do not depend on which worker, or
        which run after a resume, produces the batch."""
        import torch

        from histoduo.models.preprocess import to_tensor_batch

        if isinstance(item, tuple):
            batch_seed, rows = item
            generator = torch.Generator().manual_seed(int(batch_seed))
            batch = self.transform(to_tensor_batch(self.read(rows)), generator)
        else:
            rows = item
            batch = self.transform(to_tensor_batch(self.read(rows)))
        labels = torch.as_tensor(self.labels[np.asarray(rows)], dtype=torch.long)
        return batch, labels


def _batch_seed(seed: int, epoch: int, number: int, rank: int) -> int:
    """A seed per (run seed, epoch, batch, rank) for that batch's augmentation."""
    return int(np.random.default_rng([seed, epoch, number, rank]).integers(2**62))


class _EpochBatches:
    """Training batches seeded by (run seed, epoch); each rank keeps its slice of a batch.

    Subclasses produce the global batches of one epoch from ``rng``; this class attaches
    each batch's augmentation seed and hands rank ``r`` the rows ``r::world_size``.
    """

    def __init__(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for number, rows in enumerate(self.global_batches(rng)):
            yield (
                _batch_seed(self.seed, self.epoch, number, self.rank),
                rows[self.rank :: self.world_size].tolist(),
            )


class BalancedBatches(_EpochBatches):
    """Batches with (nearly) equal tiles per class, drawn with replacement, seeded per epoch.

    Every rank of a distributed run draws the same global batches and keeps its own slice,
    so N processes train on exactly the tiles one process would. (Augmentation is seeded per
    batch and rank, so the augmented pixels differ from a one-process run.)
    """

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        iterations: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.iterations = iterations

    def __len__(self) -> int:
        return self.iterations

    def global_batches(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        n_classes = len(self.by_class)
        for _ in range(self.iterations):
            per_class = np.full(n_classes, self.batch_size // n_classes)
            per_class[rng.permutation(n_classes)[: self.batch_size % n_classes]] += 1
            rows = np.concatenate(
                [rng.choice(members, size=k) for members, k in zip(self.by_class, per_class)]
            )
            yield rng.permutation(rows)


class ShuffledBatches(_EpochBatches):
    """Every row once per epoch in a seeded order (for weighted-loss training)."""

    def __init__(
        self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        self.n_rows = n_rows

    def __len__(self) -> int:
        return max(1, self.n_rows // self.batch_size)

    def global_batches(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        order = rng.permutation(self.n_rows)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]


class SequentialBatches:
    """All rows in order, in batches (evaluation)."""

    def __init__(self, n_rows: int, batch_size: int) -> None:
        self.n_rows = n_rows
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n_rows, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.n_rows)))


class EncodedTileBatches(TileBatches):
    """:class:`TileBatches` whose workers only read: items are ``(seed, EncodedBatch, labels)``
    and :func:`device_batches` decodes and transforms them in the main process, with the same
    per-batch augmentation seed the worker would have used."""

    def read_encoded(self, rows: Sequence[int]) -> EncodedBatch:
        rows = np.asarray(rows)
        slides = self.slides[rows]
        out: list[np.ndarray | None] = [None] * len(rows)
        for slide in np.unique(slides):
            where = np.flatnonzero(slides == slide)
            blobs = self.store.read_jpeg_bytes(str(slide), self.tiles[rows[where]])
            if blobs is None:  # a raw-pixel slide in the batch: send pixels for all
                return encoded_pixels(self.read(rows))
            for position, blob in zip(where, blobs):
                out[position] = blob
        return EncodedBatch(jpeg=out)  # type: ignore[arg-type]

    def __getitem__(self, item: Sequence[int] | tuple[int, Sequence[int]]) -> tuple[Any, ...]:
        import torch

        seed, rows = item if isinstance(item, tuple) else (None, item)
        labels = torch.as_tensor(self.labels[np.asarray(rows)], dtype=torch.long)
        return seed, self.read_encoded(rows), labels
