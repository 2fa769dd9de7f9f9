"""Training data from cached features (``train --features DIR/features_<encoder>``).

Feature files (``embed``) hold one row per store tile, in the store's tile order, so a tile
table row (slide, tile) indexes them directly; the same splits, samplers and reports as tile
training apply. Features stay float16 in memory and become float32 per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.store.features import FeatureFileError, FeatureInfo, feature_files, read_feature_bag


@dataclass
class FeatureSet:
    """Every needed slide's features, checked against the store they were embedded from."""

    folder: Path
    info: FeatureInfo  # the first file's provenance (encoder, weights hash, normalisation)
    by_slide: dict[str, np.ndarray] = field(default_factory=dict)  # (n_tiles, D) float16

    @property
    def encoder(self) -> str:
        return self.info.encoder

    @property
    def embedding_dim(self) -> int:
        return self.info.embedding_dim

    @property
    def encoder_arg(self) -> str:
        """What rebuilds the encoder (a registry name, timm:<model>, or a checkpoint path)."""
        return str(self.info.extra.get("encoder_arg", self.info.encoder))

    def rows(self, slides: np.ndarray, tiles: np.ndarray) -> np.ndarray:
        """(len(rows), D) float16 features of table rows (slide, tile index)."""
        out = np.empty((len(tiles), self.embedding_dim), dtype=np.float16)
        for slide in np.unique(slides):
            where = np.flatnonzero(slides == slide)
            out[where] = self.by_slide[str(slide)][tiles[where]]
        return out


def load_feature_set(folder: str | Path, store: Any, slides: Sequence[str]) -> FeatureSet:
    """The features of ``slides`` of ``store``; an error naming the folder or file when a
    slide has none, was embedded from another tiling, or by another encoder or weights."""
    folder = Path(folder)
    files = feature_files(folder)
    missing = [s for s in slides if s not in files]
    if missing:
        raise FeatureFileError(
            folder,
            f"no features for {len(missing)} slide(s) of the store (e.g. {missing[:3]}); run "
            f"histoduo embed on {store.path}",
        )
    first: FeatureInfo | None = None
    by_slide: dict[str, np.ndarray] = {}
    for slide in slides:
        path = files[slide]
        bag = read_feature_bag(path, dtype="float16")
        if first is None:
            first = bag.info
        elif (bag.info.encoder, bag.info.weights_sha256) != (first.encoder, first.weights_sha256):
            raise FeatureFileError(
                path,
                f"made by {bag.info.encoder} ({bag.info.weights_sha256[:12]}), the others by "
                f"{first.encoder} ({first.weights_sha256[:12]}): one encoder per training run",
            )
        coords = store.coords(slide)
        if len(coords) != len(bag.coords) or not np.array_equal(coords, bag.coords):
            raise FeatureFileError(
                path,
                f"its {len(bag.coords)} tiles are not the store's {len(coords)} tiles of "
                f"{slide!r} (the store was tiled again?): rerun histoduo embed",
            )
        by_slide[slide] = bag.features
    if first is None:
        raise FeatureFileError(folder, "the store has no slides to train on")
    return FeatureSet(folder, first, by_slide)


class FeatureBatches:
    """Map-style dataset with :class:`~histoduo.training.data.TileBatches`' interface:
    ``dataset[rows]`` or ``dataset[(seed, rows)]`` -> (features float32, labels)."""

    transform = None  # nothing to decode or augment (device_batches reads the attribute)

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: Sequence[int] | tuple[int, Sequence[int]]) -> tuple[Any, Any]:
        import torch

        rows = np.asarray(item[1] if isinstance(item, tuple) else item)
        x = torch.from_numpy(self.features[rows].astype(np.float32))
        return x, torch.as_tensor(self.labels[rows], dtype=torch.long)
