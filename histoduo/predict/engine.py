"""The model side of prediction: tile datasets read in DataLoader workers, and the model runtime.

Tiles stream through a DataLoader whose workers open the slide (or store) themselves, never
inherited from the parent, and hand over model-ready batches; the parent only runs the model
and keeps the probabilities, so memory is bounded by a few batches for any slide size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import IterableDataset

from histoduo.predict.params import PredictParams, resolve_device
from histoduo.slide import open_slide

if TYPE_CHECKING:
    import torch

    from histoduo.checkpoint import CheckpointMeta


def _worker_share(n_chunks: int) -> range:
    """The chunk indices this DataLoader worker yields (round-robin over workers)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is None:
        return range(n_chunks)
    return range(info.id, n_chunks, info.num_workers)


@dataclass
class _TransformSpec:
    input_size_px: int
    mean: list[float]
    std: list[float]
    eval_resize: str

    def apply(self, tiles: np.ndarray) -> torch.Tensor:
        # The exact evaluation transform (preprocess.py), done in the worker so the main
        # process only runs the model.
        from histoduo.preprocess import eval_transform, to_tensor_batch

        return eval_transform(
            to_tensor_batch(tiles), self.input_size_px, self.mean, self.std, self.eval_resize
        )


class SlideTiles(IterableDataset):
    """Batches of (tile indices, model input) read from a slide by whoever iterates.

    Each DataLoader worker opens its own slide handle inside ``__iter__`` and reads its share
    of contiguous chunks, so the parent never holds a handle across a fork.
    """

    def __init__(
        self,
        slide_path: str,
        backend: str,
        mpp_override: float | None,
        coords: np.ndarray,
        size_level0: int,
        tile_size_px: int,
        batch_size: int,
        transform: _TransformSpec,
    ) -> None:
        self.slide_path = slide_path
        self.backend = backend
        self.mpp_override = mpp_override
        self.coords = coords
        self.size_level0 = size_level0
        self.tile_size_px = tile_size_px
        self.batch_size = batch_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.coords)

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        import torch

        from histoduo.tileio import read_tile

        n_chunks = math.ceil(len(self.coords) / self.batch_size)
        with open_slide(self.slide_path, self.backend, self.mpp_override) as slide:
            for chunk in _worker_share(n_chunks):
                start = chunk * self.batch_size
                stop = min(start + self.batch_size, len(self.coords))
                tiles = np.stack(
                    [
                        read_tile(slide, xy, self.size_level0, self.tile_size_px)
                        for xy in self.coords[start:stop]
                    ]
                )
                yield torch.arange(start, stop), self.transform.apply(tiles)


class StoreTiles(IterableDataset):
    """Batches from one slide of a tile store (``--tiles``); the store reopens per process."""

    def __init__(
        self, store_path: str, slide: str, n_tiles: int, batch_size: int, transform: _TransformSpec
    ) -> None:
        self.store_path = store_path
        self.slide = slide
        self.n_tiles = n_tiles
        self.batch_size = batch_size
        self.transform = transform

    def __len__(self) -> int:
        return self.n_tiles

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        import torch

        from histoduo.store import TileStore

        n_chunks = math.ceil(self.n_tiles / self.batch_size)
        with TileStore(self.store_path) as store:
            for chunk in _worker_share(n_chunks):
                start = chunk * self.batch_size
                stop = min(start + self.batch_size, self.n_tiles)
                tiles = store.read_tiles(self.slide, np.arange(start, stop))
                yield torch.arange(start, stop), self.transform.apply(tiles)


def _worker_context() -> Any:
    """forkserver (spawn where missing): workers start clean and open the slide themselves.

    The fork server preloads this module (torch, readers), so each slide's workers fork from
    a warm process in milliseconds instead of importing torch again (seconds).
    """
    from histoduo.run.pool import pool_context

    return pool_context(["histoduo.predict"])


# --- the model side -------------------------------------------------------------------------


class TilePredictor:
    """Model + device + precision: normalised batches in, class probabilities out."""

    def __init__(self, model: Any, meta: CheckpointMeta, params: PredictParams) -> None:
        import torch

        self.meta = meta
        self.params = params
        self.device = resolve_device(params.device)
        if params.torch_threads:
            torch.set_num_threads(params.torch_threads)
        precision = params.precision
        if precision == "auto":
            precision = "bf16" if self.device == "cuda" else "fp32"
        self.precision = precision
        self.model = model.to(self.device).eval()
        if params.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = params.batch_size or (256 if self.device == "cuda" else 64)
        self.transform = _TransformSpec(
            meta.input_size_px, list(meta.mean), list(meta.std), meta.eval_resize
        )

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) normalised float -> (B, K) float32 probabilities."""
        import torch

        x = x.to(self.device, non_blocking=True)
        if self.params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = [x]
        if self.params.tta:
            views += [x.flip(-1), x.flip(-2), x.flip(-1, -2)]
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16"
            ),
        ):
            probs = sum(self.model(v).float().softmax(dim=1) for v in views) / len(views)
        return probs.cpu().numpy().astype(np.float32)

    def run(self, tiles: SlideTiles | StoreTiles, workers: int) -> np.ndarray:
        """Probabilities (N, K) for every tile of ``tiles``, in tile order."""
        from torch.utils.data import DataLoader

        n_classes = len(self.meta.class_names)
        probs = np.full((len(tiles), n_classes), np.nan, dtype=np.float32)
        if len(tiles) == 0:
            return probs
        n_chunks = math.ceil(len(tiles) / tiles.batch_size)
        workers = min(workers, n_chunks)
        loader = DataLoader(
            tiles,
            batch_size=None,  # the dataset yields whole batches
            num_workers=workers,
            # forkserver/spawn: workers start clean and open the slide themselves.
            multiprocessing_context=_worker_context() if workers > 0 else None,
            pin_memory=self.device == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )
        for indices, x in loader:
            probs[indices.numpy()] = self(x)
        if np.isnan(probs).any():
            raise RuntimeError("some tiles got no prediction (a DataLoader worker failed?)")
        return probs
