"""Pictures from saved scores: class map, per-class probability maps, grade map.

Everything here reads ``scores.npz`` (:class:`histoduo.scores.SlideScores`), never the model, so
``histoduo heatmap`` can redraw maps with other colours, alpha, classes or scaling.

Painting follows the conventions: colour only inside the tissue mask, overlapping tiles
averaged (each thumbnail pixel gets the mean probability of every tile covering it), alpha
~0.4 over the thumbnail, no blur, and a legend or colour bar on every figure.

Files per slide folder:

    class_overlay.png   thumbnail-sized overlay of the most probable class (no legend; exact
                        pixels, e.g. to stack over the slide in a viewer)
    class_map.png       the same with slide name and a legend of class names and colours
    prob_<class>.png    probability of one class over the thumbnail, with a colour bar
    grade_map.png       most probable class at a fixed level-0 downsample (default 64 level-0
                        px per pixel), white outside tissue
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.run.files import atomic_write_bytes
from histoduo.scores import SCORES_FILE, SlideScores  # noqa: F401 - re-exported


@dataclass
class HeatmapStyle:
    """How maps look; every field is a ``histoduo heatmap`` flag."""

    alpha: float = 0.4
    classes: list[str] | None = None  # subset to paint / draw probability maps for
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # overrides
    percentile: float | None = None  # probability colour scale up to this percentile
    cmap: str = "inferno"
    grade_map_downsample: float = 64.0  # level-0 px per grade-map pixel
    min_display_px: int = 640  # small thumbnails are enlarged (nearest) in figures

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


def grade_map(scores: SlideScores, style: HeatmapStyle) -> np.ndarray:
    """Most probable class colour per pixel at a fixed level-0 downsample; white elsewhere."""
    ds = style.grade_map_downsample
    shape = (
        max(1, int(np.ceil(scores.slide_height / ds))),
        max(1, int(np.ceil(scores.slide_width / ds))),
    )
    mean, covered = mean_probabilities(scores, ds, shape)
    inside = covered & mask_on_canvas(scores, ds, shape)
    argmax = mean.argmax(axis=2)
    painted = inside & np.isin(argmax, _selected(scores, style))
    out = np.full((*shape, 3), 255, dtype=np.uint8)
    out[painted] = _colors(scores, style)[argmax[painted]]
    return out


# --- files ----------------------------------------------------------------------------------


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    atomic_write_bytes(path, buffer.getvalue())


def _figure(image: np.ndarray, style: HeatmapStyle, title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    zoom = max(1.0, style.min_display_px / max(h, w))
    dpi = 100
    fig, ax = plt.subplots(figsize=(w * zoom / dpi + 2.6, h * zoom / dpi + 0.6), dpi=dpi)
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return fig, ax


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        bbox_inches="tight",
        facecolor="white",
        pil_kwargs={"compress_level": 3},  # level 6 (default) is ~3x slower, ~10% smaller
    )
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def render_slide_maps(
    scores: SlideScores, out_dir: str | Path, style: HeatmapStyle | None = None
) -> dict[str, Path]:
    """Write every map of one slide into ``out_dir``; returns {kind: path}."""
    from matplotlib.patches import Patch

    style = style or HeatmapStyle()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    cmap_ = class_map(scores, style)
    colors = _colors(scores, style)
    selected = _selected(scores, style)

    paths["class_overlay"] = out / "class_overlay.png"
    _save_png(cmap_.overlay, paths["class_overlay"])

    fig, ax = _figure(cmap_.overlay, style, f"{scores.slide}: most probable class")
    pred = cmap_.mean_probs.argmax(axis=2)
    handles = []
    for k in selected:
        share = float((pred[cmap_.inside] == k).mean()) if cmap_.inside.any() else 0.0
        handles.append(
            Patch(
                facecolor=colors[k] / 255.0,
                edgecolor="black",
                label=f"{scores.class_names[k]} ({share:.0%})",
            )
        )
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=10,
        title="class (tissue share)",
        frameon=True,
    )
    paths["class_map"] = out / "class_map.png"
    _save_figure(fig, paths["class_map"])

    import matplotlib

    cmap = matplotlib.colormaps[style.cmap]
    for k in selected:
        name = scores.class_names[k]
        values = cmap_.mean_probs[..., k]
        vmax = 1.0
        if style.percentile is not None and cmap_.inside.any():
            vmax = max(float(np.percentile(values[cmap_.inside], style.percentile)), 1e-6)
        rgba = cmap(np.clip(values / vmax, 0.0, 1.0))[..., :3] * 255.0
        image = scores.thumbnail.astype(np.float32)
        inside = cmap_.inside
        image[inside] = image[inside] * (1 - style.alpha) + rgba[inside] * style.alpha
        image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        fig, ax = _figure(image, style, f"{scores.slide}: P({name})")
        mappable = matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(0.0, vmax), cmap=cmap
        )
        bar = fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label(
            f"P({name})" + (f", scaled to p{style.percentile:g}" if style.percentile else "")
        )
        key = f"prob_{_safe_name(name)}"
        paths[key] = out / f"{key}.png"
        _save_figure(fig, paths[key])

    paths["grade_map"] = out / "grade_map.png"
    _save_png(grade_map(scores, style), paths["grade_map"])
    return paths


def redraw(
    results: str | Path, style: HeatmapStyle, out_dir: str | Path | None = None
) -> list[Path]:
    """Redraw maps for one slide folder or every slide folder of a run; returns the folders.

    ``out_dir``: where to write (``<out_dir>/<slide>/``); default the slide folders themselves.
    """
    results = Path(results)
    if (results / SCORES_FILE).exists():
        folders = [results]
    elif results.is_dir():
        folders = sorted(p for p in results.iterdir() if (p / SCORES_FILE).exists())
    else:
        folders = []
    if not folders:
        raise FileNotFoundError(f"{results}: no {SCORES_FILE} here or in its sub-folders")
    for folder in folders:
        scores = SlideScores.load(folder / SCORES_FILE)
        target = folder if out_dir is None else Path(out_dir) / folder.name
        render_slide_maps(scores, target, style)
    return folders
