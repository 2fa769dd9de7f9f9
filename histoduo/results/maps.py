"""Pictures from saved scores: class map, per-class probability maps, grade map.

Everything here reads ``scores.npz`` (:class:`~histoduo.results.scores.SlideScores`), never the
model, so
``histoduo heatmap`` can redraw maps with other colours, alpha, classes or scaling.

Painting follows the conventions: colour only inside the tissue mask, overlapping tiles
averaged (each thumbnail pixel gets the mean probability of every tile covering it), alpha
~0.4 over the thumbnail, no blur. Every figure (figures.py) has a title, a legend or colour
bar, a scale bar and at least 800 px on its long side (nearest-neighbour enlargement).

Files per slide folder:

    thumbnail.png       the slide thumbnail with a scale bar
    class_overlay.png   most probable class blended (alpha) over the thumbnail, with a legend
    class_map.png       the same classes opaque (no thumbnail underneath), white outside tissue
    prob_<class>.png    probability of one class over the thumbnail, with a colour bar
    grade_map.png       tumour grade classes at a fixed level-0 downsample (default 64 level-0
                        px per cell), other tissue grey, white outside tissue
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoduo.results.layout import THUMBNAIL_PNG, safe_file_stem
from histoduo.results.scores import SlideScores
from histoduo.runtime.files import atomic_write_bytes


@dataclass(kw_only=True)
class HeatmapStyle:
    """How maps look; every field is a ``histoduo heatmap`` flag."""

    alpha: float = 0.4
    classes: list[str] | None = None  # subset to paint / draw probability maps for
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # overrides
    percentile: float | None = None  # probability colour scale up to this percentile
    cmap: str = "inferno"
    grade_map_downsample: float = 64.0  # level-0 px per grade-map pixel
    min_display_px: int = 800  # long side of every map; small ones enlarged (nearest)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in 0-1, got {self.alpha}")
        if self.percentile is not None and not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.grade_map_downsample <= 0:
            raise ValueError("grade map downsample must be positive")


# --- painting -------------------------------------------------------------------------------


def tile_boxes(scores: SlideScores, downsample: float, shape: tuple[int, int]) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 pixel boxes of the tiles on a canvas at ``downsample``.

    Rounding both edges means tiles that abut at level 0 abut on the canvas (no double
    counting), and every tile covers at least one pixel.
    """
    h, w = shape
    size = scores.tile_size_level0
    x0 = np.round(scores.coords[:, 0] / downsample).astype(np.int64)
    y0 = np.round(scores.coords[:, 1] / downsample).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((scores.coords[:, 0] + size) / downsample).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((scores.coords[:, 1] + size) / downsample).astype(np.int64))
    return np.stack(
        [np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], axis=1
    )


def _box_sum(boxes: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sum of ``values`` over every pixel each box covers (difference array + 2 cumsums)."""
    h, w = shape
    diff = np.zeros((h + 1, w + 1), dtype=np.float64)
    x0, y0, x1, y1 = boxes.T
    np.add.at(diff, (y0, x0), values)
    np.add.at(diff, (y0, x1), -values)
    np.add.at(diff, (y1, x0), -values)
    np.add.at(diff, (y1, x1), values)
    return np.cumsum(np.cumsum(diff, axis=0), axis=1)[:h, :w]


def mean_probabilities(
    scores: SlideScores, downsample: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """((h, w, K) mean probability of the tiles covering each pixel, (h, w) covered)."""
    boxes = tile_boxes(scores, downsample, shape)
    count = _box_sum(boxes, np.ones(len(boxes)), shape)
    covered = count > 0.5
    out = np.zeros((*shape, len(scores.class_names)), dtype=np.float32)
    safe = np.where(covered, count, 1.0)
    for k in range(len(scores.class_names)):
        out[..., k] = _box_sum(boxes, scores.probs[:, k].astype(np.float64), shape) / safe
    return out, covered


def mask_on_canvas(scores: SlideScores, downsample: float, shape: tuple[int, int]) -> np.ndarray:
    """The tissue mask resampled (nearest) onto a canvas at ``downsample``."""
    h, w = shape
    mh, mw = scores.tissue_mask.shape
    scale = downsample / scores.mask_downsample
    rows = np.clip(((np.arange(h) + 0.5) * scale).astype(np.int64), 0, mh - 1)
    cols = np.clip(((np.arange(w) + 0.5) * scale).astype(np.int64), 0, mw - 1)
    return scores.tissue_mask[np.ix_(rows, cols)]


def _colors(scores: SlideScores, style: HeatmapStyle) -> np.ndarray:
    colors = scores.class_colors.astype(np.uint8).copy()
    for name, rgb in style.colors.items():
        if name not in scores.class_names:
            raise ValueError(
                f"colour given for unknown class {name!r}; classes: {scores.class_names}"
            )
        colors[scores.class_names.index(name)] = rgb
    return colors


def _selected(scores: SlideScores, style: HeatmapStyle) -> list[int]:
    if not style.classes:
        return list(range(len(scores.class_names)))
    unknown = [c for c in style.classes if c not in scores.class_names]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; classes: {scores.class_names}")
    return [scores.class_names.index(c) for c in style.classes]


@dataclass
class ClassMap:
    """The painted class map on the thumbnail canvas."""

    overlay: np.ndarray  # (h, w, 3) uint8
    painted: np.ndarray  # (h, w) bool: pixels that got a class colour
    mean_probs: np.ndarray  # (h, w, K)
    inside: np.ndarray  # (h, w) bool: tissue and covered by a tile


def class_map(scores: SlideScores, style: HeatmapStyle) -> ClassMap:
    shape = scores.thumbnail.shape[:2]
    ds = scores.thumbnail_downsample
    mean, covered = mean_probabilities(scores, ds, shape)
    inside = covered & mask_on_canvas(scores, ds, shape)
    argmax = mean.argmax(axis=2)
    painted = inside & np.isin(argmax, _selected(scores, style))
    colors = _colors(scores, style).astype(np.float32)
    out = scores.thumbnail.astype(np.float32)
    out[painted] = out[painted] * (1 - style.alpha) + colors[argmax[painted]] * style.alpha
    return ClassMap(np.clip(out + 0.5, 0, 255).astype(np.uint8), painted, mean, inside)


OTHER_TISSUE_RGB = (205, 205, 205)  # grade map: tissue whose most probable class is no grade


def grade_map(scores: SlideScores, style: HeatmapStyle) -> np.ndarray:
    """Tumour grade per pixel at a fixed level-0 downsample: grade classes in their colour,
    other tissue light grey, white outside tissue. Without grade classes (older scores files)
    every class is painted."""
    ds = style.grade_map_downsample
    shape = (
        max(1, int(np.ceil(scores.level0_height / ds))),
        max(1, int(np.ceil(scores.level0_width / ds))),
    )
    mean, covered = mean_probabilities(scores, ds, shape)
    inside = covered & mask_on_canvas(scores, ds, shape)
    argmax = mean.argmax(axis=2)
    painted = inside & np.isin(argmax, _grade_indices(scores, style))
    out = np.full((*shape, 3), 255, dtype=np.uint8)
    out[inside] = OTHER_TISSUE_RGB
    out[painted] = _colors(scores, style)[argmax[painted]]
    return out


def _grade_indices(scores: SlideScores, style: HeatmapStyle) -> list[int]:
    selected = _selected(scores, style)
    if not scores.grade_classes:
        return selected
    grades = [scores.class_names.index(g) for g in scores.grade_classes if g in scores.class_names]
    return [k for k in grades if k in selected]


# --- files ----------------------------------------------------------------------------------


def render_thumbnail(
    scores: SlideScores, out_dir: str | Path, style: HeatmapStyle | None = None
) -> dict[str, Path]:
    """thumbnail.png: the slide thumbnail with a title and a scale bar."""
    from histoduo.results.figures import map_figure_png

    style = style or HeatmapStyle()
    path = Path(out_dir) / THUMBNAIL_PNG
    path.parent.mkdir(parents=True, exist_ok=True)
    um = scores.thumbnail_downsample * scores.slide_mpp
    title = f"{scores.slide}: thumbnail"
    atomic_write_bytes(
        path, map_figure_png(scores.thumbnail, um, title, min_long_px=style.min_display_px)
    )
    return {"thumbnail": path}


def render_slide_maps(
    scores: SlideScores, out_dir: str | Path, style: HeatmapStyle | None = None
) -> dict[str, Path]:
    """Write every map of one slide into ``out_dir``; returns {kind: path}.

    Every map has a title, a legend or colour bar and a scale bar (figures.py).
    """
    import matplotlib

    from histoduo.results.figures import ColorBar, map_figure_png

    style = style or HeatmapStyle()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    names = scores.display_names
    um_thumb = scores.thumbnail_downsample * scores.slide_mpp
    size = style.min_display_px

    def write(key: str, png: bytes) -> None:
        paths[key] = out / f"{key}.png"
        atomic_write_bytes(paths[key], png)

    paths.update(render_thumbnail(scores, out, style))
    cmap_ = class_map(scores, style)
    colors = _colors(scores, style)
    selected = _selected(scores, style)
    pred = cmap_.mean_probs.argmax(axis=2)
    legend = []
    for k in selected:
        share = float((pred[cmap_.inside] == k).mean()) if cmap_.inside.any() else 0.0
        legend.append((f"{names[k]} ({share:.0%})", tuple(int(c) for c in colors[k])))
    write(
        "class_overlay",
        map_figure_png(
            cmap_.overlay, um_thumb, f"{scores.slide}: most probable class over the tissue",
            legend=legend, legend_title="class (share of tissue)", min_long_px=size,
        ),
    )  # fmt: skip
    opaque = np.full_like(scores.thumbnail, 255)
    opaque[cmap_.painted] = colors[pred[cmap_.painted]]
    opaque[cmap_.inside & ~cmap_.painted] = OTHER_TISSUE_RGB
    write(
        "class_map",
        map_figure_png(
            opaque, um_thumb, f"{scores.slide}: class map (most probable class per tile)",
            legend=legend, legend_title="class (share of tissue)", min_long_px=size,
        ),
    )  # fmt: skip

    cmap = matplotlib.colormaps[style.cmap]
    for k in selected:
        values = cmap_.mean_probs[..., k]
        vmax = 1.0
        if style.percentile is not None and cmap_.inside.any():
            vmax = max(float(np.percentile(values[cmap_.inside], style.percentile)), 1e-6)
        rgba = cmap(np.clip(values / vmax, 0.0, 1.0))[..., :3] * 255.0
        image = scores.thumbnail.astype(np.float32)
        inside = cmap_.inside
        image[inside] = image[inside] * (1 - style.alpha) + rgba[inside] * style.alpha
        image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        label = f"P({names[k]})" + (
            f", scaled to p{style.percentile:g}" if style.percentile else ""
        )
        write(
            f"prob_{safe_file_stem(scores.class_names[k])}",
            map_figure_png(
                image, um_thumb, f"{scores.slide}: probability of {names[k]}",
                colorbar=ColorBar(style.cmap, 0.0, vmax, label), min_long_px=size,
            ),
        )  # fmt: skip

    grades = _grade_indices(scores, style)
    gmap = grade_map(scores, style)
    grade_legend = [(names[k], tuple(int(c) for c in colors[k])) for k in grades]
    if scores.grade_classes:
        grade_legend.append(("non-tumour tissue", OTHER_TISSUE_RGB))
    write(
        "grade_map",
        map_figure_png(
            gmap, style.grade_map_downsample * scores.slide_mpp,
            f"{scores.slide}: tumour grade ({style.grade_map_downsample:g} level-0 px per cell)",
            legend=grade_legend, legend_title="most probable class", min_long_px=size,
        ),
    )  # fmt: skip
    return paths
