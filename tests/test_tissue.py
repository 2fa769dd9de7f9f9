"""Tissue detection: synthetic pyramidal slides, the real CMU-1 sample, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histoduo.runtime.exitcodes import EXIT_SOME_FAILED
from histoduo.slide import SlideError, open_slide
from histoduo.slide.geojson import polygon_feature, read_annotations, write_feature_collection
from histoduo.tissue import (
    NoTissueError,
    TissueMask,
    TissueParams,
    detect_tissue,
    require_tissue,
    save_tissue_outputs,
    tissue_contours,
)

CMU_SMALL = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"
)
BACKGROUND = (243, 241, 246)  # slightly bluish-white glass, as scanners give it
BLOB_SPECS = [  # (centre x, centre y, radius x, radius y, colour), level-0 px
    (600, 500, 360, 260, (226, 150, 190)),  # eosin-pink
    (1500, 1000, 300, 380, (150, 90, 170)),  # hematoxylin-purple
    (420, 1250, 150, 120, (200, 120, 180)),  # a small core fragment (~0.014 mm^2 at 0.5 um)
]


def synthetic_rgb(
    width: int = 2048, height: int = 1536, seed: int = 0, blobs: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image of stained ellipses on glass with noise, level-0 ground-truth mask)."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = BACKGROUND
    truth = np.zeros((height, width), dtype=bool)
    if blobs:
        yy, xx = np.mgrid[0:height, 0:width]
        for cx, cy, rx, ry, colour in BLOB_SPECS:
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
            image[inside] = colour
            truth |= inside
    # Texture inside tissue, faint noise on glass.
    image += rng.normal(0, 4, size=image.shape) + truth[..., None] * rng.normal(
        0, 14, size=image.shape
    )
    return np.clip(image, 0, 255).astype(np.uint8), truth


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float, levels: int = 3) -> Path:
    """A tiled TIFF with levels as separate pages and resolution tags (OpenSlide reads it)."""
    import tifffile
    from PIL import Image

    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            factor = 2**level
            image = rgb
            if factor > 1:
                size = (rgb.shape[1] // factor, rgb.shape[0] // factor)
                image = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
            res = 1e4 / (mpp * factor)
            tif.write(
                image,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    return path


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rgb, truth = synthetic_rgb()
    path = write_pyramid_tiff(tmp_path_factory.mktemp("slide") / "synth.tiff", rgb, mpp=0.5)
    return path, truth


def _truth_at(truth: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Ground truth resampled (area-average >= 0.5) onto a mask grid."""
    from PIL import Image

    image = Image.fromarray(truth.astype(np.uint8) * 255)
    small = np.asarray(image.resize((shape_hw[1], shape_hw[0]), Image.Resampling.BOX))
    return small >= 128


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_detects_synthetic_blobs(synthetic_slide: tuple[Path, np.ndarray], backend: str) -> None:
    path, truth = synthetic_slide
    with open_slide(path, backend=backend) as slide:
        assert slide.mpp == pytest.approx(0.5)
        mask = detect_tissue(slide)
    assert mask.downsample == pytest.approx(8.0)
    assert mask.mask.dtype == bool and mask.mask.shape == mask.thumbnail.shape[:2]
    assert _iou(mask.mask, _truth_at(truth, mask.shape)) >= 0.93
    # The small fragment (biopsy-sized) survives the speck filter.
    assert mask.mask[1250 // 8, 420 // 8]
    expected_mm2 = truth.sum() * 0.5**2 / 1e6
    assert mask.area_mm2() == pytest.approx(expected_mm2, rel=0.08)
    assert mask.fraction_in_box(0, 0, 2048, 1536) == pytest.approx(mask.mask.mean())


def test_specks_removed_and_holes_filled() -> None:
    from histoduo.tissue import detect_tissue_array

    rgb, _ = synthetic_rgb(512, 512, blobs=False)
    rgb[100:300, 100:300] = (200, 110, 170)  # a 200 px square of tissue at 4 um/px
    rgb[180:186, 180:186] = BACKGROUND  # a small hole (576 um^2)
    rgb[400:403, 400:403] = (200, 110, 170)  # a speck (144 um^2)
    mask, threshold = detect_tissue_array(rgb, mask_mpp=4.0)
    assert 0.05 <= threshold < 0.4
    assert mask[183, 183], "small hole should be filled"
    assert not mask[401, 401], "speck should be removed"
    assert mask[100:300, 100:300].mean() > 0.98 and mask.sum() < 205 * 205


def test_blank_slide_raises_no_tissue(tmp_path: Path) -> None:
    rgb, _ = synthetic_rgb(1024, 768, blobs=False)
    path = write_pyramid_tiff(tmp_path / "blank.tiff", rgb, mpp=0.5)
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
    assert not mask.mask.any()
    with pytest.raises(NoTissueError) as info:
        require_tissue(mask, path)
    message = str(info.value)
    assert "blank.tiff" in message and "no tissue found" in message
    assert "threshold" in message and "--" in message
    assert isinstance(info.value, SlideError)


def test_no_mpp_is_a_clear_slide_error(tmp_path: Path) -> None:
    from PIL import Image

    rgb, _ = synthetic_rgb(512, 384)
    path = tmp_path / "nompp.png"
    Image.fromarray(rgb).save(path)
    with open_slide(path) as slide, pytest.raises(SlideError, match="nompp.png.*--slide-mpp"):
        detect_tissue(slide)
    with open_slide(path, mpp_override=2.0) as slide:
        mask = detect_tissue(slide)
    assert mask.downsample == pytest.approx(2.0) and mask.mask.any()


def test_roi_intersect_and_replace(synthetic_slide: tuple[Path, np.ndarray]) -> None:
    path, _ = synthetic_slide
    # Left half of the slide, as a QuPath polygon in level-0 px.
    left = (np.array([[0, 0], [1024, 0], [1024, 1536], [0, 1536]], dtype=float), [])
    with open_slide(path) as slide:
        full = detect_tissue(slide)
        inter = detect_tissue(slide, roi=[left], roi_mode="intersect")
        replaced = detect_tissue(slide, roi=[left], roi_mode="replace")
        with pytest.raises(ValueError, match="roi_mode"):
            detect_tissue(slide, roi=[left], roi_mode="union")
    half = full.shape[1] // 2
    assert inter.mask[:, half:].sum() == 0
    assert np.array_equal(inter.mask[:, :half], full.mask[:, :half])
    assert replaced.mask[:, :half].all() and not replaced.mask[:, half:].any()
    with pytest.raises(NoTissueError):
        require_tissue(detect_tissue(open_slide(path), roi=[], roi_mode="replace"), path)


def test_pen_ink_excluded(tmp_path: Path) -> None:
    rgb, _ = synthetic_rgb(2048, 1536)
    # A blue marker stroke across glass and into the pink blob; a green dot on glass.
    rgb[1300:1360, 900:2000] = (40, 70, 190)
    rgb[560:600, 500:1100] = (40, 70, 190)
    rgb[200:320, 1700:1820] = (40, 150, 70)
    path = write_pyramid_tiff(tmp_path / "pen.tiff", rgb, mpp=0.5)
    with open_slide(path) as slide:
        keep = detect_tissue(slide, TissueParams(exclude_pen=False))
        drop = detect_tissue(slide, TissueParams(exclude_pen=True))
    stroke_on_glass = (slice(1300 // 8, 1360 // 8), slice(1850 // 8, 2000 // 8))
    assert keep.mask[stroke_on_glass].mean() > 0.9  # ink is coloured: plain detection takes it
    assert drop.mask[stroke_on_glass].mean() == 0.0
    assert drop.mask[200 // 8 : 320 // 8, 1700 // 8 : 1820 // 8].mean() == 0.0
    assert drop.mask[570 // 8, 800 // 8] == 0  # ink over tissue is dropped too
    assert drop.mask[400 // 8, 600 // 8] and drop.mask[1000 // 8, 1500 // 8]  # tissue kept


def _brute_force_fraction(mask: np.ndarray, ds: int, x0: int, y0: int, w: int, h: int) -> float:
    """Coverage by expanding every mask pixel to ds x ds level-0 pixels (integer ds)."""
    big = np.kron(mask.astype(np.int64), np.ones((ds, ds), dtype=np.int64))
    big = np.pad(big, ((200, 200), (200, 200)))  # outside the slide = background
    return big[y0 + 200 : y0 + 200 + h, x0 + 200 : x0 + 200 + w].sum() / (w * h)


def test_fractions_in_boxes_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    small = rng.random((30, 40)) > 0.55
    tm = TissueMask(small, 4.0, np.zeros((30, 40, 3), np.uint8), 0.5)
    for size in (3, 7, 16, 37, 90):
        xy = rng.integers(-60, 180, size=(40, 2))
        got = tm.fractions_in_boxes(xy, size)
        want = [_brute_force_fraction(small, 4, x, y, size, size) for x, y in xy]
        np.testing.assert_allclose(got, want, atol=1e-9)
    got = tm.fractions_in_boxes(np.array([[5, 9]]), (21, 13))
    assert got[0] == pytest.approx(_brute_force_fraction(small, 4, 5, 9, 21, 13))
    assert tm.fraction_in_box(0, 0, 160, 120) == pytest.approx(small.mean())
    assert tm.area_mm2() == pytest.approx(small.sum() * 2.0**2 / 1e6)


def test_outputs_and_contours(synthetic_slide: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    from PIL import Image

    from histoduo.slide.geojson import rasterize

    path, _ = synthetic_slide
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
    paths = save_tissue_outputs(mask, tmp_path / "out", "synth")
    assert {p.name for p in paths.values()} == {
        "synth_mask.png",
        "synth_overlay.png",
        "synth_tissue.geojson",
    }
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    png = np.asarray(Image.open(paths["mask"]))
    assert np.array_equal(png > 0, mask.mask)
    assert np.asarray(Image.open(paths["overlay"])).shape == mask.thumbnail.shape
    annotations = read_annotations(paths["geojson"])
    assert len(annotations) == len(tissue_contours(mask)) == 3
    assert {a.class_name for a in annotations} == {"Tissue"}
    assert all(a.object_type == "annotation" for a in annotations)
    assert all(a.properties["measurements"]["area_um2"] > 5000 for a in annotations)
    redrawn = rasterize(annotations, mask.shape, mask.downsample) > 0
    assert _iou(redrawn, mask.mask) > 0.97


def test_real_slide_cmu_small_region(tmp_path: Path) -> None:
    if not CMU_SMALL.exists():
        pytest.skip(f"sample slide not present at {CMU_SMALL}")
    with open_slide(CMU_SMALL) as slide:
        width0, height0 = slide.dimensions
        mask = detect_tissue(slide)
    tissue = mask.mask
    assert 0.15 < tissue.mean() < 0.7
    brightness = mask.thumbnail.mean(axis=2)
    assert brightness[tissue].mean() < brightness[~tissue].mean() - 50
    corner = 8
    for rows, cols in [
        (slice(0, corner), slice(0, corner)),
        (slice(0, corner), slice(-corner, None)),
    ]:
        assert not tissue[rows, cols].any()
    paths = save_tissue_outputs(mask, tmp_path, "CMU-1-Small-Region")
    for annotation in read_annotations(paths["geojson"]):
        for exterior, _holes in annotation.geometry:
            assert exterior[:, 0].min() >= 0 and exterior[:, 0].max() <= width0
            assert exterior[:, 1].min() >= 0 and exterior[:, 1].max() <= height0


def test_matches_synthetic_module(tmp_path: Path) -> None:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    synthetic = write_synthetic_slide(
        tmp_path / "synthetic.tiff",
        SyntheticSlideSpec(level0_width=4096, level0_height=3072, mpp=0.25, seed=1),
    )
    path = getattr(synthetic, "path", tmp_path / "synthetic.tiff")
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
    truth = np.asarray(synthetic.tissue_mask(mask.downsample), dtype=bool)
    assert truth.shape == mask.shape
    assert _iou(mask.mask, truth) >= 0.9


# --- CLI ----------------------------------------------------------------------------------
def _text(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture()
def cli_app():  # noqa: ANN201 - typer app
    from histoduo.cli import app

    return app


def test_cli_writes_outputs(
    cli_app: object, synthetic_slide: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    path, _ = synthetic_slide
    roi = tmp_path / "roi.geojson"
    box = (np.array([[0, 0], [1024, 0], [1024, 1536], [0, 1536]], dtype=float), [])
    write_feature_collection(roi, [polygon_feature([box], class_name="Region")])
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(
        cli_app, ["tissue", str(path), "--out", str(tmp_path / "o"), "--roi", str(roi)]
    )
    assert result.exit_code == 0, result.output
    for suffix in ("_mask.png", "_overlay.png", "_tissue.geojson"):
        assert (tmp_path / "o" / f"synth{suffix}").exists()
    assert "synth" in result.output
    data = json.loads((tmp_path / "o" / "synth_tissue.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2


def test_cli_errors(cli_app: object, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    runner = CliRunner(env={"COLUMNS": "200"})
    missing = tmp_path / "nowhere.svs"
    result = runner.invoke(cli_app, ["tissue", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "nowhere.svs" in _text(result.output)

    rgb, _ = synthetic_rgb(512, 384, blobs=False)
    blank = write_pyramid_tiff(tmp_path / "blank.tiff", rgb, mpp=0.5, levels=1)
    result = runner.invoke(cli_app, ["tissue", str(blank), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "no tissue found" in _text(result.output)
    result = runner.invoke(
        cli_app, ["tissue", str(blank), "--out", str(tmp_path / "o"), "--skip-errors"]
    )
    assert result.exit_code == EXIT_SOME_FAILED and "no tissue" in _text(result.output)
    assert not (tmp_path / "o" / "blank_mask.png").exists()

    bad_roi = tmp_path / "bad.geojson"
    bad_roi.write_text("{not json")
    result = runner.invoke(
        cli_app, ["tissue", str(blank), "--out", str(tmp_path / "o"), "--roi", str(bad_roi)]
    )
    assert result.exit_code != 0 and "bad.geojson" in _text(result.output)


def test_outline_stays_within_slide_bounds(tmp_path: Path) -> None:
    # 1020 x 763 px at 0.5 um with a 8 um mask: 63.75 x 47.7 mask px round up to 64 x 48, so
    # outlines scaled by the nominal 16 px per mask px used to reach x=1024, y=768.
    width0, height0 = 1020, 763
    rgb = np.full((height0, width0, 3), BACKGROUND, dtype=np.uint8)
    rgb[:, width0 // 3 :] = (170, 90, 150)  # tissue up to the right and bottom edges
    path = write_pyramid_tiff(tmp_path / "edge.tiff", rgb, mpp=0.5, levels=1)
    with open_slide(path) as slide:
        mask = detect_tissue(slide, TissueParams(mask_mpp=8.0))
    assert mask.mask.shape == (48, 64)
    paths = save_tissue_outputs(mask, tmp_path, "edge")
    points = np.concatenate(
        [ring for a in read_annotations(paths["geojson"]) for ext, holes in a.geometry
         for ring in [ext, *holes]]
    )  # fmt: skip
    assert points[:, 0].min() >= 0 and points[:, 1].min() >= 0
    assert points[:, 0].max() == width0 and points[:, 1].max() == height0  # reaches, not past


def test_cli_takes_a_slide_csv_and_shards(cli_app: object, tmp_path: Path) -> None:
    """tissue reads slides as tile does: a slide CSV (with per-slide mpp) and --shard K/N."""
    from typer.testing import CliRunner

    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    names = ["csv_a", "csv_b", "csv_c"]
    for i, name in enumerate(names):
        spec = SyntheticSlideSpec(level0_width=1024, level0_height=768, mpp=0.5, seed=30 + i)
        write_synthetic_slide(tmp_path / f"{name}.svs", spec, workers=1)
    table = tmp_path / "slides.csv"
    table.write_text("path,mpp\n" + "".join(f"{n}.svs,0.5\n" for n in names))
    runner = CliRunner(env={"COLUMNS": "200"})
    seen: list[str] = []
    for k in (1, 2):
        out = tmp_path / f"o{k}"
        result = runner.invoke(
            cli_app, ["tissue", str(table), "--out", str(out), "--shard", f"{k}/2"]
        )
        assert result.exit_code == 0, result.output
        seen += sorted(p.name.removesuffix("_tissue.geojson") for p in out.glob("*_tissue.geojson"))
    assert sorted(seen) == names  # every slide in exactly one shard
