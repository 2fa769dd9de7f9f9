"""A slide-level (``train-mil``) model inside ``predict``: the call, its confidence, whether
it agrees with the rule-based call, and an attention map per slide.

The slide model reads the same feature vectors it was trained on: the tiles are embedded by
the encoder its checkpoint names (``model_config.encoder`` / ``encoder_info``) and the feature
provenance is checked against it (encoder name, weights sha256, width), so a model is never
fed another encoder's features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.results.layout import ATTENTION_MAP_PNG, MIL_FILE
from histoduo.runtime.errors import HistoduoError


class SlideModelError(HistoduoError):
    """A slide model that cannot be used on these features."""


@dataclass(frozen=True, kw_only=True)
class MILCall:
    """One slide's call by the slide model."""

    call: str
    confidence: float  # probability of the call
    probabilities: dict[str, float]
    attention: np.ndarray  # (N, K), K = 1 or one column per class; each column sums to 1

    def agrees_with(self, rule_call: str | None) -> bool | None:
        """Whether the rule-based call (predict's grade rule over tile classes) says the same;
        None when there is no rule-based call (predict ran with the slide model alone)."""
        if rule_call is None or rule_call == "":
            return None
        return self.call == rule_call

    def attention_for_call(self) -> np.ndarray:
        """(N,) the attention behind the call (the called class's branch when multi-branch)."""
        if self.attention.shape[1] == 1:
            return self.attention[:, 0]
        names = list(self.probabilities)
        return self.attention[:, names.index(self.call)]


class SlideModel:
    """A ``train-mil`` checkpoint, ready to call slides from their tile features."""

    def __init__(self, path: str | Path) -> None:
        from histoduo.models.mil import MILModelConfig, load_mil_model

        self.path = Path(path)
        self.model, self.meta = load_mil_model(self.path)
        self.config = MILModelConfig.from_dict(self.meta.model_config)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    @property
    def encoder_arg(self) -> str:
        """What to pass to the encoder registry to rebuild the encoder (a registry name or,
        for features from a histoduo checkpoint, that checkpoint's path)."""
        return str(self.config.encoder_info.get("encoder_arg") or self.config.encoder)

    def check_features(self, info: Any, where: str | Path) -> None:
        """Refuse features from another encoder, other weights or another width."""
        wanted = (self.config.encoder, self.config.encoder_weights_sha256, self.config.in_dim)
        found = (info.encoder, info.weights_sha256, info.embedding_dim)
        if wanted != found:
            raise SlideModelError(
                where,
                f"features from encoder {found[0]!r} ({found[2]}-d, weights "
                f"{found[1][:12] or 'none'}), but the slide model {self.path} was trained on "
                f"{wanted[0]!r} ({wanted[2]}-d, weights {wanted[1][:12] or 'none'})",
            )

    def call(self, features: np.ndarray) -> MILCall:
        from histoduo.models.mil import mil_predict

        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.config.in_dim or not len(features):
            raise SlideModelError(
                self.path, f"expects (tiles, {self.config.in_dim}) features, got {features.shape}"
            )
        probabilities, attention = mil_predict(self.model, features)
        best = int(np.argmax(probabilities))
        return MILCall(
            call=self.class_names[best],
            confidence=float(probabilities[best]),
            probabilities={n: float(p) for n, p in zip(self.class_names, probabilities)},
            attention=attention,
        )


def attention_grid(
    coords: np.ndarray,
    attention: np.ndarray,
    tile_size_level0: float,
    level0_size: tuple[int, int],
    downsample: float,
) -> np.ndarray:
    """(H, W) float canvas at ``downsample`` (level-0 px per cell): each tile's attention as a
    share of the slide's largest, averaged where tiles overlap; NaN where no tile lies."""
    width, height = level0_size
    shape = (max(1, int(np.ceil(height / downsample))), max(1, int(np.ceil(width / downsample))))
    total = np.zeros(shape)
    count = np.zeros(shape)
    values = np.asarray(attention, dtype=np.float64)
    values = values / max(float(values.max()), 1e-12)
    for (x, y), value in zip(np.asarray(coords).tolist(), values):
        x0, y0 = int(x // downsample), int(y // downsample)
        x1 = max(x0 + 1, int(np.ceil((x + tile_size_level0) / downsample)))
        y1 = max(y0 + 1, int(np.ceil((y + tile_size_level0) / downsample)))
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def attention_map_png(
    grid: np.ndarray,
    um_per_cell: float,
    title: str,
    *,
    thumbnail: np.ndarray | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
) -> bytes:
    """PNG of an attention grid (over ``thumbnail``, same shape, when given) with a title,
    a colour bar and a scale bar, in the look of predict's other maps."""
    import matplotlib

    from histoduo.results.figures import ColorBar, map_figure_png

    painted = ~np.isnan(grid)
    rgb = matplotlib.colormaps[cmap](np.nan_to_num(grid))[..., :3] * 255.0
    base = np.full((*grid.shape, 3), 255.0) if thumbnail is None else thumbnail.astype(np.float64)
    image = base.copy()
    image[painted] = base[painted] * (1 - alpha) + rgb[painted] * alpha
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    bar = ColorBar(cmap, 0.0, 1.0, "attention (share of the slide's top tile)")
    return map_figure_png(image, um_per_cell, title, colorbar=bar)


def write_slide_model_outputs(
    slide_dir: Path,
    slide: str,
    result: MILCall,
    coords: np.ndarray,
    *,
    tile_size_level0: float,
    level0_size: tuple[int, int],
    slide_mpp: float,
    rule_call: str | None = None,
    thumbnail: np.ndarray | None = None,
    thumbnail_downsample: float | None = None,
) -> dict[str, Any]:
    """``mil.json`` (call, confidence, probabilities, agreement) and ``attention_map.png`` in
    a slide's results folder; returns the slides.csv fields."""
    from histoduo.runtime.files import atomic_write_bytes, atomic_write_text

    downsample = thumbnail_downsample or max(tile_size_level0 / 4, 1.0)
    grid = attention_grid(
        coords, result.attention_for_call(), tile_size_level0, level0_size, downsample
    )
    if thumbnail is not None and thumbnail.shape[:2] != grid.shape:
        thumbnail = None  # a thumbnail of other proportions: draw on white instead
    agrees = result.agrees_with(rule_call)
    title = f"{slide}: slide model attention, call {result.call} ({result.confidence:.2f})"
    if agrees is False:
        title += f"; rule says {rule_call}"
    png = attention_map_png(grid, downsample * slide_mpp, title, thumbnail=thumbnail)
    atomic_write_bytes(slide_dir / ATTENTION_MAP_PNG, png)
    fields = {
        "mil_call": result.call,
        "mil_confidence": round(result.confidence, 6),
        "mil_agrees": agrees,
    }
    atomic_write_text(
        slide_dir / MIL_FILE,
        json.dumps({**fields, "mil_probabilities": result.probabilities}, indent=2),
    )
    return fields
