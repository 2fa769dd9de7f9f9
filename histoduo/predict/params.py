"""How a prediction run works: :class:`PredictParams`, the device, tiling from the checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from histoduo.grading import GradeParams
from histoduo.tissue import TissueParams

if TYPE_CHECKING:
    from histoduo.models.checkpoint import CheckpointMeta
    from histoduo.tiling import TilingParams

THUMBNAIL_MAX_PX = 1024  # long side of the stored thumbnail the maps are painted on


@dataclass(frozen=True, kw_only=True)
class PredictParams:
    """How a run predicts; recorded in the manifest."""

    target_mpp: float | None = None  # override of the checkpoint's target mpp (warned)
    tile_size_px: int | None = None  # override of the checkpoint's tile size (warned)
    stride_px: int | None = None  # at the target resolution; None = tile size (no overlap)
    min_tissue_fraction: float = 0.25  # of a tile's area, 0-1
    batch_size: int | None = None  # None: 256 on GPU, 64 on CPU
    device: str = "auto"  # auto, cpu, cuda, cuda:N (runtime/device.py)
    precision: str = "auto"  # auto: bf16 weights + autocast on GPU, fp32 on CPU
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (pays off on long GPU runs)
    decode: str = "auto"  # auto: JPEG/pixels decoded on the GPU there, in workers on CPU
    prefetch_slides: int = 1  # slides planned (opened, tissue, tiles) ahead in a thread
    workers: int | None = None  # DataLoader workers; None: 1 on <= 2 cores, else cores - 1
    torch_threads: int | None = None  # CPU intra-op threads; None: leave torch's default
    tta: bool = False  # average over flips (identity, h, v, both)
    heatmap: bool = True  # draw the maps (the report shows them)
    backend: str = "auto"
    tissue: TissueParams = field(default_factory=TissueParams)
    grade: GradeParams = field(default_factory=GradeParams)
    thumbnail_max_px: int = THUMBNAIL_MAX_PX

    def __post_init__(self) -> None:
        from histoduo.runtime.device import check_decode, check_device_name, check_precision

        check_device_name(self.device)
        check_decode(self.decode)
        check_precision(self.precision)
        if self.prefetch_slides < 0:
            raise ValueError(f"prefetch_slides must be >= 0, got {self.prefetch_slides}")
        if self.stride_px is not None and self.stride_px < 1:
            raise ValueError(f"stride must be >= 1 px, got {self.stride_px}")
        if self.tile_size_px is not None and self.tile_size_px < 8:
            raise ValueError(f"tile size must be at least 8 px, got {self.tile_size_px}")
        if self.target_mpp is not None and not (
            self.target_mpp > 0 and math.isfinite(self.target_mpp)
        ):
            raise ValueError(f"--mpp must be positive, got {self.target_mpp}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min tissue fraction must be 0-1, got {self.min_tissue_fraction}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
