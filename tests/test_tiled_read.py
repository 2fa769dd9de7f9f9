"""The direct tiled-TIFF reader (slide/tiled.py) gives tiffslide's pixels, at every level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoduo.slide import open_slide
from histoduo.slide.tiled import TiledLevel


def _same_as_tiffslide(path: Path, n_regions: int = 30) -> int:
    """Reads random in-bounds regions at every level both ways; returns how many were read."""
    import tiffslide

    rng = np.random.default_rng(0)
    read = 0
    with open_slide(path, "tiffslide") as slide, tiffslide.TiffSlide(str(path)) as reference:
        for level in range(slide.level_count):
            width, height = slide.level_dimensions[level]
            downsample = slide.level_downsamples[level]
            for _ in range(n_regions):
                w = int(rng.integers(1, min(width, 700) + 1))
                h = int(rng.integers(1, min(height, 700) + 1))
                lx, ly = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                location = (int(lx * downsample), int(ly * downsample))
                ours = slide.read_region(location, level, (w, h))
                theirs = reference.read_region(location, level, (w, h), as_array=True)[..., :3]
                assert np.array_equal(ours, theirs), (path.name, level, location, (w, h))
                read += 1
            # The whole level at once crosses every tile edge, the partial last ones included.
            whole = slide.read_region((0, 0), level, (width, height))
            assert np.array_equal(
                whole, reference.read_region((0, 0), level, (width, height), as_array=True)
            )
    return read


def test_svs_levels_use_the_direct_reader_and_match_tiffslide(svs_slide) -> None:
    with open_slide(svs_slide.path, "tiffslide") as slide:
        levels = slide.level_count
        assert levels >= 2
        assert all(slide._tiled_level(level) is not None for level in range(levels))
    assert _same_as_tiffslide(svs_slide.path) == 30 * levels


def test_odd_sized_slide_matches_tiffslide(synth_dir: Path) -> None:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(level0_width=1001, level0_height=777, seed=5)
    slide = write_synthetic_slide(synth_dir / "odd.svs", spec, workers=1)
    with open_slide(slide.path, "tiffslide") as opened:
        assert opened._tiled_level(0) is not None
    _same_as_tiffslide(slide.path)


def test_generic_tiff_matches_tiffslide(tiff_slide) -> None:
    _same_as_tiffslide(tiff_slide.path, n_regions=10)


def test_real_aperio_slide_matches_tiffslide(real_slide: Path) -> None:
    with open_slide(real_slide, "tiffslide") as slide:
        assert slide._tiled_level(0) is not None  # JPEG tiles with shared tables
    _same_as_tiffslide(real_slide, n_regions=20)


def test_a_tile_never_written_reads_as_the_fill_value(svs_slide) -> None:
    import tifffile

    with tifffile.TiffFile(svs_slide.path) as tif:
        level = TiledLevel.for_level(tif, 0, 0)
        assert level is not None
        counts = list(level._page.databytecounts)
        counts[1] = 0  # the second tile of the first row, as a sparse writer leaves it
        level._page.databytecounts = tuple(counts)
        area = level.read(level.tile_w - 8, 0, 16, 4)
    assert np.all(area[:, 8:] == 0)  # tifffile's fill for absent tiles (nodata 0)
    assert area[:, :8].any()


def test_a_region_outside_the_level_is_refused(svs_slide) -> None:
    import tifffile

    with tifffile.TiffFile(svs_slide.path) as tif:
        level = TiledLevel.for_level(tif, 0, 0)
        assert level is not None
        with pytest.raises(ValueError, match="outside"):
            level.read(level.width - 4, 0, 8, 8)


def test_threads_sharing_a_slide_read_the_same_pixels(svs_slide) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    with open_slide(svs_slide.path, "tiffslide") as slide:
        width, height = slide.level_dimensions[0]
        spots = [(int(rng.integers(0, width - 300)), int(rng.integers(0, height - 300)))
                 for _ in range(64)]  # fmt: skip
        alone = [slide.read_region(xy, 0, (300, 300)) for xy in spots]
        with ThreadPoolExecutor(4) as threads:
            together = list(threads.map(lambda xy: slide.read_region(xy, 0, (300, 300)), spots))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
