"""Writing slides (SVS or generic TIFF, level by level) and their ground-truth GeoJSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from histoduo.runtime.files import atomic_path, atomic_write_text
from histoduo.slide.geojson import Polygon
from histoduo.synthetic.layout import _layout, label_map
from histoduo.synthetic.render import render_region
from histoduo.synthetic.spec import SyntheticSlideSpec, _ceil_div
from histoduo.synthetic.truth import SyntheticSlide


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
    from histoduo.slide.geojson import polygon_feature

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


def artefact_feature_collection(spec: SyntheticSlideSpec) -> dict:
    """QuPath FeatureCollection (level-0 px) of the drawn artefacts: Pen, Blur, Fold."""
    from histoduo.slide.geojson import polygon_feature
    from histoduo.synthetic.artefacts import ARTEFACT_CLASSES, artefact_masks

    lay = _layout(spec)
    W, H = spec.level0_width, spec.level0_height
    masks = artefact_masks(spec, lay.cell, label_map(spec, lay.cell) > 0)
    feats = []
    for class_name in ARTEFACT_CLASSES:
        rings = _mask_polygons(masks[class_name.lower()], lay.cell, W, H)
        polys = [(np.array(r[0]), [np.array(h) for h in r[1:]]) for r in rings]
        if polys:
            feats.append(polygon_feature(polys, class_name=class_name))
    return {"type": "FeatureCollection", "features": feats}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _render_strip(args: tuple[SyntheticSlideSpec, float, int, int, int]) -> np.ndarray:
    """One row of tiles of a level, padded to whole tiles (worker entry point)."""
    spec, ds, row, lw, lh = args
    ts = spec.tile_size_px
    rows = min(ts, lh - row * ts)
    strip = np.full((ts, _ceil_div(lw, ts) * ts, 3), 255, np.uint8)  # pad like scanners (white)
    strip[:rows, :lw] = render_region(spec, 0, row * ts * ds, lw, rows, ds)
    return strip


def _tiles(
    spec: SyntheticSlideSpec, ds: float, lw: int, lh: int, pool: object | None
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
                zip(spec.render_downsamples(), spec.level_dimensions())
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
    art = None
    if spec.has_artefacts:  # apart from the class truth, which annotation readers take
        art = path.with_suffix(".artefacts.geojson")
        atomic_write_text(art, json.dumps(artefact_feature_collection(spec)))
    return SyntheticSlide(path=path, spec=spec, truth_geojson=gj, artefacts_geojson=art)


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
