"""The same tile, the same answer: TRIDENT's and CLAM's arithmetic re-read our tiles.

The readers below are written from the tools' documented behaviour (docs/conventions.md in
the shared notes), not their code:

- TRIDENT ignores ``patch_size_level0``: it reads ``patch_size * level0_magnification /
  target_magnification`` level-0 px, or ``patch_size`` px at the pyramid level whose
  downsample matches that ratio when the ratio is a power of two; then resizes.
- CLAM reads ``patch_size`` px at ``patch_level`` and resizes.

The slide is made to be awkward: a level downsample that is not an integer (2.0005 asked,
about 2.003 as readers compute it), a scanner objective power (60x) that agrees with neither
the file's mpp nor the override, and cases with ``--slide-mpp``.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

from histoduo.slide.sources import SlideSource
from histoduo.store import TileStore
from histoduo.tiling import TilingParams, tile_slides

FILE_MPP = 0.499  # a "20x" scan that is not exactly 0.5 um/px
SCANNER_POWER = 60.0  # disagrees with 10 / FILE_MPP on purpose


@pytest.fixture(scope="module")
def awkward_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(
        level0_width=1536,
        level0_height=1024,
        mpp=FILE_MPP,
        magnification=SCANNER_POWER,
        level_downsamples=(1, 2.0005),
        seed=41,
        tissue_coverage=0.6,
    )
    path = tmp_path_factory.mktemp("awkward") / "awk.svs"
    write_synthetic_slide(path, spec, workers=1)
    return path


def _resize(image: Image.Image, side: int) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BOX)
    return np.asarray(image)


def trident_footprint(attrs: dict) -> float:
    """Level-0 px TRIDENT covers per tile: its ratio of magnifications times patch_size."""
    ratio = float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    return float(attrs["patch_size"]) * ratio


def trident_level(wsi: openslide.OpenSlide, attrs: dict) -> int:
    """The level TRIDENT reads: the one matching a power-of-two ratio, else level 0."""
    ratio = float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    if ratio > 1 and abs(math.log2(ratio) - round(math.log2(ratio))) < 1e-9:
        level = min(range(wsi.level_count), key=lambda i: abs(wsi.level_downsamples[i] - ratio))
        if abs(wsi.level_downsamples[level] - ratio) / ratio < 0.01:
            return level
    return 0


def trident_read(wsi: openslide.OpenSlide, attrs: dict, xy, extra_px: int = 0) -> np.ndarray:  # noqa: ANN001
    patch = int(attrs["patch_size"])
    ratio = float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    level = trident_level(wsi, attrs)
    size = (patch if level else round(patch * ratio)) + extra_px  # px at that level
    return _resize(wsi.read_region(tuple(int(v) for v in xy), level, (size, size)), patch)


def _error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# (slide mpp override or None, target mpp, tile px, read level histoduo must choose)
SETTINGS = {
    # --slide-mpp 0.25 on a 0.499 file: TRIDENT must read 128 level-0 px, not 64
    "override_half": (0.25, 0.5, 64, 0),
    # 0.499 -> 0.5: almost native; a scanner-power ratio (60 / 20) would read 3x the area
    "near_native": (None, 0.5, 64, 0),
    # 0.499 -> 1.0: the level downsample ~2.003 is just finer than 2.004, read there
    "non_integer_level": (None, 1.0, 64, 1),
    # 0.499 -> 0.8: a non-integer scale read at level 0
    "non_integer_scale": (None, 0.8, 48, 0),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_trident_arithmetic_lands_on_the_stored_tiles(
    awkward_slide: Path, tmp_path: Path, name: str
) -> None:
    override, target_mpp, tile_px, level = SETTINGS[name]
    out = tmp_path / "t.h5"
    params = TilingParams(
        target_mpp=target_mpp, tile_size_px=tile_px, min_tissue_fraction=0.9, encoding="raw"
    )
    tile_slides([SlideSource(awkward_slide, mpp=override)], out, params, workers=1, progress=False)
    store = TileStore(out)
    record = store.record("awk")
    assert record.read_level == level
    assert record.scanner_magnification == pytest.approx(SCANNER_POWER)  # kept, ours only
    coords = store.coords("awk")
    picks = np.unique(np.linspace(0, len(coords) - 1, 5).astype(int))
    stored = store.read_tiles("awk", picks)
    trident_h5 = out.with_name("t.h5.d") / "trident" / "patches" / "awk_patches.h5"
    wsi = openslide.OpenSlide(str(awkward_slide))
    with h5py.File(trident_h5, "r") as f:
        attrs = dict(f["coords"].attrs)
        assert np.array_equal(f["coords"][()], coords)
    # The area TRIDENT computes is the area histoduo read, to within half a pixel of the
    # level it read (whole pixels there, as CLAM needs them).
    ours0 = record.read_side_px * record.read_level_downsample
    assert abs(trident_footprint(attrs) - ours0) <= 0.5 * record.read_level_downsample + 1e-6
    # Same level and area: only the resize filter's rounding (every tile); across levels:
    # the pyramid's level differs from a resize of level 0 by a few grey levels (on average).
    same_level = trident_level(wsi, attrs) == record.read_level
    tolerance = 1.0 if same_level else 10.0
    errors = [_error(t, trident_read(wsi, attrs, coords[i])) for t, i in zip(stored, picks)]
    assert (max(errors) if same_level else np.mean(errors)) < tolerance, errors
    if same_level:
        # The check can fail: a reader one level-0 pixel off is visibly off.
        off = [_error(t, trident_read(wsi, attrs, coords[i], 1)) for t, i in zip(stored, picks)]
        assert np.mean(off) > 2 * tolerance, off


@pytest.mark.parametrize("backend", ["openslide", "auto"])
def test_clam_reads_the_stored_tiles_on_the_awkward_slide(
    awkward_slide: Path, tmp_path: Path, backend: str
) -> None:
    """At a level whose downsample is not an integer a level-0 corner falls between level
    pixels: OpenSlide (CLAM's reader) interpolates there, tiffslide (``auto``'s tile reader)
    takes the pixel it falls in. Tiled through OpenSlide, CLAM re-reads the very pixels;
    through tiffslide, within that sub-pixel resampling noise."""
    out = tmp_path / "t.h5"
    params = TilingParams(target_mpp=1.0, tile_size_px=64, min_tissue_fraction=0.9, encoding="raw")
    tile_slides(
        [SlideSource(awkward_slide)], out, params, workers=1, progress=False, backend=backend
    )
    store = TileStore(out)
    coords = store.coords("awk")
    picks = np.unique(np.linspace(0, len(coords) - 1, 5).astype(int))
    stored = store.read_tiles("awk", picks)
    wsi = openslide.OpenSlide(str(awkward_slide))
    with h5py.File(out.with_name("t.h5.d") / "clam" / "patches" / "awk.h5", "r") as f:
        level = int(f["coords"].attrs["patch_level"])
        size = int(f["coords"].attrs["patch_size"])
    assert level == 1

    def clam(xy, extra: int = 0) -> np.ndarray:  # noqa: ANN001
        region = wsi.read_region(tuple(int(v) for v in xy), level, (size + extra, size + extra))
        return _resize(region, 64)

    errors = [_error(t, clam(coords[i])) for t, i in zip(stored, picks)]
    if backend == "openslide":
        assert max(errors) < 1.0, errors
        # the check can fail: one level pixel more is visibly off
        off = [_error(t, clam(coords[i], 1)) for t, i in zip(stored, picks)]
        assert np.mean(off) > 2.0, off
    else:
        assert np.mean(errors) < 10.0, errors


def test_legacy_clam_stitching_reads_the_imgs_attributes(
    awkward_slide: Path, tmp_path: Path
) -> None:
    """CLAM's older stitcher reads ``imgs`` attributes (``level_dim`` & co.) and pastes each
    tile at ``coords / downsample``; the mosaic must match the slide at that downsample."""
    out = tmp_path / "t.h5"
    params = TilingParams(target_mpp=1.0, tile_size_px=64, min_tissue_fraction=0.5, encoding="raw")
    tile_slides([SlideSource(awkward_slide)], out, params, workers=1, progress=False)
    with h5py.File(out.with_name("t.h5.d") / "clam" / "patches" / "awk.h5", "r") as f:
        imgs = f["imgs"]
        a = imgs.attrs
        assert a["wsi_name"] == "awk" and int(a["patch_level"]) == 1
        width, height = (int(v) for v in a["level_dim"])
        assert list(a["downsampled_level_dim"]) == [width, height]
        ds = float(np.ravel(a["downsample"])[0])
        coords = f["coords"][()]
        tiles = imgs[()]
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    placed = []
    for (x, y), tile in zip(coords, tiles):
        px, py = int(x / ds), int(y / ds)
        h, w = canvas[py : py + 64, px : px + 64].shape[:2]
        canvas[py : py + h, px : px + w] = tile[:h, :w]
        placed.append((px, py, w, h))
    wsi = openslide.OpenSlide(str(awkward_slide))
    level0 = np.asarray(wsi.read_region((0, 0), 0, wsi.dimensions).convert("RGB"))
    reference = np.asarray(Image.fromarray(level0).resize((width, height), Image.Resampling.BOX))
    errors = [
        _error(canvas[py : py + h, px : px + w], reference[py : py + h, px : px + w])
        for px, py, w, h in placed
    ]
    assert np.mean(errors) < 10.0
    # the check can fail: a mosaic three pixels off is visibly off
    shifted = [
        _error(tile[:h, :w], reference[py + 3 : py + 3 + h, px + 3 : px + 3 + w])
        for tile, (px, py, w, h) in zip(tiles, placed)
        if py + 3 + h <= height and px + 3 + w <= width
    ]
    assert np.mean(shifted) > np.mean(errors) + 2.0


def test_a_slide_and_its_raw_store_give_the_same_tiles_and_probabilities(
    awkward_slide: Path, tmp_path: Path
) -> None:
    """One tile reader: ``predict`` on the slide reads the tiles ``tile`` stored, on a pyramid
    whose level 1 (downsample ~2.003) is where 1.0 um/px tiles are read from."""
    from histoduo.predict import PredictParams, predict_run
    from histoduo.results.scores import SlideScores
    from histoduo.slide import open_slide
    from histoduo.tiling import TileGeometry
    from histoduo.tiling.read import read_tile
    from tests.test_predict import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "tiny.pt", target_mpp=1.0)  # 64 px at 1.0 um/px
    predict = PredictParams(workers=0, heatmap=False, thumbnail_max_px=256, min_tissue_fraction=0.9)
    store = tmp_path / "tiles.h5"
    tiling = TilingParams(
        target_mpp=1.0,
        tile_size_px=64,
        min_tissue_fraction=predict.min_tissue_fraction,
        tissue=predict.tissue,
        encoding="raw",
    )
    tile_slides([SlideSource(awkward_slide)], store, tiling, workers=0, progress=False)
    with TileStore(store) as tiles:
        record = tiles.record("awk")
        stored = tiles.read_tiles("awk", np.arange(tiles.num_tiles("awk")))
        coords = tiles.coords("awk")
    assert record.read_level == 1 and record.read_level_downsample != 2.0

    with open_slide(awkward_slide) as slide:  # what predict's slide path reads
        geometry = TileGeometry.for_slide(slide, tiling)
        direct = np.stack(
            [read_tile(slide, xy, geometry.read_level, geometry.read_size_px, 64) for xy in coords]
        )
    assert np.array_equal(direct, stored)

    from_slide = predict_run(
        checkpoint, tmp_path / "a", predict, sources=[SlideSource(awkward_slide)]
    )
    from_store = predict_run(checkpoint, tmp_path / "b", predict, tiles_store=store)
    assert [o.status for o in from_slide.outcomes + from_store.outcomes] == ["done", "done"]
    a = SlideScores.load(tmp_path / "a" / "awk" / "scores.npz")
    b = SlideScores.load(tmp_path / "b" / "awk" / "scores.npz")
    assert np.array_equal(a.coords, b.coords)
    # the same input tensors in the same batches: bit for bit the same outputs (an untrained
    # model is near-uniform, so anything looser could not see a different read)
    assert np.array_equal(a.probs, b.probs)
    assert float(np.ptp(a.probs, axis=0).max()) > 0  # the outputs do depend on the tile
