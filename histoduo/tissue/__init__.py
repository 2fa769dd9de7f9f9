"""Tissue detection at mask resolution: the mask, its outputs, and the per-slide run."""

from histoduo.tissue.detect import (
    ROI_MODES,
    NoTissueError,
    TissueMask,
    TissueParams,
    detect_tissue,
    detect_tissue_array,
    mask_summary,
    overlay_image,
    pen_ink_mask,
    require_tissue,
    save_tissue_outputs,
    tissue_contours,
    tissue_features,
)

__all__ = [
    "ROI_MODES",
    "NoTissueError",
    "TissueMask",
    "TissueParams",
    "detect_tissue",
    "detect_tissue_array",
    "mask_summary",
    "overlay_image",
    "pen_ink_mask",
    "require_tissue",
    "save_tissue_outputs",
    "tissue_contours",
    "tissue_features",
]
