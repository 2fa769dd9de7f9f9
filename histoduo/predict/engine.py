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
        qc: Any = None,
    ) -> None:
        self.qc = qc  # QCParams: also measure each tile's blur (yielded third)
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
                if self.qc is not None:  # blur from the pixels already in hand
                    from histoduo.qc import tile_blur_scores

                    blur = torch.from_numpy(tile_blur_scores(tiles, self.qc))
                    yield torch.arange(start, stop), self.transform.apply(tiles), blur
                    continue
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

# Tiles per model forward on CPU (a loader batch is split into slices of this many): bounds
# the activations' memory (docs/performance.md, issue 23).
CPU_FORWARD_TILES = 16


def _prefetch_batches(predictor: TilePredictor) -> int:
    """Batches each worker keeps ready. On CPU the model is the bottleneck, so 2 keep it fed;
    each float batch held costs ``batch x 3 x S x S x 4`` bytes in the worker and again in
    this process (shared memory), 38 MiB for 64 tiles of 224 px. A GPU gets the deep queue."""
    return 2 if predictor.runtime.device.type == "cpu" else 4


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
        """(B, 3, S, S) normalised float on the device -> (B, K) float32 probabilities.

        On CPU the batch goes through the model in slices of ``CPU_FORWARD_TILES``: the
        model's activations grow with the tiles in one forward (about 1 GiB for 64 tiles of
        the small DuoFormer, 0.2 GiB for 16; docs/performance.md), and each tile's
        probabilities do not depend on its neighbours in a batch.
        """
        step = CPU_FORWARD_TILES if self.runtime.device.type == "cpu" else len(x)
        if len(x) <= step:
            return self._forward(x)
        return np.concatenate([self._forward(x[i : i + step]) for i in range(0, len(x), step)])

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        import torch

        x = self.runtime.model_input(x)
        views = [x]
        if self.params.tta:
            views += [x.flip(-1), x.flip(-2), x.flip(-1, -2)]
        with torch.inference_mode(), self.runtime.autocast():
            probs = sum(self.model(v).float().softmax(dim=1) for v in views) / len(views)
        return probs.cpu().numpy().astype(np.float32)

    def run(
        self, tiles: SlideTiles | StoreTiles, workers: int, blur_out: np.ndarray | None = None
    ) -> np.ndarray:
        """Probabilities (N, K) for every tile of ``tiles``, in tile order; with a QC
        ``SlideTiles``, each tile's blur score lands in ``blur_out`` (N,)."""
        n_classes = len(self.meta.class_names)
        probs = np.full((len(tiles), n_classes), np.nan, dtype=np.float32)
        if len(tiles) == 0:
            return probs
        n_chunks = math.ceil(len(tiles) / tiles.batch_size)
        workers = min(workers, n_chunks)
        if isinstance(tiles, SlideTiles) and self.runtime.device.type == "cpu" and workers > 0:
            batches = _slide_batches(tiles, workers)
        else:
            batches = self._loader(tiles, workers)
        for indices, x, blur in batches:
            probs[indices] = self(x)
            if blur is not None and blur_out is not None:
                blur_out[indices] = blur
        if np.isnan(probs).any():
            raise RuntimeError("some tiles got no prediction (a DataLoader worker failed?)")
        return probs

    def _loader(self, tiles: SlideTiles | StoreTiles, workers: int) -> Iterator[tuple[Any, ...]]:
        """(tile indices, model input, blur scores or None) per batch."""
        from torch.utils.data import DataLoader

        from histoduo.runtime.device import loader_options

        loader = DataLoader(
            tiles,
            batch_size=None,  # the dataset yields whole batches
            # forkserver/spawn: workers start clean and open the slide themselves.
            multiprocessing_context=_worker_context() if workers > 0 else None,
            **loader_options(self.runtime.device, workers, prefetch=_prefetch_batches(self)),
        )
        for batch in loader:
            blur = batch[2].numpy() if len(batch) > 2 else None
            yield batch[0].numpy(), batch[1], blur


# Chunks each reader process may have read ahead of the model (CPU slides): enough to keep
# a CPU model fed, few enough that a slide's tiles never pile up in memory.
_READ_AHEAD_PER_WORKER = 2


def _slide_batches(tiles: SlideTiles, workers: int) -> Iterator[tuple[np.ndarray, Any, Any]]:
    """A slide's batches read by ``workers`` light reader processes, in tile order.

    On CPU the workers only read and resample uint8 tiles (the tiling workers' code, no
    torch: a third of a DataLoader worker's memory, and a quarter of the bytes of a float
    batch to hand over); this process applies the same evaluation transform, one model
    forward's worth of tiles at a time. At most ``_READ_AHEAD_PER_WORKER`` chunks per
    worker wait, so memory stays bounded for any slide size.
    """
    from collections import deque

    from histoduo.runtime.pool import worker_pool
    from histoduo.tiling import read as tileio

    size = tiles.batch_size
    starts = iter(range(0, len(tiles), size))
    pending: deque[tuple[int, Any]] = deque()
    with worker_pool(workers, tileio.WORKER_PRELOAD, initializer=tileio.warm_up) as pool:

        def submit() -> None:
            start = next(starts, None)
            if start is None:
                return
            task = tileio.ChunkTask(
                slide_path=tiles.slide_path,
                backend=tiles.backend,
                mpp_override=tiles.mpp_override,
                coords=tiles.coords[start : start + size],
                read_level=tiles.read_level,
                read_size_px=tiles.read_size_px,
                tile_size_px=tiles.tile_size_px,
                encoding=None,  # decoded uint8 arrays, read by read_tile as SlideTiles does
            )
            pending.append((start, pool.submit(tileio.read_chunk, task)))

        for _ in range(workers * _READ_AHEAD_PER_WORKER):
            submit()
        while pending:
            start, result = pending.popleft()
            pixels = result.result()
            submit()
            # Transformed a forward's worth at a time: a float copy of the whole chunk
            # would cost 4x its uint8 bytes for nothing (the model takes slices anyway).
            for i in range(0, len(pixels), CPU_FORWARD_TILES):
                part = pixels[i : i + CPU_FORWARD_TILES]
                blur = None
                if tiles.qc is not None:  # blur from the pixels already in hand
                    from histoduo.qc import tile_blur_scores

                    blur = tile_blur_scores(part, tiles.qc)
                indices = np.arange(start + i, start + i + len(part))
                yield indices, tiles.transform.apply(part), blur
