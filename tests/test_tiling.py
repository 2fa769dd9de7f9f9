"""Tiling into the HDF5 store: exact pixels, field-compatible attributes, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.slide import SlideError, open_slide
from histoduo.slide.sources import SlideSource, collect_sources, parse_shard, select_shard
from histoduo.store import (
    SlideGroupData,
    SlidePartWriter,
    StoreError,
    TileStore,
    merge_stores,
    write_index,
)
from histoduo.tiling import TilingParams, tile_grid, tile_slides

PARAMS = TilingParams(target_mpp=1.0, tile_size_px=64, min_tissue_fraction=0.25)


def _tile(sources, out: Path, params: TilingParams = PARAMS, **kwargs):  # noqa: ANN202
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return tile_slides(sources, out, params, **kwargs)


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split()).replace("/ ", "/")


def test_tile_grid_is_aligned_and_inside() -> None:
    grid = tile_grid(1000, 600, 256, 256)
    assert grid.dtype == np.int64 and grid.shape[1] == 2
    assert set(grid[:, 0]) == {0, 256, 512} and set(grid[:, 1]) == {0, 256}
    assert (grid[:, 0] + 256 <= 1000).all() and (grid[:, 1] + 256 <= 600).all()
    assert len(tile_grid(100, 100, 256, 256)) == 0


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_store_tiles_equal_read_region_and_resize(svs_slide, tmp_path: Path, encoding) -> None:
    out = tmp_path / "tiles.h5"
    params = TilingParams(target_mpp=1.0, tile_size_px=64, encoding=encoding)
    report = _tile([SlideSource(svs_slide.path)], out, params, workers=2)
    assert [r.status for r in report.results] == ["done"]
    with TileStore(out) as store, open_slide(svs_slide.path) as slide:
        name = store.slides[0]
        coords = store.coords(name)
        assert len(coords) == report.results[0].n_tiles > 10
        picks = np.linspace(0, len(coords) - 1, 6).astype(int)
        tiles = store.read_tiles(name, picks[::-1])[::-1]  # unordered indices work too
        for tile, (x, y) in zip(tiles, coords[picks]):
            # 64 px at 1.0 um/px = 256 level-0 px at 0.25 um/px.
            expected = slide.read_region((int(x), int(y)), 1, (64, 64))
            if encoding == "raw":
                assert np.array_equal(tile, expected)
            else:
                assert np.abs(tile.astype(int) - expected.astype(int)).mean() < 4


def test_tissue_fraction_and_threshold(svs_slide, tmp_path: Path) -> None:
    out = tmp_path / "t.h5"
    strict = TilingParams(target_mpp=1.0, tile_size_px=64, min_tissue_fraction=0.9)
    loose = TilingParams(target_mpp=1.0, tile_size_px=64, min_tissue_fraction=0.1)
    _tile([SlideSource(svs_slide.path)], out, strict)
    with TileStore(out) as store:
        strict_fr = store.tissue_fraction(store.slides[0])
    _tile([SlideSource(svs_slide.path)], out, loose)
    with TileStore(out) as store:
        loose_fr = store.tissue_fraction(store.slides[0])
    assert strict_fr.min() >= 0.9 and loose_fr.min() >= 0.1
    assert len(loose_fr) > len(strict_fr)


def test_plain_h5py_sees_trident_and_clam_attributes(svs_slide, tmp_path: Path) -> None:
    out = tmp_path / "t.h5"
    params = TilingParams(target_mpp=0.5, tile_size_px=64, stride_px=48)
    _tile([SlideSource(svs_slide.path)], out, params)
    with h5py.File(tmp_path / "t.h5.d/trident/patches/svs_a_patches.h5", "r") as f:
        a = f["coords"].attrs  # TRIDENT's meaning: patch_size at the target
        assert f["coords"].dtype == np.int64 and list(f) == ["coords"]
        assert a["patch_size"] == 64
        assert a["patch_size_level0"] == 128  # 64 px at 0.5 um/px over 0.25 um/px
        assert a["level0_magnification"] == pytest.approx(40)
        assert a["target_magnification"] == pytest.approx(20)
        assert a["overlap"] == 16
        assert a["name"] == "svs_a"
        assert (a["level0_width"], a["level0_height"]) == (3072, 2048)
        trident_coords = f["coords"][()]
    with h5py.File(out, "r") as f:  # the index: HDF5 follows its links into the slide files
        assert f.attrs["format"] == "histoduo-tilestore" and f.attrs["format_version"] == 2
        group = f["slides/svs_a"]
        assert bool(group.attrs["complete"])
        coords = group["coords"]
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert np.array_equal(coords[()], trident_coords)
        a = coords.attrs  # CLAM's meaning: read patch_size px at patch_level
        assert a["patch_size"] == 128 and a["patch_level"] == 0
        assert "patch_size_level0" not in a  # TRIDENT names stay out of the CLAM file
        assert a["name"] == "svs_a"
        assert list(a["downsample"]) == [1.0, 1.0]
        assert list(a["level_dim"]) == [3072, 2048]
        assert list(a["downsampled_level_dim"]) == [3072, 2048]
        steps = np.diff(np.unique(coords[:, 0]))
        assert (steps % 96 == 0).all()  # stride 48 px at target = 96 level-0 px
        assert group["jpeg"].shape == (coords.shape[0],)
        assert group["tissue_mask"].ndim == 2 and group["thumbnail"].shape[2] == 3
        params_back = json.loads(group.attrs["params"])
        assert params_back["target_mpp"] == 0.5


def test_rerun_skips_finished_slides_and_params_change_redoes(svs_slide, tmp_path: Path) -> None:
    out = tmp_path / "t.h5"
    sources = [SlideSource(svs_slide.path)]
    first = _tile(sources, out)
    second = _tile(sources, out)
    assert [r.status for r in first.results] == ["done"]
    assert [r.status for r in second.results] == ["skipped"]
    assert second.results[0].n_tiles == first.results[0].n_tiles
    third = _tile(sources, out, TilingParams(target_mpp=1.0, tile_size_px=32))
    assert [r.status for r in third.results] == ["done"]
    forced = _tile(sources, out, TilingParams(target_mpp=1.0, tile_size_px=32), overwrite=True)
    assert [r.status for r in forced.results] == ["done"]
    with TileStore(out) as store:
        assert store.read_tile(store.slides[0], 0).shape == (32, 32, 3)


def test_interrupted_run_keeps_finished_slides_and_resumes(
    svs_slide, svs_slide_b, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "t.h5"
    sources = [SlideSource(svs_slide.path), SlideSource(svs_slide_b.path)]
    _tile(sources[:1], out)  # the store already holds slide a
    original_append = SlidePartWriter.append

    def killed(self, tiles):  # noqa: ANN001, ANN202
        if self.final_path.stem == "svs_b":
            raise KeyboardInterrupt  # as if the job were killed mid-slide
        return original_append(self, tiles)

    monkeypatch.setattr(SlidePartWriter, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        _tile(sources, out)
    with TileStore(out) as store:
        assert store.slides == ["svs_a"]  # still readable, with what was finished
        assert store.read_tile("svs_a", 0).shape == (64, 64, 3)
    # A truncated slide file (a bad copy) must be ignored, not trusted.
    parts = tmp_path / "t.h5.d" / "clam" / "patches"
    assert [p.name for p in parts.iterdir()] == ["svs_a.h5"]  # the aborted slide left nothing
    (parts / "svs_b.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    monkeypatch.setattr(SlidePartWriter, "append", original_append)
    resumed = _tile(sources, out)
    assert {r.slide: r.status for r in resumed.results} == {"svs_a": "skipped", "svs_b": "done"}
    with TileStore(out) as store:
        assert store.slides == ["svs_a", "svs_b"]
        assert store.read_tiles("svs_b", [0, 1]).shape == (2, 64, 64, 3)
    assert sorted(p.name for p in parts.iterdir()) == ["svs_a.h5", "svs_b.h5"]


def test_slide_finished_before_the_index_was_written_is_adopted(svs_slide, tmp_path: Path) -> None:
    out = tmp_path / "t.h5"
    _tile([SlideSource(svs_slide.path)], out)
    write_index(out, [])  # killed after the slide file's rename, before the index listed it
    assert TileStore(out).slides == []
    again = _tile([SlideSource(svs_slide.path)], out)
    assert [r.status for r in again.results] == ["skipped"]
    assert TileStore(out).slides == ["svs_a"]


def test_skip_errors_records_bad_slides(svs_slide, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"garbage" * 1000)
    out = tmp_path / "t.h5"
    sources = [SlideSource(bad), SlideSource(svs_slide.path)]
    report = _tile(sources, out, skip_errors=True)
    statuses = {r.slide: r.status for r in report.results}
    assert statuses == {"corrupt": "error", "svs_a": "done"}
    assert str(bad) in report.results[0].error  # the report names the file, not just the fault
    saved = json.loads((tmp_path / "t.h5.report.json").read_text())
    assert {s["slide"]: s["status"] for s in saved["slides"]} == statuses
    assert TileStore(out).slides == ["svs_a"]


def test_without_skip_errors_the_run_stops_but_saves_finished_slides(
    svs_slide, tmp_path: Path
) -> None:
    bad = tmp_path / "zz_corrupt.svs"
    bad.write_bytes(b"garbage" * 1000)
    out = tmp_path / "t.h5"
    with pytest.raises(SlideError, match="zz_corrupt.svs"):
        _tile([SlideSource(svs_slide.path), SlideSource(bad)], out)
    assert TileStore(out).slides == ["svs_a"]


def test_slide_without_mpp_fails_unless_given(no_mpp_slide, tmp_path: Path) -> None:
    out = tmp_path / "t.h5"
    with pytest.raises(SlideError, match="--slide-mpp"):
        _tile([SlideSource(no_mpp_slide.path)], out)
    report = _tile([SlideSource(no_mpp_slide.path, mpp=0.25)], out)
    assert report.results[0].status == "done"


def test_target_finer_than_slide_is_refused(svs_slide, tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="finer than the slide"):
        _tile([SlideSource(svs_slide.path)], tmp_path / "t.h5", TilingParams(target_mpp=0.1))


def test_dry_run_writes_coordinates_only(svs_slide, tmp_path: Path) -> None:
    full, dry = tmp_path / "full.h5", tmp_path / "dry.h5"
    _tile([SlideSource(svs_slide.path)], full)
    dry_params = TilingParams(target_mpp=1.0, tile_size_px=64, dry_run=True)
    _tile([SlideSource(svs_slide.path)], dry, dry_params)
    with TileStore(full) as a, TileStore(dry) as b:
        assert np.array_equal(a.coords("svs_a"), b.coords("svs_a"))
        assert not b.has_pixels("svs_a") and a.has_pixels("svs_a")
        with pytest.raises(StoreError, match="coordinates only"):
            b.read_tile("svs_a", 0)


def test_shards_partition_the_cohort(tmp_path: Path) -> None:
    sources = [SlideSource(tmp_path / f"slide_{i:02d}.svs") for i in range(40)]
    shards = [select_shard(sources, (k, 4)) for k in range(1, 5)]
    names = [s.name for shard in shards for s in shard]
    assert sorted(names) == sorted(s.name for s in sources)
    assert all(len(shard) > 0 for shard in shards)
    # Stable when the list is reordered or grows.
    assert select_shard(sources[::-1], (2, 4))[::-1] == shards[1]
    grown = select_shard(sources + [SlideSource(tmp_path / "new.svs")], (2, 4))
    assert set(s.name for s in shards[1]) <= set(s.name for s in grown)
    with pytest.raises(ValueError, match="K/N"):
        parse_shard("5/4")


@pytest.mark.parametrize("link", [False, True])
def test_merge_shard_stores(svs_slide, svs_slide_b, tmp_path: Path, link: bool) -> None:
    a, b, merged = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "merged.h5"
    _tile([SlideSource(svs_slide.path)], a)
    _tile([SlideSource(svs_slide_b.path)], b)
    assert merge_stores([a, b], merged, link=link) == ["svs_a", "svs_b"]
    with TileStore(merged) as store, TileStore(b) as source:
        assert store.slides == ["svs_a", "svs_b"]
        assert np.array_equal(store.read_tiles("svs_b", [0, 3]), source.read_tiles("svs_b", [0, 3]))
    shard_file = tmp_path / "a.h5.d/clam/patches/svs_a.h5"
    merged_file = TileStore(merged).slide_file("svs_a")
    # No pixels are copied either way: a hard link of the shard's file, or the file itself.
    assert merged_file.stat().st_ino == shard_file.stat().st_ino
    assert (merged_file == shard_file.resolve()) == link
    with pytest.raises(StoreError, match="more than one input"):
        merge_stores([a, a], tmp_path / "dup.h5")


def test_slide_csv_gives_per_slide_mpp(no_mpp_slide, svs_slide, tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{no_mpp_slide.path},0.25\n{svs_slide.path},\n")
    sources = collect_sources([table])
    assert [(s.name, s.mpp) for s in sources] == [("nompp", 0.25), ("svs_a", None)]
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    with pytest.raises(ValueError, match="'path' column"):
        collect_sources([bad])


def test_labels_from_qupath_annotations(svs_slide, tmp_path: Path) -> None:
    annotations = tmp_path / "ann"
    annotations.mkdir()
    (annotations / "svs_a.geojson").write_text(svs_slide.truth_geojson.read_text())
    out = tmp_path / "t.h5"
    params = TilingParams(target_mpp=1.0, tile_size_px=64, label_min_coverage=0.6)
    classes = list(svs_slide.class_names)
    _tile(
        [SlideSource(svs_slide.path)],
        out,
        params,
        annotations_dir=annotations,
        labelled_only=True,
        class_names=classes,
    )
    with TileStore(out) as store:
        assert store.class_names == classes
        labels = store.labels("svs_a")
        coords = store.coords("svs_a")
    assert (labels >= 0).all() and len(np.unique(labels)) >= 2
    truth = svs_slide.label_map(16)  # one truth cell per 16 level-0 px
    agree = 0
    for (x, y), label in zip(coords, labels):
        window = truth[y // 16 : (y + 256) // 16, x // 16 : (x + 256) // 16]
        values, counts = np.unique(window, return_counts=True)
        majority = svs_slide.class_names[values[np.argmax(counts)] - 1]
        agree += majority == store.class_names[label]
    assert agree / len(labels) >= 0.95


def test_cli_tile_resume_and_errors(svs_slide, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.h5"
    args = [
        "tile",
        str(svs_slide.path),
        "--out",
        str(out),
        "--mpp",
        "1",
        "--tile-size",
        "64",
        "--workers",
        "1",
        "--quiet",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1 tiled" in _flat(first.output)
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "1 already done" in _flat(second.output)
    missing = runner.invoke(app, ["tile", str(tmp_path / "absent.svs"), "--out", str(out)])
    assert missing.exit_code != 0 and "absent.svs" in _flat(missing.output)
    both = runner.invoke(
        app, ["tile", str(svs_slide.path), "--out", str(out), "--mpp", "1", "--mag", "20"]
    )
    assert both.exit_code != 0 and "not both" in both.output


def test_cli_info_json(svs_slide) -> None:
    result = CliRunner().invoke(app, ["info", str(svs_slide.path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["level0_width"] == 3072 and info["mpp"] == pytest.approx(0.25)


def test_unknown_annotation_class_fails_with_the_file(svs_slide, tmp_path: Path) -> None:
    annotations = tmp_path / "ann"
    annotations.mkdir()
    (annotations / "svs_a.geojson").write_text(svs_slide.truth_geojson.read_text())
    with pytest.raises(SlideError, match="unknown class") as err:
        _tile(
            [SlideSource(svs_slide.path)],
            tmp_path / "t.h5",
            annotations_dir=annotations,
            class_names=["normal", "tumour"],
        )
    assert "svs_a.geojson" in str(err.value)


@pytest.mark.parametrize("lengths", [[1453], [900, 900, 900], [700, 1200]])
def test_jpeg_blocks_of_any_shape_are_written(tmp_path: Path, lengths: list[int]) -> None:
    """One tile, or JPEGs of equal byte length, must not be mistaken for a 2-D block."""
    n = len(lengths)
    data = SlideGroupData(
        name="s", source_path="s.svs", coords=np.zeros((n, 2), np.int64),
        tissue_fraction=np.ones(n, np.float32), attrs={"tile_size_px": 8}, coords_attrs={},
        thumbnail=np.zeros((4, 4, 3), np.uint8), tissue_mask=np.ones((4, 4), bool),
        mask_downsample=1.0,
    )  # fmt: skip
    writer = SlidePartWriter(tmp_path / "s.h5", data, "jpeg", 8)
    tiles = [np.full(length, i, dtype=np.uint8) for i, length in enumerate(lengths)]
    writer.append(tiles)
    writer.commit()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        stored = f["jpeg"]
        assert [len(stored[i]) for i in range(n)] == lengths
        assert all((stored[i] == i).all() for i in range(n))
