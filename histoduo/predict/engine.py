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

from histoduo.predict.params import PredictParams
from histoduo.slide import open_slide

if TYPE_CHECKING:
    import torch

    from histoduo.models.checkpoint import CheckpointMeta


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
    on_device: bool = False  # workers hand over uint8 / JPEG; the device decodes (decode.py)

    def apply(self, tiles: np.ndarray) -> Any:
        # The exact evaluation transform (preprocess.py), done in the worker so the main
        # process only runs the model; or, on a GPU, left to the device.
        from histoduo.models.preprocess import to_tensor_batch

        if self.on_device:
            from histoduo.runtime.decode import encoded_pixels

            return encoded_pixels(tiles)
        return self.finish(to_tensor_batch(tiles))

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> normalised float there."""
        from histoduo.models.preprocess import eval_transform

        return eval_transform(batch, self.input_size_px, self.mean, self.std, self.eval_resize)


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
        read_level: int,
        read_size_px: int,
        tile_size_px: int,
        batch_size: int,
        transform: _TransformSpec,
    ) -> None:
        self.slide_path = slide_path
        self.backend = backend
        self.mpp_override = mpp_override
        self.coords = coords
        self.read_level = read_level  # with read_size_px: the tiling geometry's read
        self.read_size_px = read_size_px
        self.tile_size_px = tile_size_px
        self.batch_size = batch_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.coords)

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        import torch

        from histoduo.tiling.read import read_tile

        n_chunks = math.ceil(len(self.coords) / self.batch_size)
        with open_slide(self.slide_path, self.backend, self.mpp_override) as slide:
            for chunk in _worker_share(n_chunks):
                start = chunk * self.batch_size
                stop = min(start + self.batch_size, len(self.coords))
                tiles = np.stack(
                    [
                        read_tile(slide, xy, self.read_level, self.read_size_px, self.tile_size_px)
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
                if self.transform.on_device:  # JPEG bytes as stored: the GPU decodes them
                    from histoduo.store.read import read_encoded

                    yield (
                        torch.arange(start, stop),
                        read_encoded(store, self.slide, np.arange(start, stop)),
                    )
                    continue
                tiles = store.read_tiles(self.slide, np.arange(start, stop))
                yield torch.arange(start, stop), self.transform.apply(tiles)


def _worker_context() -> Any:
    """forkserver (spawn where missing): workers start clean and open the slide themselves.

    The fork server preloads this module (torch, readers), so each slide's workers fork from
    a warm process in milliseconds instead of importing torch again (seconds).
    """
    from histoduo.runtime.pool import pool_context

    return pool_context(["histoduo.predict"])


# --- the model side -------------------------------------------------------------------------


class TilePredictor:
    """Model + device + precision: normalised batches in, class probabilities out."""

    def __init__(self, model: Any, meta: CheckpointMeta, params: PredictParams) -> None:
        from histoduo.runtime.decode import decode_on_device
        from histoduo.runtime.device import Runtime, default_batch_size

        self.meta = meta
        self.params = params
        self.runtime = Runtime.create(
            params.device,
            params.precision,
            channels_last=params.channels_last,
            compile=params.compile,
            torch_threads=params.torch_threads,
        )
        self.device = str(self.runtime.device)
        self.precision = self.runtime.precision
        self.model = self.runtime.prepare_model(model)
        self.batch_size = params.batch_size or default_batch_size(self.runtime.device)
        self.transform = _TransformSpec(
            meta.input_size_px,
            list(meta.mean),
            list(meta.std),
            meta.eval_resize,
            on_device=decode_on_device(params.decode, self.runtime.device),
        )

    def worker_kind(self, store: bool) -> str:
        """Workers that only read store bytes for the GPU need fewer than decoding ones."""
        return "bytes" if store and self.transform.on_device else "pixels"

    def __call__(self, x: Any) -> np.ndarray:
        """A loader's batch (normalised float, or encoded for the device) -> (B, K) float32
        probabilities."""
        from histoduo.runtime.decode import model_batch

        return self.forward(model_batch(x, self.runtime.device, self.transform.finish))

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) normalised float on the device -> (B, K) float32 probabilities."""
        import torch

        x = self.runtime.model_input(x)
        views = [x]
        if self.params.tta:
            views += [x.flip(-1), x.flip(-2), x.flip(-1, -2)]
        with torch.inference_mode(), self.runtime.autocast():
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
        from histoduo.runtime.device import loader_options

        loader = DataLoader(
            tiles,
            batch_size=None,  # the dataset yields whole batches
            # forkserver/spawn: workers start clean and open the slide themselves.
            multiprocessing_context=_worker_context() if workers > 0 else None,
            **loader_options(self.runtime.device, workers),
        )
        for indices, x in loader:
            probs[indices.numpy()] = self(x)
        if np.isnan(probs).any():
            raise RuntimeError("some tiles got no prediction (a DataLoader worker failed?)")
        return probs
