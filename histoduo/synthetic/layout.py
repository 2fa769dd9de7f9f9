"""The ground-truth layout grid: which class owns each cell of the slide."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from histoduo.synthetic.spec import _MAX_LAYOUT_CELLS, SyntheticSlideSpec, _ceil_div


@dataclass(frozen=True)
class _Layout:
    cell: int  # level-0 px per layout cell
    labels: np.ndarray = field(repr=False)  # int16 (gh, gw)


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


@dataclass
class SyntheticSlide:
    """A written synthetic slide and accessors for its ground truth."""

    path: Path
    spec: SyntheticSlideSpec
    truth_geojson: Path
    artefacts_geojson: Path | None = None  # written when the spec draws artefacts

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def label_map(self, downsample: float) -> np.ndarray:
        """int16 (ceil(H/ds), ceil(W/ds)): 0 background, i+1 = class_names[i]."""
        return label_map(self.spec, downsample)

    def artefact_masks(self, downsample: float) -> dict[str, np.ndarray]:
        """Ground truth of the drawn artefacts: {"pen", "blur", "fold"} -> bool masks."""
        from histoduo.synthetic.artefacts import artefact_masks

        return artefact_masks(self.spec, downsample, self.tissue_mask(downsample))

    def tissue_mask(self, downsample: float) -> np.ndarray:
        return self.label_map(downsample) > 0

    def class_area_fractions(self) -> dict[str, float]:
        """Area of each class as a fraction of tissue area (exact, from the layout)."""
        lay = _layout(self.spec).labels
        n = max(int((lay > 0).sum()), 1)
        return {c: float((lay == i + 1).sum()) / n for i, c in enumerate(self.class_names)}
