"""Deterministic synthetic H&E-like pyramidal slides with known ground truth.

A slide is described by a :class:`SyntheticSlideSpec`. Everything is a pure function of the spec
and of absolute level-0 coordinates, so any region can be rendered at any downsample on its own
(``render_region``) and crops of a big render equal small renders. The writer renders each
pyramid level independently, strip by strip, so level 0 is never held in memory.

Ground truth lives in a small "layout" grid (one cell per ``cell`` level-0 pixels): 0 is
background, ``i + 1`` is ``class_names[i]``. Pixels, ``label_map`` and the QuPath GeoJSON are all
derived from that one grid.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from histoduo.geojson import Polygon
from histoduo.run.files import atomic_path, atomic_write_text

DEFAULT_CLASSES: tuple[str, ...] = ("normal", "low_grade", "high_grade", "necrosis")

_BLOCK_PX = 128  # level-0 block that owns a fixed set of candidate nuclei (determinism unit)
_MAX_LAYOUT_CELLS = 2048  # long side of the layout grid; keeps label maps small for any slide
_MIN_LEVEL_PX = 256  # pyramid levels smaller than this on the long side are dropped
_BG_RGB = np.array([242.0, 240.0, 243.0], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """Everything that determines a synthetic slide (pixels and ground truth)."""

    level0_width: int
    level0_height: int
    mpp: float = 0.25
    seed: int = 0
    format: str = "svs"
    tile_size_px: int = 256
    level_downsamples: tuple[int, ...] = (1, 4, 16)
    jpeg_quality: int = 90
    classes: tuple[str, ...] = DEFAULT_CLASSES
    class_weights: tuple[float, ...] | None = None
    foci: tuple[tuple[str, float], ...] = ()
    tissue_pieces: int = 2
    tissue_coverage: float = 0.45
    region_size_um: float = 400.0
    magnification: float | None = None
    write_mpp: bool = True

    def __post_init__(self) -> None:
        if self.level0_width < 16 or self.level0_height < 16:
            raise ValueError("synthetic slide must be at least 16 x 16 px")
        if self.mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {self.mpp}")
        if self.format not in ("svs", "tiff"):
            raise ValueError(f"format must be 'svs' or 'tiff', got {self.format!r}")
        if self.tile_size_px % 16:
            raise ValueError("tile_size_px must be a multiple of 16 (TIFF requirement)")
        if not self.classes:
            raise ValueError("at least one class is required")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")
        if self.class_weights is not None:
            if len(self.class_weights) != len(self.classes):
                raise ValueError("class_weights must have one weight per class")
            if min(self.class_weights) < 0 or sum(self.class_weights) <= 0:
                raise ValueError("class_weights must be >= 0 with a positive sum")
        if not 0 < self.tissue_coverage < 0.9:
            raise ValueError("tissue_coverage must be in (0, 0.9)")
        for name, frac in self.foci:
            if not 0 < frac < 1:
                raise ValueError(f"focus {name!r}: area fraction must be in (0, 1)")
        if any(int(d) != d or d < 1 for d in self.level_downsamples):
            raise ValueError("level_downsamples must be positive integers")

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names in label order: ``classes`` then foci classes not already listed."""
        extra: list[str] = []
        for name, _ in self.foci:
            if name not in self.classes and name not in extra:
                extra.append(name)
        return tuple(self.classes) + tuple(extra)

    @property
    def app_mag(self) -> float:
        return self.magnification if self.magnification is not None else 10.0 / self.mpp

    @property
    def level_downsamples_used(self) -> tuple[int, ...]:
        """Downsamples actually written (level 0 always; tiny levels dropped)."""
        out = [1]
        for d in sorted(set(int(d) for d in self.level_downsamples)):
            if d > 1 and max(_ceil_div(self.level0_width, d), _ceil_div(self.level0_height, d)) >= (
                _MIN_LEVEL_PX
            ):
                out.append(d)
        return tuple(out)

    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every written level."""
        return tuple(
            (_ceil_div(self.level0_width, d), _ceil_div(self.level0_height, d))
            for d in self.level_downsamples_used
        )


@dataclass
class SyntheticSlide:
    """A written synthetic slide and accessors for its ground truth."""

    path: Path
    spec: SyntheticSlideSpec
    truth_geojson: Path

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def label_map(self, downsample: float) -> np.ndarray:
        """int16 (ceil(H/ds), ceil(W/ds)): 0 background, i+1 = class_names[i]."""
        return label_map(self.spec, downsample)

    def tissue_mask(self, downsample: float) -> np.ndarray:
        return self.label_map(downsample) > 0

    def class_area_fractions(self) -> dict[str, float]:
        """Area of each class as a fraction of tissue area (exact, from the layout)."""
        lay = _layout(self.spec).labels
        n = max(int((lay > 0).sum()), 1)
        return {c: float((lay == i + 1).sum()) / n for i, c in enumerate(self.class_names)}


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


@dataclass(frozen=True)
class _Layout:
    cell: int  # level-0 px per layout cell
    labels: np.ndarray = field(repr=False)  # int16 (gh, gw)


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, zoom

    # big sigmas: filter a coarser grid and upsample (same look, far cheaper)
    f = max(1.0, sigma / 4.0)
    small = (max(2, math.ceil(shape[0] / f)), max(2, math.ceil(shape[1] / f)))
    n = gaussian_filter(rng.standard_normal(small), sigma=max(sigma / f, 0.5), mode="wrap")
    if small != shape:
        n = zoom(
            n, (shape[0] / small[0], shape[1] / small[1]), order=1, grid_mode=True, mode="nearest"
        )
        n = n[: shape[0], : shape[1]]
        if n.shape != shape:  # zoom rounding: pad by edge values
            n = np.pad(n, [(0, shape[0] - n.shape[0]), (0, shape[1] - n.shape[1])], mode="edge")
    return n / max(float(n.std()), 1e-9)


@lru_cache(maxsize=8)
def _layout(spec: SyntheticSlideSpec) -> _Layout:
    """Tissue blobs + Voronoi class regions + foci on a coarse grid (same for writer & truth)."""
    from scipy.ndimage import distance_transform_edt
    from scipy.spatial import cKDTree
    from skimage.morphology import remove_small_holes, remove_small_objects

    W, H = spec.level0_width, spec.level0_height
    cell = max(16, _ceil_div(max(W, H), _MAX_LAYOUT_CELLS))
    gh, gw = _ceil_div(H, cell), _ceil_div(W, cell)
    rng = np.random.default_rng([spec.seed, 0x1A70])
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)

    # --- tissue: union of rotated ellipses perturbed by smooth noise, thresholded to coverage
    n = max(1, spec.tissue_pieces)
    aspect = gw / gh
    cols = max(1, min(n, round(math.sqrt(n * aspect))))
    rows = _ceil_div(n, cols)
    field_ = np.full((gh, gw), -np.inf)
    slots = rng.permutation(rows * cols)[:n]
    for s in slots:
        r, c = divmod(int(s), cols)
        sw, sh = gw / cols, gh / rows
        cx = (c + 0.5 + rng.uniform(-0.12, 0.12)) * sw
        cy = (r + 0.5 + rng.uniform(-0.12, 0.12)) * sh
        ax = 0.5 * sw * rng.uniform(0.6, 0.95)
        ay = 0.5 * sh * rng.uniform(0.6, 0.95)
        th = rng.uniform(0, math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(th) + dy * math.sin(th)) / ax
        v = (-dx * math.sin(th) + dy * math.cos(th)) / ay
        field_ = np.maximum(field_, 1.0 - np.sqrt(u * u + v * v))
    field_ = field_ + 0.22 * _smooth_noise(
        rng, (gh, gw), sigma=max(gh, gw) / (10 * max(cols, rows))
    )
    # white margin around the slide border (tissue never touches the edge)
    m_y, m_x = max(2, int(0.04 * gh)), max(2, int(0.04 * gw))
    inside = np.zeros((gh, gw), bool)
    inside[m_y : gh - m_y, m_x : gw - m_x] = True
    target = spec.tissue_coverage * gh * gw
    vals = np.sort(field_[inside])[::-1]
    k = int(min(max(target, 1), vals.size)) - 1
    tissue = inside & (field_ >= vals[k])
    min_obj = max(4, int(0.002 * gh * gw))
    tissue = remove_small_objects(tissue, max_size=min_obj)
    tissue = remove_small_holes(tissue, max_size=min_obj)
    tissue &= inside
    if not tissue.any():  # degenerate tiny slides: keep at least the centre
        tissue[gh // 2, gw // 2] = True

    labels = np.zeros((gh, gw), np.int16)
    names = spec.class_names
    ty, tx = np.nonzero(tissue)

    # --- class regions: Voronoi cells of random seeds (domain-warped for organic borders)
    cell_um = cell * spec.mpp
    region_cells = max(spec.region_size_um / cell_um, 1.0)
    n_seeds = int(round(tissue.sum() / (math.pi * (region_cells / 2) ** 2)))
    n_classes = len(spec.classes)
    weights = np.asarray(spec.class_weights or [1.0] * n_classes, dtype=np.float64)
    present = np.flatnonzero(weights > 0)
    n_seeds = int(min(max(n_seeds, present.size), 20000, tx.size))
    pick = rng.choice(tx.size, size=n_seeds, replace=False)
    seeds = np.stack([tx[pick], ty[pick]], axis=1).astype(np.float64)
    seeds += rng.uniform(-0.5, 0.5, seeds.shape)
    # every class with weight > 0 appears at least once (as long as there are enough seeds)
    first = rng.permutation(present)[:n_seeds]
    rest = rng.choice(n_classes, size=n_seeds - first.size, p=weights / weights.sum())
    seed_cls = np.concatenate([first, rest]).astype(np.int16)
    warp_amp = 0.35 * region_cells
    wsig = max(region_cells / 2, 1.0)
    wx = warp_amp * _smooth_noise(rng, (gh, gw), wsig)
    wy = warp_amp * _smooth_noise(rng, (gh, gw), wsig)
    q = np.stack([tx + wx[ty, tx], ty + wy[ty, tx]], axis=1)
    _, nearest = cKDTree(seeds).query(q)
    labels[ty, tx] = seed_cls[nearest] + 1

    # --- foci: compact blobs with exact requested area (cells nearest a centre, noisy metric)
    dist_in = distance_transform_edt(np.pad(tissue, 1))[1:-1, 1:-1]
    n_tissue = tx.size
    for name, frac in spec.foci:
        lab = names.index(name) + 1
        want = int(round(frac * n_tissue))
        if want <= 0:
            continue
        r_want = math.sqrt(want / math.pi)
        ok = np.flatnonzero(dist_in[ty, tx] >= 1.05 * r_want)
        if ok.size == 0:
            ok = np.flatnonzero(dist_in[ty, tx] >= 0.9 * dist_in.max())
        c = int(rng.choice(ok))
        cx, cy = tx[c], ty[c]
        bump = _smooth_noise(rng, (gh, gw), max(r_want / 2, 1.0))
        d = np.hypot(tx - cx, ty - cy) * (1.0 + 0.12 * np.clip(bump[ty, tx], -2.5, 2.5))
        sel = np.argpartition(d, want - 1)[:want] if want < d.size else np.arange(d.size)
        labels[ty[sel], tx[sel]] = lab
    return _Layout(cell=cell, labels=labels)


def _lookup_labels(spec: SyntheticSlideSpec, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Layout label at level-0 points (xs (w,), ys (h,) grid) by nearest cell."""
    lay = _layout(spec)
    gh, gw = lay.labels.shape
    ci = np.clip(np.floor(xs / lay.cell).astype(np.int64), 0, gw - 1)
    ri = np.clip(np.floor(ys / lay.cell).astype(np.int64), 0, gh - 1)
    return lay.labels[ri[:, None], ci[None, :]]


def label_map(spec: SyntheticSlideSpec, downsample: float) -> np.ndarray:
    """Ground-truth labels at ``downsample``: int16 (ceil(H/ds), ceil(W/ds))."""
    ds = float(downsample)
    if ds <= 0:
        raise ValueError("downsample must be > 0")
    h = math.ceil(spec.level0_height / ds)
    w = math.ceil(spec.level0_width / ds)
    xs = (np.arange(w) + 0.5) * ds
    ys = (np.arange(h) + 0.5) * ds
    return _lookup_labels(spec, xs, ys).astype(np.int16)


# --------------------------------------------------------------------------------------------
# Pixel rendering
# --------------------------------------------------------------------------------------------


def _candidates(
    spec: SyntheticSlideSpec, x0: float, y0: float, x1: float, y1: float, per_block: int, key: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed number of candidate points per 128-px block overlapping [x0,x1)x[y0,y1).

    Returns X, Y, ids (block_x, block_y, k) and the keep mask. Points come from hashing the ids, so
    a point exists independently of which region asks for it. X, Y are quantised to 1/64 px
    (exact float arithmetic in crops).
    """
    bx = np.arange(math.floor(x0 / _BLOCK_PX), math.floor(x1 / _BLOCK_PX) + 1)
    by = np.arange(math.floor(y0 / _BLOCK_PX), math.floor(y1 / _BLOCK_PX) + 1)
    BX, BY, K = np.meshgrid(bx, by, np.arange(per_block), indexing="ij")
    BX, BY, K = BX.ravel(), BY.ravel(), K.ravel()
    ux = _hash01(spec.seed, key, 1, BX, BY, K)
    uy = _hash01(spec.seed, key, 2, BX, BY, K)
    X = (BX + np.floor(ux * 64 * _BLOCK_PX) / (64 * _BLOCK_PX)) * _BLOCK_PX
    Y = (BY + np.floor(uy * 64 * _BLOCK_PX) / (64 * _BLOCK_PX)) * _BLOCK_PX
    ids = np.stack([BX, BY, K])
    keep = (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)
    return X[keep], Y[keep], ids[:, keep], keep


def _attr(spec: SyntheticSlideSpec, key: int, which: int, ids: np.ndarray) -> np.ndarray:
    return _hash01(spec.seed, key, which, ids[0], ids[1], ids[2])


def _labels_at_points(spec: SyntheticSlideSpec, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    lay = _layout(spec)
    gh, gw = lay.labels.shape
    ci = np.clip(np.floor(X / lay.cell).astype(np.int64), 0, gw - 1)
    ri = np.clip(np.floor(Y / lay.cell).astype(np.int64), 0, gh - 1)
    return lay.labels[ri, ci]


def _stamp(
    cov: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    ra: np.ndarray,
    rb: np.ndarray,
    ang: np.ndarray,
    irr: np.ndarray,
    weight: np.ndarray,
    soft: float = 0.5,
) -> None:
    """Add anti-aliased (irregular) ellipses to coverage ``cov`` in place.

    Centres/radii in output pixels (pixel (i, j) centred at (j, i)). All shapes are evaluated on
    one K x K stamp grid at once (vectorised); sub-pixel shapes keep their mass (area) instead of
    vanishing, so low-resolution levels keep the right darkness.
    """
    if cx.size == 0:
        return
    h, w = cov.shape
    rmax = float(np.max(np.maximum(ra, rb) * (1 + irr)))
    K = int(math.ceil(rmax + soft + 1))
    chunk = max(1, 3_000_000 // (2 * K + 1) ** 2)  # bound temporaries to ~100 MB
    if cx.size > chunk:
        for i in range(0, cx.size, chunk):
            sl = slice(i, i + chunk)
            _stamp(cov, cx[sl], cy[sl], ra[sl], rb[sl], ang[sl], irr[sl], weight[sl], soft)
        return
    offs = np.arange(-K, K + 1, dtype=np.float32)
    icx = np.round(cx).astype(np.int64)
    icy = np.round(cy).astype(np.int64)
    dx = (icx - cx).astype(np.float32)[:, None, None] + offs[None, None, :]
    dy = (icy - cy).astype(np.float32)[:, None, None] + offs[None, :, None]
    c = np.cos(ang).astype(np.float32)[:, None, None]
    s = np.sin(ang).astype(np.float32)[:, None, None]
    r_mean = np.sqrt(ra * rb)
    r_eff = np.maximum(r_mean, 0.7)  # don't rasterise below ~1 px; scale opacity instead
    scale = (r_eff / r_mean).astype(np.float32)[:, None, None]
    u = (dx * c + dy * s) / (ra.astype(np.float32)[:, None, None] * scale)
    v = (-dx * s + dy * c) / (rb.astype(np.float32)[:, None, None] * scale)
    rho = np.sqrt(u * u + v * v)
    if np.any(irr > 0):
        cos_t = u / np.maximum(rho, 1e-6)
        cos3 = 4 * cos_t**3 - 3 * cos_t  # cos(3 theta) without arctan
        rho = rho / (1 + irr.astype(np.float32)[:, None, None] * cos3)
    a = 0.5 + (1 - rho) * r_eff.astype(np.float32)[:, None, None] / (2 * soft)
    np.minimum(a, 1, out=a)  # (cheaper than np.clip; negatives are dropped below)
    mass = np.minimum(1.0, (r_mean / r_eff) ** 2).astype(np.float32)
    a *= (weight.astype(np.float32) * mass)[:, None, None]
    px = icx[:, None, None] + np.arange(-K, K + 1)[None, None, :]
    py = icy[:, None, None] + np.arange(-K, K + 1)[None, :, None]
    ok = (a > 0.003) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
    flat = (py * w + px)[ok]
    cov += np.bincount(flat, weights=a[ok], minlength=h * w).reshape(h, w).astype(np.float32)


def _max_extent_um(styles: Sequence[_Style]) -> float:
    ext = 2.0
    for st in styles:
        ext = max(ext, st.nuc_r_um * (1 + st.nuc_r_jitter) * st.nuc_aspect * (1 + st.nuc_irregular))
        if st.tubule_density > 0:
            ext = max(ext, st.lumen_r_um * 2.2 + 2 * st.nuc_r_um)
    return ext


def render_region(
    spec: SyntheticSlideSpec, x: int, y: int, width: int, height: int, downsample: float = 1.0
) -> np.ndarray:
    """uint8 RGB (height, width, 3) of the area starting at level-0 (x, y) at ``downsample``.

    Output pixel (i, j) samples level-0 point (x + (j + .5) * ds, y + (i + .5) * ds); every
    texture is a function of absolute level-0 coordinates, so crops match bigger renders.
    """
    ds = float(downsample)
    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0), 3), np.uint8)
    um_px = spec.mpp * ds  # microns per output pixel
    xs = x + (np.arange(w) + 0.5) * ds
    ys = y + (np.arange(h) + 0.5) * ds
    L = _lookup_labels(spec, xs, ys)
    styles = _styles(spec)
    tissue = L > 0
    gi = np.mod(np.floor(ys).astype(np.int64), 64)
    gj = np.mod(np.floor(xs).astype(np.int64), 64)
    grain = _grain_tile(spec.seed)[gi[:, None], gj[None, :]]
    if not tissue.any():
        img = _BG_RGB[None, None, :] + 3.0 * grain[..., None]
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    def lut(values: Sequence[float], bg: float = 0.0) -> np.ndarray:
        return np.asarray([bg, *values], dtype=np.float32)

    # --- cytoplasm / stroma: two colours mixed by two octaves of smooth noise
    s_um = 1.0 / spec.mpp  # level-0 px per micron
    t = 0.6 * _value_noise(xs, ys, 6.0 * s_um, 11) + 0.4 * _value_noise(xs, ys, 28.0 * s_um, 12)
    memb_lut = lut([st.membrane for st in styles])
    m = None
    if memb_lut[np.unique(L)].any():
        ridge = 1 - np.abs(2 * _value_noise(xs, ys, 11.0 * s_um, 13) - 1)
        # line width ~1 um at level 0, wider (fainter) when downsampled
        width_t = min(0.5, 0.09 * max(1.0, um_px / 0.5))
        m = np.clip((ridge - (1 - width_t)) / width_t, 0, 1) * memb_lut[L]
        m *= 1.0 / max(1.0, um_px / 1.0) ** 0.5  # fade network at coarse levels
    img = np.empty((h, w, 3), np.float32)
    for ch in range(3):
        a = lut([st.cyto[ch] for st in styles])[L]
        b = lut([st.cyto2[ch] for st in styles])[L]
        img[..., ch] = a + (b - a) * t
        if m is not None:
            img[..., ch] += (205.0 - 60.0 * (ch == 1) - img[..., ch]) * m

    # --- structures: candidates from blocks overlapping the region + margin
    ext = _max_extent_um(styles) / spec.mpp + 2 * ds
    x0, y0 = x - ext, y - ext
    x1, y1 = x + w * ds + ext, y + h * ds + ext
    block_um2 = (_BLOCK_PX * spec.mpp) ** 2
    nuc = np.zeros((h, w), np.float32)

    # tubules (lumen + epithelial rim + ring of nuclei), only in classes with tubule_density
    tub_d = np.array([0.0] + [st.tubule_density for st in styles])
    if tub_d.max() > 0:
        per_block = max(1, math.ceil(tub_d.max() * block_um2 / 1e4))
        X, Y, ids, _ = _candidates(spec, x0, y0, x1, y1, per_block, 21)
        lab = _labels_at_points(spec, X, Y)
        p_keep = tub_d[lab] * block_um2 / 1e4 / per_block
        keep = _attr(spec, 21, 3, ids) < p_keep
        X, Y, ids, lab = X[keep], Y[keep], ids[:, keep], lab[keep]
        if X.size:
            lum_r = np.array([0.0] + [st.lumen_r_um for st in styles])[lab]
            lum_r = lum_r * (0.8 + 0.4 * _attr(spec, 21, 4, ids)) / um_px
            cx = (X - x) / ds - 0.5
            cy = (Y - y) / ds - 0.5
            ang = _attr(spec, 21, 5, ids) * math.pi
            ecc = 1.0 + 0.35 * _attr(spec, 21, 6, ids)
            zero = np.zeros_like(cx)
            one = np.ones_like(cx)
            rim = np.zeros((h, w), np.float32)
            _stamp(rim, cx, cy, lum_r * 2.0 * ecc, lum_r * 2.0, ang, zero, one)
            lumen = np.zeros((h, w), np.float32)
            _stamp(lumen, cx, cy, lum_r * ecc, lum_r, ang, zero, one)
            rim = np.clip(rim, 0, 1) * tissue
            lumen = np.clip(lumen, 0, 1) * tissue
            for ch, (rc, lc) in enumerate(zip((222.0, 134.0, 182.0), (247.0, 240.0, 246.0))):
                img[..., ch] += (rc - img[..., ch]) * rim * 0.8
                img[..., ch] += (lc - img[..., ch]) * lumen
            # ring of nuclei around each lumen (basal position in the epithelium)
            n_ring = 9
            kk = np.arange(n_ring)
            phi = (
                _attr(spec, 21, 7, ids)[:, None] * 2 * math.pi + kk[None, :] * 2 * math.pi / n_ring
            )
            rr = (lum_r * 1.45)[:, None]
            rcx = (
                cx[:, None]
                + rr * ecc[:, None] * np.cos(phi) * np.cos(ang)[:, None]
                - rr * np.sin(phi) * np.sin(ang)[:, None]
            )
            rcy = (
                cy[:, None]
                + rr * ecc[:, None] * np.cos(phi) * np.sin(ang)[:, None]
                + rr * np.sin(phi) * np.cos(ang)[:, None]
            )
            st_r = np.array([0.0] + [st.nuc_r_um for st in styles])[lab] / um_px
            jit = _hash01(spec.seed, 22, ids[0][:, None], ids[1][:, None], ids[2][:, None], kk)
            nr = (st_r[:, None] * (1.15 + 0.2 * (jit - 0.5))).ravel()
            alpha = np.array([0.0] + [st.nuc_alpha for st in styles])[lab]
            _stamp(
                nuc,
                rcx.ravel(),
                rcy.ravel(),
                nr,
                nr * 0.85,
                (phi + math.pi / 2).ravel(),
                np.zeros(nr.size),
                np.repeat(alpha, n_ring) * (0.85 + 0.15 * jit.ravel()),
            )

    # free nuclei (thinned per class density; size/shape/darkness from the class at the centre)
    dens = np.array([0.0] + [st.nuc_density for st in styles])
    per_block = max(1, math.ceil(dens.max() * block_um2 / 1000))
    X, Y, ids, _ = _candidates(spec, x0, y0, x1, y1, per_block, 31)
    lab = _labels_at_points(spec, X, Y)
    keep = _attr(spec, 31, 3, ids) < dens[lab] * block_um2 / 1000 / per_block
    X, Y, ids, lab = X[keep], Y[keep], ids[:, keep], lab[keep]
    for li in np.unique(lab):
        st = styles[li - 1]
        sel = lab == li
        idl = ids[:, sel]
        r = st.nuc_r_um * (1 + st.nuc_r_jitter * (2 * _attr(spec, 31, 4, idl) - 1)) / um_px
        asp = 1 + (st.nuc_aspect - 1) * _attr(spec, 31, 5, idl)
        sq = np.sqrt(asp)
        dark = st.nuc_alpha * (0.8 + 0.2 * _attr(spec, 31, 7, idl))
        _stamp(
            nuc,
            (X[sel] - x) / ds - 0.5,
            (Y[sel] - y) / ds - 0.5,
            r * sq,
            r / sq,
            _attr(spec, 31, 6, idl) * math.pi,
            np.full(r.size, st.nuc_irregular) * _attr(spec, 31, 8, idl),
            dark,
        )
    nuc = np.clip(nuc, 0, 1) * tissue
    nuc *= 0.88 + 0.12 * grain  # chromatin texture
    for ch in range(3):
        nc = lut([st.nuc_color[ch] for st in styles])[L]
        img[..., ch] += (nc - img[..., ch]) * nuc
        img[..., ch] += 2.5 * grain
        img[..., ch] = np.where(tissue, img[..., ch], _BG_RGB[ch] + 3.0 * grain)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# GeoJSON ground truth
# --------------------------------------------------------------------------------------------


def _mask_polygons(mask: np.ndarray, cell: int, W: int, H: int) -> list[list[list[list[float]]]]:
    """Polygons (exterior + holes, level-0 coords) of each 4-connected component of ``mask``."""
    from skimage.measure import approximate_polygon, find_contours
    from skimage.measure import label as cc_label

    comps = cc_label(mask, connectivity=1)
    polys: list[list[list[list[float]]]] = []
    for lab in range(1, int(comps.max()) + 1):
        sub = comps == lab
        rr, cc = np.nonzero(sub)
        r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        crop = np.pad(sub[r0:r1, c0:c1], 1).astype(np.float32)
        rings = []
        for cont in find_contours(crop, 0.5):
            cont = approximate_polygon(cont, tolerance=0.3)
            if len(cont) < 4:
                continue
            ys = (cont[:, 0] - 1 + r0 + 0.5) * cell
            xs = (cont[:, 1] - 1 + c0 + 0.5) * cell
            xs, ys = np.clip(xs, 0, W), np.clip(ys, 0, H)
            area = 0.5 * float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
            ring = [[round(float(a), 2), round(float(b), 2)] for a, b in zip(xs, ys)]
            if ring[0] != ring[-1]:
                ring.append(ring[0])
            rings.append((abs(area), ring))
        if not rings:
            continue
        rings.sort(key=lambda t: -t[0])  # largest ring of a component is its exterior
        polys.append([r for _, r in rings])
    return polys


def truth_feature_collection(spec: SyntheticSlideSpec) -> dict:
    """QuPath FeatureCollection (level-0 px) of tissue pieces and class regions.

    Colours are histoduo's class colours (geojson.class_color), as in every other output.
    """
    from histoduo.geojson import polygon_feature

    def polygons(rings_of_each: list[list[list[list[float]]]]) -> list[Polygon]:
        return [(np.array(r[0]), [np.array(h) for h in r[1:]]) for r in rings_of_each]

    lay = _layout(spec)
    W, H = spec.level0_width, spec.level0_height
    feats: list[dict] = [
        polygon_feature([poly], class_name="Tissue")
        for poly in polygons(_mask_polygons(lay.labels > 0, lay.cell, W, H))
    ]
    for i, name in enumerate(spec.class_names):
        polys = polygons(_mask_polygons(lay.labels == i + 1, lay.cell, W, H))
        if polys:
            feats.append(polygon_feature(polys, class_name=name))
    return {"type": "FeatureCollection", "features": feats}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _render_strip(args: tuple[SyntheticSlideSpec, int, int, int, int]) -> np.ndarray:
    """One row of tiles of a level, padded to whole tiles (worker entry point)."""
    spec, ds, row, lw, lh = args
    ts = spec.tile_size_px
    rows = min(ts, lh - row * ts)
    strip = np.full((ts, _ceil_div(lw, ts) * ts, 3), 255, np.uint8)  # pad like scanners (white)
    strip[:rows, :lw] = render_region(spec, 0, row * ts * ds, lw, rows, ds)
    return strip


def _tiles(
    spec: SyntheticSlideSpec, ds: int, lw: int, lh: int, pool: object | None
) -> Iterator[np.ndarray]:
    ts = spec.tile_size_px
    jobs = [(spec, ds, r, lw, lh) for r in range(_ceil_div(lh, ts))]
    strips = pool.imap(_render_strip, jobs) if pool is not None else map(_render_strip, jobs)
    for strip in strips:
        for c in range(strip.shape[1] // ts):
            yield strip[:, c * ts : (c + 1) * ts]


def _aperio_desc(spec: SyntheticSlideSpec, lw: int, lh: int, level0: bool, thumb: bool) -> str:
    W, H, ts, q = spec.level0_width, spec.level0_height, spec.tile_size_px, spec.jpeg_quality
    head = f"Aperio Image Library v12.0.0 \n{W}x{H} [0,0 {W}x{H}] ({ts}x{ts})"
    if thumb:
        head = f"Aperio Image Library v12.0.0 \n{W}x{H} -> {lw}x{lh} - "
    elif not level0:
        head += f" -> {lw}x{lh}"
    head += f" JPEG/RGB Q={q}" if not thumb else ""
    fields = [f"AppMag = {spec.app_mag:g}"]
    if spec.write_mpp:
        fields.append(f"MPP = {spec.mpp:g}")
    fields += [f"Filename = synthetic-seed{spec.seed}", "ScanScope ID = HISTODUO-SYNTH"]
    return head + "|" + "|".join(fields)


def _write_tiff(tmp: Path, spec: SyntheticSlideSpec, workers: int) -> None:
    import tifffile

    pool = None
    _layout(spec)  # compute once before forking so workers inherit the cache
    n_strips = sum(_ceil_div(h, spec.tile_size_px) for _, h in spec.level_dimensions())
    if workers > 1 and n_strips >= 8:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers)
    try:
        jpeg = {"compression": "jpeg", "compressionargs": {"level": spec.jpeg_quality}}
        ts = spec.tile_size_px
        with tifffile.TiffWriter(
            tmp, bigtiff=spec.level0_width * spec.level0_height * 3 > 2**31
        ) as tw:
            for li, (ds, (lw, lh)) in enumerate(
                zip(spec.level_downsamples_used, spec.level_dimensions())
            ):
                kw: dict = {"metadata": None, "photometric": "rgb", "tile": (ts, ts), **jpeg}
                if spec.format == "svs":
                    kw["description"] = _aperio_desc(spec, lw, lh, li == 0, False)
                else:
                    if spec.write_mpp:
                        res = 1e4 / spec.mpp / ds
                        kw["resolution"] = (res, res)
                        kw["resolutionunit"] = "CENTIMETER"
                    if li > 0:
                        kw["subfiletype"] = 1  # reduced-resolution image
                tw.write(_tiles(spec, ds, lw, lh, pool), shape=(lh, lw, 3), dtype=np.uint8, **kw)
                if li == 0 and spec.format == "svs":
                    # Aperio convention: stripped thumbnail as the 2nd directory
                    tds = max(spec.level0_width, spec.level0_height) / 768.0
                    tw_, th_ = (
                        math.ceil(spec.level0_width / tds),
                        math.ceil(spec.level0_height / tds),
                    )
                    thumb = render_region(spec, 0, 0, tw_, th_, tds)
                    tw.write(
                        thumb,
                        photometric="rgb",
                        metadata=None,
                        compression="lzw",
                        description=_aperio_desc(spec, tw_, th_, False, True),
                    )
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def write_synthetic_slide(
    path: str | Path, spec: SyntheticSlideSpec, *, workers: int | None = None
) -> SyntheticSlide:
    """Write slide + ``<stem>.geojson`` ground truth atomically; return a handle to both.

    ``workers``: processes rendering strips (default: up to 2 / CPU count).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    with atomic_path(path) as tmp:
        _write_tiff(tmp, spec, workers)
    gj = path.with_suffix(".geojson")
    atomic_write_text(gj, json.dumps(truth_feature_collection(spec)))
    return SyntheticSlide(path=path, spec=spec, truth_geojson=gj)


def write_synthetic_cohort(
    out_dir: str | Path,
    n_slides: int,
    base_spec: SyntheticSlideSpec,
    *,
    vary_class_weights: bool = False,
    prefix: str = "synth",
    workers: int | None = None,
) -> list[SyntheticSlide]:
    """``n_slides`` slides ``<prefix>_<i>.<fmt>`` with seeds base_spec.seed + i.

    ``vary_class_weights``: each slide gets its own random class mix (Dirichlet), so cohorts have
    slides dominated by different classes (useful for slide-level labels).
    """
    out = Path(out_dir)
    slides = []
    for i in range(n_slides):
        seed = base_spec.seed + i
        spec = replace(base_spec, seed=seed)
        if vary_class_weights:
            rng = np.random.default_rng([seed, 0xC0407])
            w = rng.dirichlet(np.full(len(base_spec.classes), 0.8))
            spec = replace(spec, class_weights=tuple(float(v) + 1e-3 for v in w))
        ext = "svs" if spec.format == "svs" else "tiff"
        slides.append(write_synthetic_slide(out / f"{prefix}_{i:03d}.{ext}", spec, workers=workers))
    return slides
