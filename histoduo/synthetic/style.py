"""Deterministic noise and the per-class stain and nucleus styles."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from histoduo.synthetic.spec import SyntheticSlideSpec

# --------------------------------------------------------------------------------------------
# Deterministic hashing / noise (functions of absolute coordinates -> crop consistent)
# --------------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _hash_u64(*keys: np.ndarray | int) -> np.ndarray:
    """splitmix64-style hash of integer keys (broadcast), wrapping uint64 arithmetic."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x2545F4914F6CDD1D)
        for k in keys:
            k64 = np.asarray(k).astype(np.int64).astype(np.uint64)
            h = (h ^ k64) + _GOLD
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return np.asarray(h)


def _hash01(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) from integer keys."""
    return (_hash_u64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _value_noise(xs: np.ndarray, ys: np.ndarray, scale: float, key: int) -> np.ndarray:
    """Smooth value noise in [0, 1) at level-0 coords xs (w,), ys (h,); lattice step = scale.

    Separable interpolation: only lattice points are hashed, so cost ~ a few ops per pixel.
    """
    gx = xs / scale
    gy = ys / scale
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    fx = (gx - ix).astype(np.float32)
    fy = (gy - iy).astype(np.float32)
    fx = fx * fx * (3 - 2 * fx)  # smoothstep: no lattice artefacts
    fy = fy * fy * (3 - 2 * fy)
    lx = np.arange(ix.min(), ix.max() + 2)
    ly = np.arange(iy.min(), iy.max() + 2)
    grid = _hash01(key, lx[None, :], ly[:, None]).astype(np.float32)
    r0 = grid[iy - ly[0]]
    r1 = grid[iy + 1 - ly[0]]
    rows = r0 + (r1 - r0) * fy[:, None]
    c0 = rows[:, ix - lx[0]]
    c1 = rows[:, ix + 1 - lx[0]]
    return c0 + (c1 - c0) * fx[None, :]


@lru_cache(maxsize=4)
def _grain_tile(key: int) -> np.ndarray:
    """Periodic 64x64 white-noise tile in [-1, 1] (cheap per-pixel grain by modular indexing)."""
    yy, xx = np.mgrid[0:64, 0:64]
    return (_hash01(key, xx, yy) * 2 - 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Class appearance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    cyto: tuple[float, float, float]  # cytoplasm / stroma colour
    cyto2: tuple[float, float, float]  # second colour mixed in by smooth noise
    membrane: float  # strength of a pink cell-membrane network (clear cells)
    nuc_density: float  # nuclei per 1000 um^2
    nuc_r_um: float  # mean nuclear radius
    nuc_r_jitter: float  # relative +- spread of radius
    nuc_aspect: float  # max aspect ratio (elongation)
    nuc_irregular: float  # amplitude of 3-lobed contour irregularity
    nuc_color: tuple[float, float, float]
    nuc_alpha: float  # max opacity of hematoxylin
    tubule_density: float = 0.0  # tubules (lumen + ring of nuclei) per 10,000 um^2
    lumen_r_um: float = 7.0


_STYLES: dict[str, _Style] = {
    # tubule-like rings of small regular nuclei around white lumina, pink stroma in between
    "normal": _Style(
        cyto=(236, 168, 200),
        cyto2=(224, 142, 184),
        membrane=0.0,
        nuc_density=1.2,
        nuc_r_um=2.0,
        nuc_r_jitter=0.15,
        nuc_aspect=2.6,
        nuc_irregular=0.0,
        nuc_color=(70, 45, 125),
        nuc_alpha=0.85,
        tubule_density=5.0,
        lumen_r_um=7.0,
    ),
    # clear (pale) cytoplasm with a pink membrane network, small dark round nuclei
    "low_grade": _Style(
        cyto=(248, 238, 245),
        cyto2=(240, 222, 236),
        membrane=0.9,
        nuc_density=4.5,
        nuc_r_um=2.3,
        nuc_r_jitter=0.12,
        nuc_aspect=1.15,
        nuc_irregular=0.0,
        nuc_color=(45, 25, 95),
        nuc_alpha=0.97,
    ),
    # dense, large, irregular, dark nuclei in deeply eosinophilic (pink) cytoplasm
    "high_grade": _Style(
        cyto=(214, 112, 166),
        cyto2=(200, 96, 155),
        membrane=0.0,
        nuc_density=8.0,
        nuc_r_um=4.2,
        nuc_r_jitter=0.28,
        nuc_aspect=1.6,
        nuc_irregular=0.18,
        nuc_color=(52, 22, 92),
        nuc_alpha=0.95,
    ),
    # pale pink-grey amorphous material with scattered small fragmented debris
    "necrosis": _Style(
        cyto=(226, 200, 212),
        cyto2=(206, 182, 198),
        membrane=0.0,
        nuc_density=3.5,
        nuc_r_um=1.1,
        nuc_r_jitter=0.4,
        nuc_aspect=1.8,
        nuc_irregular=0.35,
        nuc_color=(105, 60, 130),
        nuc_alpha=0.75,
    ),
}


def _style_for(name: str, index: int) -> _Style:
    """Known classes have hand-tuned styles; others get one derived from their label index."""
    if name in _STYLES:
        return _STYLES[name]
    rng = np.random.default_rng([0x5EED, index])
    pink = rng.uniform(0.0, 1.0)
    cyto = (
        240 - 30 * pink + rng.uniform(-8, 8),
        215 - 100 * pink,
        230 - 50 * pink + rng.uniform(-10, 10),
    )
    return _Style(
        cyto=cyto,
        cyto2=tuple(c - 15 for c in cyto),  # type: ignore[arg-type]
        membrane=float(rng.uniform(0, 1) > 0.6) * 0.7,
        nuc_density=float(rng.uniform(1.0, 9.0)),
        nuc_r_um=float(rng.uniform(1.2, 4.5)),
        nuc_r_jitter=float(rng.uniform(0.1, 0.3)),
        nuc_aspect=float(rng.uniform(1.0, 2.2)),
        nuc_irregular=float(rng.uniform(0.0, 0.25)),
        nuc_color=(
            float(rng.uniform(40, 90)),
            float(rng.uniform(20, 60)),
            float(rng.uniform(90, 140)),
        ),
        nuc_alpha=float(rng.uniform(0.75, 0.97)),
    )


@lru_cache(maxsize=16)
def _styles(spec: SyntheticSlideSpec) -> tuple[_Style, ...]:
    return tuple(_style_for(n, i) for i, n in enumerate(spec.class_names))


# --------------------------------------------------------------------------------------------
# Layout (ground truth grid)
# --------------------------------------------------------------------------------------------
