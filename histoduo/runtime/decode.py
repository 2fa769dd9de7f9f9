"""Tile batches decoded and normalised where the model runs.

On a GPU the CPU would starve the model if DataLoader workers decoded JPEG and normalised
floats (2 cores decode ~800 tiles/s; the GPU grades thousands). So there the workers only
read: a store's JPEG bytes, or a slide's resampled uint8 tiles, as an :class:`EncodedBatch`.
The main process then decodes the whole batch at once with nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``), or copies the uint8 pixels (a quarter of
the bytes of float32) from pinned memory without blocking, and normalises on the GPU.

On CPU the workers keep decoding and normalising (the default, parallel over processes); the
bytes path still works there (``decode="device"``), decoding with torchvision's CPU decoder
where its image extension loads, else with imagecodecs, the store's own decoder.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from histoduo.runtime.device import check_decode

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)


@dataclass
class EncodedBatch:
    """What a worker hands over when the device decodes: JPEG bytes or uint8 pixels."""

    jpeg: list[np.ndarray] | None = None  # one JPEG byte array per tile
    pixels: Any = None  # torch uint8 (B, H, W, 3): raw stores and slide tiles

    def __len__(self) -> int:
        return len(self.jpeg) if self.jpeg is not None else int(self.pixels.shape[0])

    def pin_memory(self) -> EncodedBatch:
        """Called by a DataLoader with ``pin_memory=True`` (JPEG bytes go to nvJPEG as is)."""
        if self.pixels is not None:
            return EncodedBatch(self.jpeg, self.pixels.pin_memory())
        return self


def decode_on_device(decode: str, device: torch.device) -> bool:
    """Whether batches travel encoded and are decoded by the main process on ``device``.

    ``auto``: on CUDA when torchvision's GPU decoder works there (else a warning and the
    worker path); never on CPU, where parallel worker decoding is faster.
    """
    check_decode(decode)
    if decode == "worker":
        return False
    if decode == "device":
        return True
    if device.type != "cuda":
        return False
    if not torchvision_decodes(str(device)):
        log.warning("torchvision cannot decode JPEG on %s; decoding in DataLoader workers", device)
        return False
    return True


# --- the worker side ---------------------------------------------------------------------------


def encoded_pixels(tiles: np.ndarray) -> EncodedBatch:
    """(B, H, W, 3) uint8 tiles, as they travel to the device."""
    import torch

    return EncodedBatch(pixels=torch.from_numpy(np.ascontiguousarray(tiles)))


# --- the main-process side ---------------------------------------------------------------------


@functools.cache
def torchvision_decodes(device: str) -> bool:
    """True when ``torchvision.io.decode_jpeg`` works on ``device`` (its image extension
    loads and decodes a test image); checked once per process."""
    try:
        import torch

        from histoduo.runtime.codec import encode_jpeg
        from histoduo.runtime.torchcompat import ensure_torchvision

        ensure_torchvision()
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode

        blob = torch.from_numpy(encode_jpeg(np.full((16, 16, 3), 128, np.uint8), 90).copy())
        tv_decode([blob], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "use the other decoder"
        log.debug("torchvision decode_jpeg unusable on %s: %s", device, exc)
        return False


def decode_jpeg_batch(blobs: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """JPEG byte arrays -> (B, 3, H, W) uint8 on ``device``, in order.

    CUDA: one batched nvJPEG call. CPU: torchvision's decoder when it loads, else imagecodecs
    (the decoder :meth:`TileStore.read_tiles` uses).
    """
    import torch

    if device.type == "cuda" or torchvision_decodes("cpu"):
        from histoduo.runtime.torchcompat import ensure_torchvision

        ensure_torchvision()
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode

        # np.array(copy): torch wants writable memory; HDF5's arrays already are, so cheap.
        tensors = [torch.from_numpy(np.asarray(b, dtype=np.uint8)) for b in blobs]
        images = tv_decode(tensors, mode=ImageReadMode.RGB, device=device)
        return torch.stack(images)
    from histoduo.runtime.codec import decode_jpeg

    tiles = np.stack([decode_jpeg(b) for b in blobs])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).to(device)


def decode_batch(batch: EncodedBatch, device: torch.device) -> torch.Tensor:
    """An encoded batch -> (B, 3, H, W) uint8 on ``device``."""
    from histoduo.runtime.device import to_device

    if batch.jpeg is not None:
        return decode_jpeg_batch(batch.jpeg, device)
    return to_device(batch.pixels, device).permute(0, 3, 1, 2)


def model_batch(
    x: EncodedBatch | torch.Tensor,
    device: torch.device,
    finish: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A loader's batch -> float model input on ``device``.

    Encoded batches are decoded there and ``finish`` (uint8 -> normalised float) runs there;
    batches the workers already normalised are only copied.
    """
    from histoduo.runtime.device import to_device

    if isinstance(x, EncodedBatch):
        return finish(decode_batch(x, device))
    return to_device(x, device)


def device_batches(
    loader: Any,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` on ``device`` from a loader over :class:`TileBatches` or
    :class:`EncodedTileBatches` (decoded and transformed here with the dataset's transform,
    augmentation seeded as in the worker)."""
    import torch

    from histoduo.runtime.device import to_device

    transform = loader.dataset.transform
    for item in loader:
        if len(item) == 3:
            seed, encoded, y = item
            raw = decode_batch(encoded, device)
            if seed is None:
                x = transform(raw)
            else:
                x = transform(raw, torch.Generator().manual_seed(int(seed)))
        else:
            x, y = item
            x = to_device(x, device)
        if dtype is not None:
            x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, to_device(y, device)
