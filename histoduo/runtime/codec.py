"""The JPEG codec of tile stores: encode in tiling workers, decode in readers (imagecodecs)."""

from __future__ import annotations

import numpy as np


def encode_jpeg(tile: np.ndarray, quality: int) -> np.ndarray:
    """JPEG bytes of an RGB tile, as the uint8 array HDF5 stores."""
    import imagecodecs

    return np.frombuffer(imagecodecs.jpeg8_encode(tile, level=quality), dtype=np.uint8)


def decode_jpeg(data: np.ndarray | bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(bytes(data) if isinstance(data, np.ndarray) else data)
