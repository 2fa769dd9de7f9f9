"""Readable map figures: title, legend or colour bar, scale bar, and a size people can read.

Pure drawing from arrays and parameters (no slide, no scores object), so every map of
heatmap.py and the report share one look. Small canvases are enlarged with nearest-neighbour
repetition (no blur: one score cell stays one crisp square) until the long side reaches
``min_long_px``; the image is then drawn 1:1 into a figure of exact pixel size.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DPI = 100
MIN_LONG_PX = 800  # long side of the drawn map, px
# Fonts are sized for the report, where a figure is shown at about half its pixel size.
LEGEND_PX = 380  # room right of the map for the legend


@dataclass(frozen=True)
class ColorBar:
    """A continuous colour key: ``cmap`` from ``vmin`` to ``vmax``, labelled ``label``."""

    cmap: str
    vmin: float
    vmax: float
    label: str


def upsample_nearest(image: np.ndarray, min_long_px: int = MIN_LONG_PX) -> tuple[np.ndarray, int]:
    """(image repeated k times along both axes, k) with k the smallest integer reaching
    ``min_long_px`` on the long side (k = 1 for images already that large)."""
    long_side = max(image.shape[:2])
    k = max(1, math.ceil(min_long_px / max(long_side, 1)))
    if k == 1:
        return image, 1
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1), k


def nice_length_um(extent_um: float) -> float:
    """A 1-2-5 x 10^n length close to a fifth of ``extent_um`` (the scale bar's length)."""
    target = max(extent_um / 5.0, 1e-6)
    power = 10.0 ** math.floor(math.log10(target))
    for step in (5.0, 2.0, 1.0):
        if step * power <= target:
            return step * power
    return power


def format_length(um: float) -> str:
    """500 -> "500 µm", 2000 -> "2 mm" (mm from 1 mm up)."""
    if um >= 1000:
        return f"{um / 1000:g} mm"
    return f"{um:g} µm"


def map_figure_png(
    image: np.ndarray,
    um_per_px: float,
    title: str,
    *,
    legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
    legend_title: str | None = None,
    colorbar: ColorBar | None = None,
    min_long_px: int = MIN_LONG_PX,
) -> bytes:
    """PNG bytes of ``image`` (h, w, 3 uint8; ``um_per_px`` µm per pixel) with a title, a
    scale bar, and a legend of (label, RGB) patches and/or a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    big, k = upsample_nearest(image, min_long_px)
    h, w = big.shape[:2]
    left, top, bottom = 20, 64, 20
    right = 20 + (LEGEND_PX if legend else 0) + (140 if colorbar is not None else 0)
    fig_w, fig_h = w + left + right, h + top + bottom
    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
    width_um, height_um = image.shape[1] * um_per_px, image.shape[0] * um_per_px
    # Data coordinates in µm, so the scale bar is drawn in real lengths.
    ax.imshow(big, interpolation="nearest", extent=(0, width_um, height_um, 0))
    ax.set_axis_off()
    fig.suptitle(title, x=left / fig_w, y=1 - 12 / fig_h, ha="left", va="top", fontsize=16)

    length = nice_length_um(width_um)
    pad = 0.03 * min(width_um, height_um)
    bar_h = max(height_um * 0.012, um_per_px * 1.5 / k)
    x0, y0 = pad, height_um - pad - bar_h
    ax.add_patch(
        Rectangle(
            (x0 - pad * 0.5, y0 - bar_h - pad * 1.6),
            length + pad,
            bar_h * 2 + pad * 2.1,
            facecolor="white",
            alpha=0.8,
            edgecolor="none",
        )
    )
    ax.add_patch(Rectangle((x0, y0), length, bar_h, facecolor="black", edgecolor="none"))
    ax.text(
        x0 + length / 2, y0 - pad * 0.3, format_length(length), ha="center", va="bottom",
        fontsize=14, color="black",
    )  # fmt: skip

    if legend:
        handles = [
            Patch(facecolor=np.asarray(rgb) / 255.0, edgecolor="black", label=label)
            for label, rgb in legend
        ]
        fig.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=((left + w + 16) / fig_w, 1 - top / fig_h),
            fontsize=14,
            title=legend_title,
            title_fontsize=13,
            frameon=True,
        )
    if colorbar is not None:
        bar_x = left + w + 20 + (LEGEND_PX if legend else 0)
        cax = fig.add_axes((bar_x / fig_w, (bottom + 0.1 * h) / fig_h, 18 / fig_w, 0.8 * h / fig_h))
        mappable = matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(colorbar.vmin, colorbar.vmax),
            cmap=matplotlib.colormaps[colorbar.cmap],
        )
        bar = fig.colorbar(mappable, cax=cax)
        bar.set_label(colorbar.label, fontsize=14)
        bar.ax.tick_params(labelsize=12)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white", pil_kwargs={"compress_level": 3})
    plt.close(fig)
    return buffer.getvalue()
