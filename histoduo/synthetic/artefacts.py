"""Artefacts drawn over synthetic slides, with ground truth: pen strokes, blur bands, folds.

Like the rest of the generator, every artefact is a pure function of the spec and of level-0
coordinates, so crops, pyramid levels and the truth masks agree. Strokes and folds are thick
wavy polylines; blur bands are vertical stripes (scanners lose focus along a scan line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from histoduo.synthetic.spec import PEN_COLOURS, SyntheticSlideSpec

ARTEFACT_CLASSES = ("Pen", "Blur", "Fold")
_PEN_OPACITY = 0.92
_FOLD_LAYERS = 2.0  # optical density multiplier: tissue lying twice over itself


@dataclass(frozen=True)
class _Path:
    points: np.ndarray  # (K, 2) level-0 x, y
    half_width: float  # level-0 px


@dataclass(frozen=True)
class _Artefacts:
    pens: tuple[tuple[_Path, tuple[float, float, float]], ...]
    bands: tuple[tuple[float, float], ...]  # level-0 [x0, x1)
    folds: tuple[_Path, ...]


def _wavy_path(rng: np.random.Generator, w: float, h: float, length_frac: float) -> np.ndarray:
    """A gently waving line through the middle half of the slide."""
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    angle = rng.uniform(0, math.pi)
    half = 0.5 * length_frac * math.hypot(w, h) * 0.5
    t = np.linspace(-1.0, 1.0, 33)
    d = np.array([math.cos(angle), math.sin(angle)])
    n = np.array([-d[1], d[0]])
    amp = rng.uniform(0.04, 0.1) * min(w, h)
    wave = amp * np.sin(rng.uniform(1.0, 2.5) * math.pi * t + rng.uniform(0, 2 * math.pi))
    pts = np.array([cx, cy]) + (t * half)[:, None] * d + wave[:, None] * n
    return pts


@lru_cache(maxsize=8)
def _artefacts(spec: SyntheticSlideSpec) -> _Artefacts:
    rng = np.random.default_rng([spec.seed, 0xA27E])
    w, h = float(spec.level0_width), float(spec.level0_height)
    short_um = min(w, h) * spec.mpp
    pens = []
    for colour in spec.pen_strokes:
        half_um = float(np.clip(0.02 * short_um, 25.0, 400.0))
        path = _Path(_wavy_path(rng, w, h, rng.uniform(0.6, 0.9)), half_um / spec.mpp)
        pens.append((path, PEN_COLOURS[colour]))
    bands = []
    for _ in range(spec.blur_bands):
        width = rng.uniform(0.12, 0.2) * w
        x0 = rng.uniform(0.2 * w, 0.8 * w - width)
        bands.append((x0, x0 + width))
    folds = []
    for _ in range(spec.folds):
        half_um = float(np.clip(0.03 * short_um, 40.0, 600.0))
        folds.append(_Path(_wavy_path(rng, w, h, rng.uniform(0.3, 0.5)), half_um / spec.mpp))
    return _Artefacts(tuple(pens), tuple(bands), tuple(folds))


def _path_distance(path: _Path, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Level-0 distance from grid points (xs (w,), ys (h,), increasing) to the polyline,
    float32 (h, w); inf farther than the path's reach (only the window around each segment
    is computed, so the cost follows the stroke's area, not the region's)."""
    best = np.full((ys.size, xs.size), np.inf, np.float32)
    step = float(xs[1] - xs[0]) if xs.size > 1 else 1.0
    reach = path.half_width + 2.0 * step
    for (ax, ay), (bx, by) in zip(path.points[:-1], path.points[1:]):
        c0, c1 = np.searchsorted(xs, [min(ax, bx) - reach, max(ax, bx) + reach])
        r0, r1 = np.searchsorted(ys, [min(ay, by) - reach, max(ay, by) + reach])
        if c0 >= c1 or r0 >= r1:
            continue  # segment far from this region
        X = xs[c0:c1].astype(np.float32)[None, :]
        Y = ys[r0:r1].astype(np.float32)[:, None]
        dx, dy = bx - ax, by - ay
        t = ((X - ax) * dx + (Y - ay) * dy) / max(dx * dx + dy * dy, 1e-9)
        t = np.clip(t, 0.0, 1.0)
        d = np.hypot(X - (ax + t * dx), Y - (ay + t * dy))
        np.minimum(best[r0:r1, c0:c1], d, out=best[r0:r1, c0:c1])
    return best


def _coverage(path: _Path, xs: np.ndarray, ys: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage (0-1) of a thick path, edges one output pixel (``px``) wide."""
    d = _path_distance(path, xs, ys)
    return np.clip((path.half_width - d) / px + 0.5, 0.0, 1.0)


def _grid(spec: SyntheticSlideSpec, downsample: float) -> tuple[np.ndarray, np.ndarray]:
    ds = float(downsample)
    w = math.ceil(spec.level0_width / ds)
    h = math.ceil(spec.level0_height / ds)
    return (np.arange(w) + 0.5) * ds, (np.arange(h) + 0.5) * ds


def pen_alpha(spec: SyntheticSlideSpec, xs: np.ndarray, ys: np.ndarray, px: float) -> list:
    """[(coverage (h, w), ink transmittance)] of every stroke touching the grid."""
    return [(_coverage(p, xs, ys, px), ink) for p, ink in _artefacts(spec).pens]


def blur_band_mask(spec: SyntheticSlideSpec, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    inside = np.zeros(xs.size, bool)
    for x0, x1 in _artefacts(spec).bands:
        inside |= (xs >= x0) & (xs < x1)
    return np.broadcast_to(inside[None, :], (ys.size, xs.size))


def fold_coverage(spec: SyntheticSlideSpec, xs: np.ndarray, ys: np.ndarray, px: float):
    cov = np.zeros((ys.size, xs.size), np.float32)
    for path in _artefacts(spec).folds:
        np.maximum(cov, _coverage(path, xs, ys, px), out=cov)
    return cov


def apply_folds(img: np.ndarray, cov: np.ndarray, tissue: np.ndarray) -> None:
    """Tissue under a fold lies twice over itself: optical density doubles (in place)."""
    a = (cov * tissue)[..., None]
    if not a.any():
        return
    t = np.clip(img / 255.0, 1e-3, 1.0)
    img += (255.0 * t**_FOLD_LAYERS - img) * a


def apply_pen(img: np.ndarray, strokes: list) -> None:
    """Marker ink lies on the coverslip, over tissue and glass alike (in place)."""
    for cov, ink in strokes:
        if not cov.any():
            continue
        a = (_PEN_OPACITY * cov)[..., None]
        img *= 1.0 - a + a * np.asarray(ink, np.float32)


def blur_margin_px(spec: SyntheticSlideSpec, downsample: float) -> int:
    """Output pixels of context a blurred band needs around a region."""
    if not spec.blur_bands:
        return 0
    return int(math.ceil(3.0 * spec.blur_sigma_um / spec.mpp / float(downsample))) + 1


def artefact_masks(
    spec: SyntheticSlideSpec, downsample: float, tissue: np.ndarray
) -> dict[str, np.ndarray]:
    """Ground truth at ``downsample``: {"pen", "blur", "fold"} -> bool (ceil(H/ds), ceil(W/ds)).

    ``tissue`` is the slide's tissue on the same grid (``layout.label_map(spec, ds) > 0``).
    Pen covers glass too; blur and fold count only where there is tissue (a defocused or
    folded patch of glass is not an artefact anyone can see).
    """
    xs, ys = _grid(spec, downsample)
    pen = np.zeros((ys.size, xs.size), bool)
    for cov, _ in pen_alpha(spec, xs, ys, float(downsample)):
        pen |= cov >= 0.5
    return {
        "pen": pen,
        "blur": blur_band_mask(spec, xs, ys) & tissue,
        "fold": (fold_coverage(spec, xs, ys, float(downsample)) >= 0.5) & tissue,
    }
