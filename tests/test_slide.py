"""The reader interface: backends agree, mpp resolves as the field expects, bad files fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histoduo.slide import (
    SlideError,
    mpp_from_properties,
    open_slide,
)


def test_openslide_and_tiffslide_agree_on_svs(svs_slide) -> None:
    with open_slide(svs_slide.path, "openslide") as a, open_slide(svs_slide.path, "tiffslide") as b:
        assert a.level_dimensions == b.level_dimensions
        assert a.mpp == pytest.approx(b.mpp) == pytest.approx(0.25)
        for level in range(a.level_count):
            x = a.read_region((256, 512), level, (128, 96))
            y = b.read_region((256, 512), level, (128, 96))
            assert x.shape == y.shape == (96, 128, 3)
            assert x.dtype == y.dtype == np.uint8
            # Same JPEG bytes, different decoders: allow decoder rounding only.
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 2


def test_readers_agree_on_real_slide(real_slide: Path) -> None:
    with open_slide(real_slide, "openslide") as a, open_slide(real_slide, "tiffslide") as b:
        assert a.mpp == pytest.approx(0.499)
        assert a.magnification == pytest.approx(20.0)
        assert a.vendor == b.vendor == "aperio"
        assert set(a.info().associated_images) >= {"label", "macro", "thumbnail"}
        x = a.read_region((700, 900), 0, (256, 256)).astype(int)
        y = b.read_region((700, 900), 0, (256, 256)).astype(int)
        assert np.abs(x - y).max() <= 2


def test_auto_backend_picks_tiffslide_for_jpeg_svs_and_openslide_for_tiff(
    svs_slide, tiff_slide
) -> None:
    with open_slide(svs_slide.path) as slide:
        assert slide.backend == "tiffslide"
    with open_slide(tiff_slide.path) as slide:
        assert slide.backend == "openslide"
        assert slide.level_dimensions == list(tiff_slide.spec.level_dimensions())
        assert slide.level_count >= 2
        assert slide.mpp == pytest.approx(0.25)
        assert slide.mpp_source in ("openslide.mpp-x", "tiff.XResolution")


def test_outside_the_image_reads_white(svs_slide) -> None:
    with open_slide(svs_slide.path) as slide:
        width, height = slide.dimensions
        region = slide.read_region((width - 10, height - 10), 0, (40, 40))
        assert region.shape == (40, 40, 3)
        assert (region[15:, :] == 255).all() and (region[:, 15:] == 255).all()
        inside = slide.read_region((width - 10, height - 10), 0, (10, 10))
        assert np.array_equal(region[:10, :10], inside)


def test_read_resized_uses_the_finer_level(svs_slide) -> None:
    with open_slide(svs_slide.path) as slide:
        # 1024 level-0 px to 128 px is a downsample of 8: read level 1 (/4), then halve.
        tile = slide.read_resized((1024, 512), (1024, 1024), (128, 128))
        direct = slide.read_region((1024, 512), 1, (256, 256))
        expected = np.asarray(Image.fromarray(direct).reduce(2))
        assert np.array_equal(tile, expected)


@pytest.mark.parametrize(
    ("properties", "expected", "source"),
    [
        ({"openslide.mpp-x": "0.2527", "aperio.MPP": "0.3"}, 0.2527, "openslide.mpp-x"),
        ({"aperio.MPP": "0.499"}, 0.499, "aperio.MPP"),
        ({"openslide.mirax.MPP": "0.24"}, 0.24, "openslide.mirax.MPP"),
        ({"hamamatsu.XResolution": "40000"}, 0.25, "hamamatsu.XResolution"),
        (
            {"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"},
            0.5,
            "tiff.XResolution",
        ),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, 0.5, "tiff.XResolution"),
        ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"}, None, ""),
        ({"openslide.mpp-x": "0", "aperio.MPP": "nan"}, None, ""),
        ({}, None, ""),
    ],
)
def test_mpp_resolution_order(properties, expected, source) -> None:
    mpp, found = mpp_from_properties(properties)
    assert found == source
    if expected is None:
        assert mpp is None
    else:
        assert mpp == pytest.approx(expected)


def test_missing_mpp_says_how_to_fix_it(no_mpp_slide) -> None:
    with open_slide(no_mpp_slide.path) as slide:
        assert slide.mpp is None
        with pytest.raises(SlideError, match="--slide-mpp") as err:
            slide.require_mpp()
        assert str(no_mpp_slide.path) in str(err.value)
    with open_slide(no_mpp_slide.path, mpp_override=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "override"


def test_plain_png_opens_with_an_override(tmp_path: Path) -> None:
    image = np.zeros((100, 150, 3), dtype=np.uint8)
    image[10:20, 30:40] = (200, 100, 50)
    path = tmp_path / "patch.png"
    Image.fromarray(image).save(path)
    with open_slide(path, mpp_override=0.5) as slide:
        assert slide.backend == "image"
        assert slide.dimensions == (150, 100)
        assert np.array_equal(slide.read_region((30, 10), 0, (10, 10)), image[10:20, 30:40])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found") as err:
        open_slide(tmp_path / "nope.svs")
    assert "nope.svs" in str(err.value)


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_corrupt_file_fails_with_its_name(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "broken.svs"
    path.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(SlideError) as err:
        open_slide(path, backend)
    assert "broken.svs" in str(err.value)


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "notes.tiff"
    path.write_text("plain text")
    with pytest.raises(SlideError, match="notes.tiff"):
        open_slide(path)


def test_truncated_slide_fails_clearly(svs_slide, tmp_path: Path) -> None:
    data = svs_slide.path.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError) as err:
        with open_slide(path) as slide:
            # Opening may succeed (the header is intact); reading the missing tiles must not.
            for level in range(slide.level_count):
                w, h = slide.level_dimensions[level]
                slide.read_region((0, 0), level, (w, h))
    assert "truncated.svs" in str(err.value)


def test_multichannel_fluorescence_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fluo.tiff"
    data = np.random.default_rng(0).integers(0, 4000, (5, 256, 256), dtype=np.uint16)
    tifffile.imwrite(path, data, photometric="minisblack", tile=(128, 128))
    with pytest.raises(SlideError, match="fluo.tiff") as err:
        open_slide(path)
    assert "RGB" in str(err.value)
