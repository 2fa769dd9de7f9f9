"""Classical artefact detectors: pen ink and folds on the tissue thumbnail, blur per tile.

No model, no download: colour and optical-density rules on the thumbnail the tissue step
already read (so pen and fold cost one pass over a few megapixels per slide), and one
Laplacian/gradient ratio per tile computed in the tile workers from the pixels they already
hold. Thresholds live in :class:`~histoduo.qc.params.QCParams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from histoduo.qc.params import (
    EXCLUDED_BITS,
    FLAG_BLUR,
    FLAG_CHECKED,
    FLAG_FOLD,
    FLAG_PEN,
    QCParams,
)
from histoduo.tissue.detect import (
    TissueMask,
    pen_ink_mask,
    remove_small_objects_px,
)

# Pixels whose green channel is brighter than this are glass for the blur measure (its
# texture is sensor grain, which would read as "sharp").
_BLUR_GLASS_MIN_CHANNEL = 215


def _disk(radius_px: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    return (xx * xx + yy * yy) <= radius_px * radius_px


# --- thumbnail detectors ------------------------------------------------------------------
def detect_pen(rgb: np.ndarray, mask_mpp: float, params: QCParams = QCParams()) -> np.ndarray:
    """Boolean mask of marker ink (blue, green, black, red) on an RGB thumbnail whose pixels
    are ``mask_mpp`` microns wide."""
    from scipy import ndimage

    ink = pen_ink_mask(
        rgb,
        min_saturation=params.pen_min_saturation,
        hue_min_deg=params.pen_hue_min_deg,
        hue_max_deg=params.pen_hue_max_deg,
        black_max_value=params.pen_black_max_value,
        red_min_saturation=params.pen_red_min_saturation,
        red_hue_halfwidth_deg=params.pen_red_hue_halfwidth_deg,
    )
    ink = remove_small_objects_px(ink, params.pen_min_area_um2 / mask_mpp**2)
    radius_px = int(round(params.pen_dilate_um / mask_mpp / 2.0))
    if radius_px >= 1 and ink.any():
        ink = ndimage.binary_dilation(ink, structure=_disk(radius_px))
    return ink


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer-Lambert optical density summed over R, G and B (float32; glass ~0)."""
    lut = (-np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
    return lut[rgb[..., 0]] + lut[rgb[..., 1]] + lut[rgb[..., 2]]


def detect_folds(
    rgb: np.ndarray,
    tissue: np.ndarray,
    mask_mpp: float,
    params: QCParams = QCParams(),
    pen: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of folded (doubled) tissue: tissue whose smoothed optical density is at
    least ``fold_od_ratio`` times the slide's median tissue density. Ink is never a fold."""
    from scipy import ndimage

    tissue = np.asarray(tissue, dtype=bool)
    clean = tissue if pen is None else tissue & ~pen
    if not clean.any():
        return np.zeros_like(tissue)
    od = optical_density(rgb)
    floor_px = int(round(params.fold_floor_um / mask_mpp))
    if floor_px >= 2:
        # The lightest density nearby: nuclei (small dark spots) drop out, so dense-nucleus
        # tissue keeps the floor of its stroma, while a fold doubles the floor too.
        od = ndimage.grey_opening(np.where(clean, od, 0.0), size=(floor_px, floor_px))
    sigma_px = params.fold_smoothing_um / mask_mpp / 2.0
    if sigma_px >= 0.3:
        # Normalised convolution: glass around the tissue does not pull the edges down.
        weight = ndimage.gaussian_filter(clean.astype(np.float32), sigma_px, mode="nearest")
        od = ndimage.gaussian_filter(np.where(clean, od, 0.0), sigma_px, mode="nearest")
        od = np.divide(od, weight, out=np.zeros_like(od), where=weight > 1e-3)
    background = _local_median(od, clean, params.fold_background_um / mask_mpp)
    fold = clean & (od >= params.fold_od_ratio * background) & (od >= params.fold_min_od)
    return remove_small_objects_px(fold, params.fold_min_area_um2 / mask_mpp**2)


def _local_median(values: np.ndarray, valid: np.ndarray, window_px: float) -> np.ndarray:
    """Median of ``values`` over a ``window_px`` square around each pixel, with invalid
    pixels (glass) counted at the median of all valid ones.

    Computed on cells a sixth of the window wide (each cell the mean of its valid pixels,
    the median of a neighbourhood changes slowly), then repeated back: a few milliseconds
    even on big thumbnails.
    """
    from scipy import ndimage

    fill = float(np.median(values[valid]))
    step = max(1, int(window_px // 6))
    h, w = values.shape
    hh, ww = -(-h // step), -(-w // step)
    v = np.zeros((hh * step, ww * step), np.float32)
    n = np.zeros_like(v)
    v[:h, :w] = np.where(valid, values, 0.0)
    n[:h, :w] = valid
    sums = v.reshape(hh, step, ww, step).sum(axis=(1, 3))
    counts = n.reshape(hh, step, ww, step).sum(axis=(1, 3))
    coarse = np.where(counts > 0, sums / np.maximum(counts, 1), fill).astype(np.float32)
    size = max(3, int(round(window_px / step)) | 1)
    med = ndimage.median_filter(coarse, size=size, mode="nearest")
    return np.repeat(np.repeat(med, step, 0), step, 1)[:h, :w]


@dataclass
class ArtefactMasks:
    """Artefact masks on the tissue thumbnail's grid (``downsample`` level-0 px per px)."""

    tissue: np.ndarray
    pen: np.ndarray
    fold: np.ndarray
    downsample: float
    mask_mpp: float | None
    level0_size: tuple[int, int] | None = None

    def _as_mask(self, mask: np.ndarray) -> TissueMask:
        return TissueMask(
            mask=mask,
            downsample=self.downsample,
            thumbnail=np.empty((0, 0, 3), np.uint8),
            slide_mpp=None,
            level0_size=self.level0_size,
        )

    def tile_fractions(self, xy0: np.ndarray, size0: float) -> tuple[np.ndarray, np.ndarray]:
        """(pen, fold) share (0-1) of each level-0 box of side ``size0`` at ``xy0``."""
        pen = self._as_mask(self.pen).fractions_in_boxes(xy0, size0)
        fold = self._as_mask(self.fold).fractions_in_boxes(xy0, size0)
        return pen.astype(np.float32), fold.astype(np.float32)

    def burden(self, name: str) -> float:
        """Share (0-1) of the tissue area under artefact ``name`` (pen or fold)."""
        tissue_px = int(self.tissue.sum())
        if tissue_px == 0:
            return 0.0
        return float((getattr(self, name) & self.tissue).sum()) / tissue_px


def detect_artefacts(tissue: TissueMask, params: QCParams = QCParams()) -> ArtefactMasks:
    """Pen and fold masks for a slide's tissue mask (its thumbnail is what is analysed)."""
    mask_mpp = tissue.mask_mpp
    if mask_mpp is None:
        raise ValueError("QC needs the slide's mpp (areas are in um^2)")
    pen = detect_pen(tissue.thumbnail, mask_mpp, params)
    fold = detect_folds(tissue.thumbnail, tissue.mask, mask_mpp, params, pen=pen)
    return ArtefactMasks(
        tissue=tissue.mask,
        pen=pen,
        fold=fold,
        downsample=tissue.downsample,
        mask_mpp=mask_mpp,
        level0_size=tissue.level0_size,
    )


# --- blur from a tile's own pixels --------------------------------------------------------
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
_OD_LUT4 = (-np.log10((np.arange(1021, dtype=np.float32) / 4.0 + 1.0) / 256.0)).astype(np.float32)
_MIN_MEAN_OD = 0.05  # below this a block is glass-pale: its "detail" is noise


def block_sharpness(tile: np.ndarray, block_px: int, min_tissue_fraction: float) -> np.ndarray:
    """Sharpness of each ``block_px`` square of a tile (NaN: too little tissue to judge).

    Sharpness is the RMS Laplacian of the green channel's optical density over the block's
    mean optical density: fine detail, normalised for how densely the tissue is stained (a
    pale region has proportionally weaker edges, not blurrier ones). Defocus removes the
    fine detail and the measure falls. Glass pixels are left out.
    """
    # 2 x 2 averages first: sensor noise (which defocus does not remove) halves, while
    # nuclear and fibre edges, a few pixels wide, survive; and it is 4x less work.
    h2, w2 = tile.shape[0] // 2 * 2, tile.shape[1] // 2 * 2
    green = tile[:h2, :w2, 1].astype(np.uint16)
    sums = green[0::2, 0::2] + green[1::2, 0::2] + green[0::2, 1::2] + green[1::2, 1::2]
    od = _OD_LUT4[sums]  # optical density of the 2 x 2 mean, by table
    h, w = od.shape
    lap = np.zeros_like(od)
    lap[1:-1, 1:-1] = (
        4.0 * od[1:-1, 1:-1] - od[:-2, 1:-1] - od[2:, 1:-1] - od[1:-1, :-2] - od[1:-1, 2:]
    )
    # Glass is bright in green too; eosin and hematoxylin both absorb green strongly.
    tissue = sums < 4 * _BLUR_GLASS_MIN_CHANNEL
    tissue[0, :] = tissue[-1, :] = tissue[:, 0] = tissue[:, -1] = False  # no Laplacian there
    block_px = max(1, block_px // 2)
    b = max(1, min(block_px, h, w))
    bh, bw = h // b, w // b
    crop = (slice(0, bh * b), slice(0, bw * b))

    def per_block(values: np.ndarray) -> np.ndarray:
        return values[crop].reshape(bh, b, bw, b).sum(axis=(1, 3))

    n = per_block(tissue.astype(np.float32))
    lap2 = per_block(np.where(tissue, lap * lap, 0.0))
    od_sum = per_block(np.where(tissue, od, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_od = od_sum / n
        sharp = np.sqrt(lap2 / n) / np.maximum(mean_od, _MIN_MEAN_OD)
    judged = n >= min_tissue_fraction * b * b
    return np.where(judged, sharp, np.nan).astype(np.float32)


def tile_blur_score(tile: np.ndarray, params: QCParams = QCParams()) -> float:
    """Share (0-1) of the tile's judged blocks that are out of focus (0 if none is judged)."""
    sharp = block_sharpness(tile, params.blur_block_px, params.blur_min_tissue_fraction)
    judged = np.isfinite(sharp)
    if not judged.any():
        return 0.0
    return float((sharp[judged] < params.blur_min_sharpness).sum()) / float(judged.sum())


def tile_blur_scores(tiles: Any, params: QCParams = QCParams()) -> np.ndarray:
    """Blur score of each RGB uint8 tile (an (N, H, W, 3) array or a list of them)."""
    return np.asarray([tile_blur_score(np.asarray(t), params) for t in tiles], np.float32)


# --- per-tile flags and slide burdens -----------------------------------------------------
@dataclass
class TileQC:
    """Per-tile QC: pen and fold share of the tile, blur score, and the flags byte."""

    pen: np.ndarray  # float32 (N,) share of the tile under ink, 0-1
    blur: np.ndarray  # float32 (N,) share of the tile out of focus, 0-1
    fold: np.ndarray  # float32 (N,) share of the tile on a fold, 0-1
    flags: np.ndarray  # uint8 (N,) FLAG_* bits, FLAG_CHECKED on every tile

    @property
    def flagged(self) -> np.ndarray:
        """Tiles with any artefact bit."""
        return (self.flags & (FLAG_PEN | FLAG_BLUR | FLAG_FOLD)) > 0

    @property
    def excludable(self) -> np.ndarray:
        """Tiles that `--qc exclude` leaves out: pen or blur (params.EXCLUDED_BITS)."""
        return (self.flags & EXCLUDED_BITS) > 0

    def select(self, keep: np.ndarray) -> TileQC:
        return TileQC(self.pen[keep], self.blur[keep], self.fold[keep], self.flags[keep])


def tile_flags(
    pen: np.ndarray, blur: np.ndarray, fold: np.ndarray, params: QCParams = QCParams()
) -> np.ndarray:
    """The flags byte of each tile from its scores."""
    flags = np.full(np.shape(pen), FLAG_CHECKED, dtype=np.uint8)
    flags[np.asarray(pen) >= params.pen_max_tile_fraction] |= FLAG_PEN
    pen_flagged = (flags & FLAG_PEN) > 0
    # Ink hides the tissue beneath it, so its focus cannot be judged: such a tile is "pen".
    flags[(np.asarray(blur) >= params.blur_max_tile_fraction) & ~pen_flagged] |= FLAG_BLUR
    flags[np.asarray(fold) >= params.fold_max_tile_fraction] |= FLAG_FOLD
    return flags


def tile_qc(
    masks: ArtefactMasks,
    coords: np.ndarray,
    size0: float,
    blur: np.ndarray | None,
    params: QCParams = QCParams(),
) -> TileQC:
    """Scores and flags for tiles at level-0 ``coords`` (blur None: blur not measured)."""
    pen, fold = masks.tile_fractions(coords, size0)
    blur_arr = np.zeros(len(pen), np.float32) if blur is None else np.asarray(blur, np.float32)
    return TileQC(pen, blur_arr, fold, tile_flags(pen, blur_arr, fold, params))


def slide_burdens(
    masks: ArtefactMasks, tiles: TileQC | None = None, weights: np.ndarray | None = None
) -> dict[str, float]:
    """Share of the tissue under each artefact (0-1) and ``qc_any`` (the tiles flagged).

    Pen and fold come from the masks (exact areas); blur, which exists only per tile, is the
    tissue-weighted share of the tiles flagged as blurred. ``weights`` are the tiles' tissue
    fractions (default: equal).
    """
    out = {"pen": masks.burden("pen"), "fold": masks.burden("fold"), "blur": 0.0, "any": 0.0}
    if tiles is not None and len(tiles.flags):
        w = np.ones(len(tiles.flags)) if weights is None else np.asarray(weights, np.float64)
        total = float(w.sum()) or 1.0
        out["blur"] = float(w[(tiles.flags & FLAG_BLUR) > 0].sum()) / total
        out["any"] = float(w[tiles.flagged].sum()) / total
    return out
