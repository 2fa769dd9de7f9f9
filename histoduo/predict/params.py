"""How a prediction run works: :class:`PredictParams`, the device, tiling from the checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from histoduo.grading import GradeParams
from histoduo.run.pool import default_workers as _default_workers
from histoduo.tissue import TissueParams

if TYPE_CHECKING:
    from histoduo.checkpoint import CheckpointMeta
    from histoduo.tiling import TilingParams

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "fp32", "bf16")
THUMBNAIL_MAX_PX = 1024  # long side of the stored thumbnail the maps are painted on


@dataclass(frozen=True)
class PredictParams:
    """How a run predicts; recorded in the manifest."""

    target_mpp: float | None = None  # override of the checkpoint's target mpp (warned)
    tile_size_px: int | None = None  # override of the checkpoint's tile size (warned)
    stride_px: int | None = None  # at the target resolution; None = tile size (no overlap)
    min_tissue_fraction: float = 0.25  # of a tile's area, 0-1
    batch_size: int | None = None  # None: 256 on GPU, 64 on CPU
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True
    workers: int | None = None  # DataLoader workers; None: 1 on <= 2 cores, else cores - 1
    torch_threads: int | None = None  # CPU intra-op threads; None: leave torch's default
    tta: bool = False  # average over flips (identity, h, v, both)
    heatmap: bool = False
    backend: str = "auto"
    tissue: TissueParams = field(default_factory=TissueParams)
    grade: GradeParams = field(default_factory=GradeParams)
    thumbnail_max_px: int = THUMBNAIL_MAX_PX

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stride_px is not None and self.stride_px < 1:
            raise ValueError(f"stride must be >= 1 px, got {self.stride_px}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min tissue fraction must be 0-1, got {self.min_tissue_fraction}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def default_workers() -> int:
    """DataLoader workers: one decoder on 2 cores, else one per core but the model's."""
    return _default_workers(beside_main=True)


def tiling_for(
    meta: CheckpointMeta, params: PredictParams, warn: Callable[[str], None]
) -> TilingParams:
    from histoduo.tiling import TilingParams

    target_mpp, size = meta.target_mpp, meta.tile_size_px
    override = params.target_mpp
    if override is not None and not math.isclose(override, target_mpp, rel_tol=1e-3):
        warn(f"--mpp {override:g} overrides the checkpoint's {target_mpp:g} um/px")
        target_mpp = override
    if params.tile_size_px is not None and params.tile_size_px != size:
        warn(f"--tile-size {params.tile_size_px} overrides the checkpoint's {size} px")
        size = params.tile_size_px
    return TilingParams(
        target_mpp=target_mpp,
        tile_size_px=size,
        stride_px=params.stride_px,
        min_tissue_fraction=params.min_tissue_fraction,
        tissue=params.tissue,
    )
