"""Tissue detection on a low-resolution copy of the slide, and what the tiler asks of it.

Classical and fast: saturation (stained tissue is coloured, glass is grey/white), smoothing,
an Otsu threshold with a floor, closing, small-hole filling and speck removal, with areas given
in um^2 so the same parameters work at any scan resolution. Optional pen-ink removal and a
QuPath ROI to intersect with, or replace, the detected mask.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.slide import Slide, SlideError
from histoduo.slide.geojson import (
    Annotation,
    Polygon,
    class_color,
    mask_to_polygons,
    polygon_feature,
    rasterize,
    ring_area,
    write_feature_collection,
)

ROI_MODES = ("intersect", "replace")
# Pixels darker than this (max channel, 0-1) have meaningless saturation (sensor noise on
# black borders gives "colour"), so they never count as stained tissue on their own.
_DARK_VALUE = 0.12
# Pixels brighter than this in every channel are bare glass whatever their saturation.
_GLASS_MIN_CHANNEL = 0.92
# Offset before taking log saturation, so exact-grey pixels (0) stay finite.
_LOG_EPS = 0.01


@dataclass(frozen=True, kw_only=True)
class TissueParams:
    """Tissue detection settings; units in the names; JSON-able via dataclasses.asdict."""

    mask_mpp: float = 4.0
    saturation_threshold: float | None = None
    min_saturation: float = 0.05
    smoothing_um: float = 8.0
    min_object_area_um2: float = 5000.0
    max_hole_area_um2: float = 20000.0
    exclude_pen: bool = False
    closing_um: float = 8.0

    def __post_init__(self) -> None:
        if not (self.mask_mpp > 0 and math.isfinite(self.mask_mpp)):
            raise ValueError(f"mask mpp must be a positive number of um/px, got {self.mask_mpp}")
        for name in ("min_object_area_um2", "max_hole_area_um2", "smoothing_um", "closing_um"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TissueMask:
    """A boolean tissue mask covering the whole slide at ``downsample`` level-0 px per px."""

    mask: np.ndarray
    downsample: float
    thumbnail: np.ndarray
    slide_mpp: float | None
    saturation_threshold_used: float | None = None
    params: TissueParams | None = None
    # (width, height) of level 0; outlines are scaled onto it and never leave it.
    level0_size: tuple[int, int] | None = None
    _sat: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def mask_mpp(self) -> float | None:
        return None if self.slide_mpp is None else self.slide_mpp * self.downsample

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def area_mm2(self) -> float | None:
        """Tissue area in mm^2, or None when the slide's mpp is unknown."""
        if self.mask_mpp is None:
            return None
        return float(self.mask.sum()) * self.mask_mpp**2 / 1e6

    def _summed_area(self) -> np.ndarray:
        """Summed-area table with a zero first row/column: S[i, j] = mask[:i, :j].sum()."""
        if self._sat is None:
            sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.float64)
            np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
            self._sat = sat
        return self._sat

    def _integral(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue area (mask px^2) of [0, x] x [0, y] in mask px, x and y continuous.

        Bilinear interpolation of the summed-area table is exact for a piecewise-constant
        mask, which gives fractional coverage of edge pixels for free.
        """
        sat = self._summed_area()
        h, w = self.mask.shape
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - x0, y - y0
        top = sat[y0, x0] * (1 - fx) + sat[y0, x0 + 1] * fx
        bottom = sat[y0 + 1, x0] * (1 - fx) + sat[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    def fractions_in_boxes(self, xy0: np.ndarray, size0: float | tuple[float, float]) -> np.ndarray:
        """Tissue fraction (0-1) of level-0 boxes with top-left corners ``xy0`` (N, 2).

        ``size0`` is the box (width, height) in level-0 px, or one number for squares. Parts
        of a box outside the slide count as background.
        """
        xy = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
        sizes = np.asarray(size0, dtype=np.float64).ravel()
        width0, height0 = (float(sizes[0]), float(sizes[-1]))  # one number = a square
        if sizes.size not in (1, 2):
            raise ValueError(f"size0 must be one number or (width, height), got {size0}")
        if width0 <= 0 or height0 <= 0:
            raise ValueError(f"box size must be positive, got {size0}")
        ds = self.downsample
        x0, y0 = xy[:, 0] / ds, xy[:, 1] / ds
        x1, y1 = x0 + width0 / ds, y0 + height0 / ds
        inside = (
            self._integral(x1, y1)
            - self._integral(x0, y1)
            - self._integral(x1, y0)
            + self._integral(x0, y0)
        )
        box_area = (width0 / ds) * (height0 / ds)
        return np.clip(inside / box_area, 0.0, 1.0)

    def fraction_in_box(self, x0: float, y0: float, width0: float, height0: float) -> float:
        """Tissue fraction of one level-0 box (x0, y0, width, height)."""
        return float(self.fractions_in_boxes(np.array([[x0, y0]]), (width0, height0))[0])


class NoTissueError(SlideError):
    """Detection found no tissue on a slide (or no tile holds enough of it)."""

    status = "no_tissue"


def require_tissue(mask: TissueMask, path: str | Path) -> TissueMask:
    """``mask`` unchanged if it holds any tissue, else a NoTissueError that says why."""
    if mask.mask.any():
        return mask
    threshold = mask.saturation_threshold_used
    used = f"saturation threshold {threshold:.3f}" if threshold is not None else "the ROI"
    min_area = mask.params.min_object_area_um2 if mask.params else None
    hint = (
        "if the slide does hold faint tissue, lower --min-object-area-um2"
        + (f" (now {min_area:g})" if min_area is not None else "")
        + ", check the slide's mpp (--slide-mpp), or draw the region and pass it with --roi "
        "--roi-mode replace"
    )
    raise NoTissueError(path, f"no tissue found (used {used}); {hint}")


# --- pure image steps ---------------------------------------------------------------------
def channel_max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over the RGB channels.

    Elementwise maximum of the three channel planes is ~20x faster than ``max(axis=2)``,
    which reduces over a length-3 axis pixel by pixel.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (float32, 0-1) of an RGB uint8 image, vectorised."""
    mx_u8, mn_u8 = channel_max_min(rgb)
    mx = mx_u8.astype(np.float32)
    sat = np.divide(mx - mn_u8, mx, out=np.zeros_like(mx), where=mx_u8 > 0)
    return sat, mx / 255.0


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees (0-360) of an RGB uint8 image; 0 where the pixel is grey."""
    c = rgb.astype(np.float32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    mx, mn = (v.astype(np.float32) for v in channel_max_min(rgb))
    span = np.where(mx > mn, mx - mn, 1.0)
    hue = np.where(
        mx == r, ((g - b) / span) % 6, np.where(mx == g, (b - r) / span + 2, (r - g) / span + 4)
    )
    return np.where(mx > mn, hue * 60.0, 0.0).astype(np.float32)


def pen_ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like marker ink: blue/green hues or near-black.

    H&E never reaches green-to-blue hues (70-250 deg) with real saturation: hematoxylin is
    blue-purple (about 255-300 deg) and eosin pink. Black ink is simply very dark.
    """
    sat, value = saturation_value(rgb)
    hue = hue_degrees(rgb)
    coloured_ink = (hue >= 70) & (hue <= 250) & (sat >= 0.25) & (value < 0.9)
    black_ink = value < 0.25
    return coloured_ink | black_ink


def _disk(radius_px: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    return (xx * xx + yy * yy) <= radius_px * radius_px


def _component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected labels of ``mask`` and each label's pixel count (index 0 = background)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels, np.bincount(labels.ravel())


def remove_small_objects_px(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop connected objects smaller than ``min_area_px`` pixels."""
    if min_area_px <= 1 or not mask.any():
        return mask
    labels, sizes = _component_sizes(mask)
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[labels]


def fill_small_holes_px(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background regions enclosed by tissue that are smaller than ``max_area_px``.

    Background touching the image border is never a hole (that is the glass around tissue).
    """
    if max_area_px <= 0:
        return mask
    from scipy import ndimage

    # 4-connected background is the complement of 8-connected foreground.
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_area_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def threshold_saturation(sat: np.ndarray, params: TissueParams) -> float:
    """The fixed threshold, or Otsu on log saturation floored at ``min_saturation``."""
    if params.saturation_threshold is not None:
        return float(params.saturation_threshold)
    from skimage.filters import threshold_otsu

    if float(sat.max()) - float(sat.min()) < 1e-6:
        return float(params.min_saturation)  # a flat image has no two classes to split
    # Otsu in log space: pale tissue (clear cells, fat, necrosis) is 5-10x less saturated than
    # eosin-rich tissue, so linear Otsu splits tissue types; glass is a tight cluster near 0
    # that log spreads out and separates from every tissue type.
    log_threshold = float(threshold_otsu(np.log(sat + _LOG_EPS)))
    threshold = float(np.exp(log_threshold)) - _LOG_EPS
    return max(threshold, float(params.min_saturation))


def detect_tissue_array(
    rgb: np.ndarray, mask_mpp: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, float]:
    """(tissue mask, saturation threshold used) of an RGB image whose pixels are ``mask_mpp``
    microns wide. Pure: no slide, no I/O."""
    from scipy import ndimage

    sat, value = saturation_value(rgb)
    sat[value < _DARK_VALUE] = 0.0
    sigma_px = params.smoothing_um / mask_mpp / 2.0  # smoothing_um ~ the kernel's width
    if sigma_px >= 0.3:
        sat = ndimage.gaussian_filter(sat, sigma=sigma_px, mode="nearest")
    threshold = threshold_saturation(sat, params)
    # Glass stays bright in every channel even where stain noise adds a little colour.
    raw = (sat >= threshold) & (channel_max_min(rgb)[1] < _GLASS_MIN_CHANNEL * 255)
    mask = raw
    radius_px = int(round(params.closing_um / mask_mpp / 2.0))
    if radius_px >= 1:
        mask = ndimage.binary_closing(raw, structure=_disk(radius_px), border_value=0)
        # binary_closing with a zero border erodes objects that touch the image edge.
        mask |= raw
    px_area_um2 = mask_mpp * mask_mpp
    mask = fill_small_holes_px(mask, params.max_hole_area_um2 / px_area_um2)
    if params.exclude_pen:
        pen = pen_ink_mask(rgb)
        if radius_px >= 1:  # stroke edges are fainter than their core
            pen = ndimage.binary_dilation(pen, structure=_disk(radius_px))
        mask &= ~pen
    mask = remove_small_objects_px(mask, params.min_object_area_um2 / px_area_um2)
    return mask, threshold


# --- slides -------------------------------------------------------------------------------
def detect_tissue(
    slide: Slide,
    params: TissueParams = TissueParams(),
    roi: list[Annotation] | list[Polygon] | None = None,
    roi_mode: str = "intersect",
) -> TissueMask:
    """Detect tissue on ``slide`` at ``params.mask_mpp``.

    ``roi`` (annotations or polygons in level-0 px, e.g. from a QuPath GeoJSON) is intersected
    with the detected mask (``roi_mode="intersect"``) or replaces it (``"replace"``).
    Raises SlideError when the slide has no mpp (pass an override to open_slide).
    """
    if roi_mode not in ROI_MODES:
        raise ValueError(f"roi_mode must be one of {ROI_MODES}, not {roi_mode!r}")
    if params.mask_mpp <= 0:
        raise ValueError(f"mask_mpp must be positive, got {params.mask_mpp}")
    slide_mpp = slide.require_mpp()
    # Never finer than level 0: a mask at 4 um on a 4 um image is the image itself.
    downsample = max(1.0, params.mask_mpp / slide_mpp)
    rgb = slide.read_downsampled(downsample)
    mask_mpp = slide_mpp * downsample
    if roi is not None and roi_mode == "replace":
        mask, threshold = np.zeros(rgb.shape[:2], dtype=bool), None
    else:
        mask, threshold = detect_tissue_array(rgb, mask_mpp, params)
    if roi is not None:
        roi_mask = rasterize(list(roi), rgb.shape[:2], downsample) > 0
        mask = roi_mask if roi_mode == "replace" else mask & roi_mask
    return TissueMask(
        mask=mask,
        downsample=float(downsample),
        thumbnail=rgb,
        slide_mpp=slide_mpp,
        saturation_threshold_used=threshold,
        params=params,
        level0_size=(int(slide.dimensions[0]), int(slide.dimensions[1])),
    )


def tissue_contours(mask: TissueMask, min_area_px: float = 4.0) -> list[Polygon]:
    """Tissue outlines as polygons (exterior, holes) in level-0 px."""
    return mask_to_polygons(
        mask.mask, mask.downsample, min_area_px=min_area_px, level0_size=mask.level0_size
    )


# --- outputs ------------------------------------------------------------------------------
def overlay_image(mask: TissueMask, alpha: float = 0.3) -> np.ndarray:
    """The thumbnail with tissue tinted and outlined in the 'Tissue' class colour."""
    from scipy import ndimage

    out = mask.thumbnail.astype(np.float32)
    color = np.array(class_color("Tissue"), dtype=np.float32)
    inside = mask.mask
    out[inside] = out[inside] * (1 - alpha) + color * alpha
    # Outline 2 px wide so it survives viewing the PNG scaled down.
    edge = inside & ~ndimage.binary_erosion(inside, iterations=2, border_value=0)
    out[edge] = color
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _save_png_atomic(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    from histoduo.runtime.files import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def tissue_features(mask: TissueMask) -> list[dict[str, Any]]:
    """One QuPath 'Tissue' annotation per tissue piece, with its area in um^2."""
    features = []
    for polygon in tissue_contours(mask):
        measurements = None
        if mask.slide_mpp is not None:
            exterior, holes = polygon
            area_px0 = abs(ring_area(exterior)) - sum(abs(ring_area(h)) for h in holes)
            measurements = {"area_um2": area_px0 * mask.slide_mpp**2}
        features.append(polygon_feature([polygon], class_name="Tissue", measurements=measurements))
    return features


def save_tissue_outputs(mask: TissueMask, out_dir: Path, slide_name: str) -> dict[str, Path]:
    """Write <name>_mask.png, <name>_overlay.png and <name>_tissue.geojson atomically.

    Returns {"mask": path, "overlay": path, "geojson": path}.
    """
    out_dir = Path(out_dir)
    paths = {
        "mask": out_dir / f"{slide_name}_mask.png",
        "overlay": out_dir / f"{slide_name}_overlay.png",
        "geojson": out_dir / f"{slide_name}_tissue.geojson",
    }
    _save_png_atomic(mask.mask.astype(np.uint8) * 255, paths["mask"])
    _save_png_atomic(overlay_image(mask), paths["overlay"])
    write_feature_collection(paths["geojson"], tissue_features(mask))
    return paths


def mask_summary(mask: TissueMask) -> dict[str, Any]:
    """JSON-able facts about a mask, for reports and manifests."""
    return json.loads(
        json.dumps(
            {
                "downsample": mask.downsample,
                "mask_mpp": mask.mask_mpp,
                "mask_shape_hw": list(mask.shape),
                "tissue_area_mm2": mask.area_mm2(),
                "saturation_threshold_used": mask.saturation_threshold_used,
                "params": asdict(mask.params) if mask.params else None,
            }
        )
    )
