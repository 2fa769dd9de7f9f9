"""Rendering any region at any downsample as a pure function of the spec."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from histoduo.synthetic.layout import _layout, _lookup_labels
from histoduo.synthetic.spec import _BG_RGB, _BLOCK_PX, SyntheticSlideSpec
from histoduo.synthetic.style import _grain_tile, _hash01, _Style, _styles, _value_noise


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
            _stamp(
                cov=cov,
                cx=cx[sl],
                cy=cy[sl],
                ra=ra[sl],
                rb=rb[sl],
                ang=ang[sl],
                irr=irr[sl],
                weight=weight[sl],
                soft=soft,
            )
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
            _stamp(
                cov=rim,
                cx=cx,
                cy=cy,
                ra=lum_r * 2.0 * ecc,
                rb=lum_r * 2.0,
                ang=ang,
                irr=zero,
                weight=one,
            )
            lumen = np.zeros((h, w), np.float32)
            _stamp(cov=lumen, cx=cx, cy=cy, ra=lum_r * ecc, rb=lum_r, ang=ang, irr=zero, weight=one)
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
                cov=nuc,
                cx=rcx.ravel(),
                cy=rcy.ravel(),
                ra=nr,
                rb=nr * 0.85,
                ang=(phi + math.pi / 2).ravel(),
                irr=np.zeros(nr.size),
                weight=np.repeat(alpha, n_ring) * (0.85 + 0.15 * jit.ravel()),
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
            cov=nuc,
            cx=(X[sel] - x) / ds - 0.5,
            cy=(Y[sel] - y) / ds - 0.5,
            ra=r * sq,
            rb=r / sq,
            ang=_attr(spec, 31, 6, idl) * math.pi,
            irr=np.full(r.size, st.nuc_irregular) * _attr(spec, 31, 8, idl),
            weight=dark,
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
