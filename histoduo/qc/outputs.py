"""What QC shows: the artefact label mask, the overlay, QuPath GeoJSON and the burdens CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.qc.detect import ArtefactMasks
from histoduo.qc.params import FLAG_BLUR, FLAG_FOLD, FLAG_PEN

# One colour per artefact, chosen to stand out on H&E (none is pink or purple) and from each
# other; the GeoJSON classifications use the same colours.
QC_COLORS: dict[str, tuple[int, int, int]] = {
    "pen": (0, 190, 255),
    "blur": (255, 130, 0),
    "fold": (240, 230, 0),
}
QC_CLASS_NAMES = {"pen": "Pen", "blur": "Blur", "fold": "Fold"}
BURDEN_FIELDS = ("qc_pen", "qc_blur", "qc_fold", "qc_any")


def blur_mask_from_tiles(
    shape: tuple[int, int], downsample: float, coords: np.ndarray, size0: float, blurred: np.ndarray
) -> np.ndarray:
    """The blurred tiles painted on the thumbnail's grid (bool (h, w))."""
    out = np.zeros(shape, dtype=bool)
    h, w = shape
    for x, y in np.asarray(coords)[np.asarray(blurred, dtype=bool)]:
        c0, r0 = int(x / downsample), int(y / downsample)
        c1 = min(w, max(c0 + 1, int(np.ceil((x + size0) / downsample))))
        r1 = min(h, max(r0 + 1, int(np.ceil((y + size0) / downsample))))
        out[r0:r1, c0:c1] = True
    return out


def label_mask(masks: ArtefactMasks, blur: np.ndarray | None = None) -> np.ndarray:
    """uint8 mask on the thumbnail grid: the FLAG_* bits of the artefacts at each pixel
    (pen 1, blur 2, fold 4; 0 = none found). Blur only inside tissue."""
    out = np.zeros(masks.pen.shape, dtype=np.uint8)
    out[masks.pen] |= FLAG_PEN
    out[masks.fold] |= FLAG_FOLD
    if blur is not None:
        out[blur & masks.tissue] |= FLAG_BLUR
    return out


def overlay_image(thumbnail: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The thumbnail with each artefact tinted and outlined in its colour (pen drawn last,
    on top: it is the one a pathologist will recognise)."""
    from scipy import ndimage

    out = thumbnail.astype(np.float32).copy()
    for name, bit in (("blur", FLAG_BLUR), ("fold", FLAG_FOLD), ("pen", FLAG_PEN)):
        inside = (labels & bit) > 0
        if not inside.any():
            continue
        color = np.array(QC_COLORS[name], dtype=np.float32)
        out[inside] = out[inside] * (1 - alpha) + color * alpha
        edge = inside & ~ndimage.binary_erosion(inside, iterations=1, border_value=0)
        out[edge] = color
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def legend(burdens: dict[str, float]) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, colour) per artefact with its share of the tissue, for the figure legend."""
    return [
        (f"{QC_CLASS_NAMES[k]} ({burdens.get(k, 0.0):.1%} of tissue)", QC_COLORS[k])
        for k in ("pen", "blur", "fold")
    ]


def qc_features(
    labels: np.ndarray, downsample: float, level0_size: tuple[int, int] | None, slide_mpp: float
) -> list[dict[str, Any]]:
    """QuPath annotations (level-0 px) of the artefact regions, one feature per artefact,
    with its area in um^2."""
    from histoduo.slide.geojson import mask_to_polygons, polygon_feature, ring_area

    features = []
    for name, bit in (("pen", FLAG_PEN), ("blur", FLAG_BLUR), ("fold", FLAG_FOLD)):
        polygons = mask_to_polygons((labels & bit) > 0, downsample, level0_size=level0_size)
        if not polygons:
            continue
        area_px0 = sum(
            abs(ring_area(ext)) - sum(abs(ring_area(h)) for h in holes) for ext, holes in polygons
        )
        features.append(
            polygon_feature(
                polygons,
                class_name=QC_CLASS_NAMES[name],
                color=QC_COLORS[name],
                measurements={"area_um2": area_px0 * slide_mpp**2},
            )
        )
    return features


def write_burdens_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One row per slide: slide, status, tissue area, the burdens (0-1), error; atomically."""
    from histoduo.runtime.files import atomic_write

    fields = ["slide", "path", "status", "tissue_area_mm2", *BURDEN_FIELDS, "n_tiles", "error"]
    with atomic_write(Path(path), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}
            )
    return Path(path)
