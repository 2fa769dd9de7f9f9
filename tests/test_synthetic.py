"""Tests of the synthetic slide generator (small slides; whole file runs in seconds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from histoduo.synthetic import (
    DEFAULT_CLASSES,
    SyntheticSlide,
    SyntheticSlideSpec,
    render_region,
    write_synthetic_cohort,
    write_synthetic_slide,
)

openslide = pytest.importorskip("openslide")


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    spec = SyntheticSlideSpec(2048, 1536, mpp=0.5, seed=7, level_downsamples=(1, 4, 16))
    return write_synthetic_slide(tmp_path_factory.mktemp("svs") / "a.svs", spec, workers=1)


def _rasterise(geom: dict, shape: tuple[int, int], ds: float) -> np.ndarray:
    """Even-odd fill of (Multi)Polygon rings at downsample ``ds`` (pixel centres)."""
    from skimage.draw import polygon

    out = np.zeros(shape, bool)
    polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    for poly in polys:
        for ring in poly:
            r = np.asarray(ring)
            rr, cc = polygon(r[:, 1] / ds - 0.5, r[:, 0] / ds - 0.5, shape)
            out[rr, cc] ^= True
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    f = rgb.astype(np.float32)
    return f.max(-1) - f.min(-1)


def test_svs_opens_in_openslide_and_tiffslide(svs: SyntheticSlide) -> None:
    with openslide.OpenSlide(str(svs.path)) as sl:
        assert sl.properties["openslide.vendor"] == "aperio"
        assert sl.level_count == 2  # the 1/16 level (128 px) is too small and dropped
        assert sl.level_dimensions == ((2048, 1536), (512, 384))
        assert sl.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(sl.properties["aperio.AppMag"]) == pytest.approx(20)
        assert "thumbnail" in sl.associated_images
        region = np.asarray(sl.read_region((512, 512), 0, (256, 256)).convert("RGB"))
    direct = render_region(svs.spec, 512, 512, 256, 256)
    # JPEG q90 round trip stays close to the rendered pixels
    assert np.abs(region.astype(int) - direct.astype(int)).mean() < 6
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(svs.path) as ts:
        assert ts.level_dimensions[0] == (2048, 1536)
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)


def test_level_dropping() -> None:
    spec = SyntheticSlideSpec(2048, 1536, level_downsamples=(1, 4, 16))
    # 2048 / 16 = 128 < 256 px: dropped
    assert spec.level_downsamples_used == (1, 4)
    assert spec.level_dimensions() == ((2048, 1536), (512, 384))


def test_generic_tiff_and_no_mpp(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(1500, 1100, mpp=1.0, seed=2, format="tiff", level_downsamples=(1, 4))
    s = write_synthetic_slide(tmp_path / "b.tiff", spec, workers=1)
    with openslide.OpenSlide(str(s.path)) as sl:
        assert sl.properties["openslide.vendor"] == "generic-tiff"
        assert sl.level_dimensions == ((1500, 1100), (375, 275))
        assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(1.0)
    for fmt in ("svs", "tiff"):
        nomp = SyntheticSlideSpec(800, 600, format=fmt, write_mpp=False, level_downsamples=(1,))
        p = write_synthetic_slide(tmp_path / f"nomp.{fmt}", nomp, workers=1).path
        with openslide.OpenSlide(str(p)) as sl:
            assert "openslide.mpp-x" not in sl.properties
            assert "aperio.MPP" not in sl.properties
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp files


def test_determinism(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(1024, 768, seed=5, level_downsamples=(1, 4))
    a = write_synthetic_slide(tmp_path / "x.svs", spec, workers=1)
    b = write_synthetic_slide(tmp_path / "y.svs", spec, workers=2)

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(a.path) == digest(b.path)
    assert a.truth_geojson.read_text() == b.truth_geojson.read_text()
    other = render_region(SyntheticSlideSpec(1024, 768, seed=6), 0, 0, 256, 192, 4)
    assert not np.array_equal(other, render_region(spec, 0, 0, 256, 192, 4))


@pytest.mark.parametrize("ds", [1, 2, 4])
def test_render_region_crop_consistency(ds: int) -> None:
    spec = SyntheticSlideSpec(3000, 2400, seed=3, foci=(("necrosis", 0.05),))
    big = render_region(spec, 600, 400, 300, 260, ds)
    for ox, oy, w, h in [(0, 0, 64, 64), (37, 91, 100, 50), (250, 200, 50, 60)]:
        small = render_region(spec, 600 + ox * ds, 400 + oy * ds, w, h, ds)
        diff = np.abs(small.astype(int) - big[oy : oy + h, ox : ox + w].astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_truth_matches_geojson_and_pixels(svs: SyntheticSlide) -> None:
    ds = 8.0
    lm = svs.label_map(ds)
    assert lm.dtype == np.int16 and lm.shape == (192, 256)
    mask = svs.tissue_mask(ds)
    assert 0.25 < mask.mean() < 0.65  # ~tissue_coverage 0.45
    # white margin at the border
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any()
    fc = json.loads(svs.truth_geojson.read_text())
    assert fc["type"] == "FeatureCollection"
    by_class: dict[str, np.ndarray] = {}
    for f in fc["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        name = props["classification"]["name"]
        assert len(props["classification"]["color"]) == 3
        r = _rasterise(f["geometry"], lm.shape, ds)
        by_class[name] = by_class.get(name, np.zeros_like(r)) | r
    assert _iou(by_class["Tissue"], mask) >= 0.95
    for i, name in enumerate(svs.class_names):
        if (lm == i + 1).sum() > 50:
            assert _iou(by_class[name], lm == i + 1) >= 0.95, name
    # pixels: tissue is more saturated than background
    with openslide.OpenSlide(str(svs.path)) as sl:
        thumb = np.asarray(sl.read_region((0, 0), 1, sl.level_dimensions[1]).convert("RGB"))
    lm4 = svs.label_map(4)
    sat = _saturation(thumb)
    assert sat[lm4 > 0].mean() > 4 * sat[lm4 == 0].mean() + 20


def test_foci_area_fraction() -> None:
    spec = SyntheticSlideSpec(
        3000, 2000, seed=11, classes=("normal", "low_grade"), foci=(("high_grade", 0.08),)
    )
    s = SyntheticSlide(Path("unused.svs"), spec, Path("unused.geojson"))
    assert s.class_names == ("normal", "low_grade", "high_grade")
    assert s.class_area_fractions()["high_grade"] == pytest.approx(0.08, abs=0.005)
    lm = s.label_map(4)
    frac = (lm == 3).sum() / (lm > 0).sum()
    assert frac == pytest.approx(0.08, abs=0.01)
    # compact: one blob
    from skimage.measure import label

    assert label(lm == 3).max() == 1


def test_classes_look_different() -> None:
    spec = SyntheticSlideSpec(4000, 3000, seed=4, class_weights=(1, 1, 1, 1), region_size_um=250)
    stats = {}
    for ds in (2, 4):  # ~0.5 and ~1.0 mpp
        img = render_region(spec, 0, 0, 4000 // ds, 3000 // ds, ds)
        lm = label_map(spec, ds)[: img.shape[0], : img.shape[1]]
        f = img.astype(np.float32)
        dark = f.mean(-1) < 130  # hematoxylin
        for i, name in enumerate(DEFAULT_CLASSES):
            sel = lm == i + 1
            assert sel.sum() > 2000, name
            stats[name, ds] = (dark[sel].mean(), f[sel].mean(0))
        d = {n: stats[n, ds][0] for n in DEFAULT_CLASSES}
        assert d["high_grade"] > 2 * d["low_grade"]
        assert d["high_grade"] > 2 * d["normal"]
        assert d["low_grade"] > 1.3 * d["necrosis"]
        colors = {n: stats[n, ds][1] for n in DEFAULT_CLASSES}
        for a in DEFAULT_CLASSES:
            for b in DEFAULT_CLASSES:
                if a < b:
                    dist = np.linalg.norm(colors[a] - colors[b]) + 300 * abs(d[a] - d[b])
                    assert dist > 10, (a, b, ds)


def label_map(spec: SyntheticSlideSpec, ds: float) -> np.ndarray:
    return SyntheticSlide(Path("x.svs"), spec, Path("x.geojson")).label_map(ds)


def test_unknown_class_and_cohort(tmp_path: Path) -> None:
    base = SyntheticSlideSpec(
        1024, 1024, classes=("normal", "oncocytic"), level_downsamples=(1, 4), seed=20
    )
    img = render_region(base, 0, 0, 256, 256, 4)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    slides = write_synthetic_cohort(tmp_path, 2, base, vary_class_weights=True, workers=1)
    assert [s.spec.seed for s in slides] == [20, 21]
    assert slides[0].spec.class_weights != slides[1].spec.class_weights
    assert all(s.path.exists() and s.truth_geojson.exists() for s in slides)
