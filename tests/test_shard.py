"""``--shard K/N`` partitions any set of slide names, with one rule for every command."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoduo.slide.sources import (
    SlideSource,
    parse_shard,
    select_names,
    select_shard,
    shard_of,
)

# Names as stores hold them: imported groups with '/', dots, spaces, unicode, look-alikes.
NAMES = [
    "lung_aca/img1.jpeg",
    "lung_aca/img2.jpeg",
    "lung_n/img1.jpeg",
    "colon aca/img 10.png",
    "colon aca/img 11.png",
    "TCGA-AB-1234.01Z.00.svs",
    "TCGA-AB-1234",
    "slide.v2",
    "slide v2",
    "ünïcode/ß.tif",
    "a/b/c/d",
    "x",
] + [f"group {i % 7}/tile.{i}.jpeg" for i in range(60)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_shards_partition_any_names_exactly(n: int) -> None:
    shards = [select_names(NAMES, (k, n)) for k in range(1, n + 1)]
    together = [name for shard in shards for name in shard]
    assert sorted(together) == sorted(NAMES)  # every name once: none dropped, none twice
    assert len(together) == len(set(together))
    for shard in shards:  # each shard keeps the input order
        assert shard == [name for name in NAMES if name in set(shard)]
    if n > 1:
        assert all(shard for shard in shards[:2])  # names are spread, not all in one shard


def test_slide_files_and_store_names_shard_by_the_same_rule() -> None:
    """tile/tissue/predict on files shard by the slide name; predict --tiles by the store's
    names: a slide lands in the same shard either way."""
    sources = [SlideSource(Path(f"/data/{name}.svs")) for name in ("a b.c", "slide.v2", "x y")]
    for n in (2, 3, 4):
        for k in range(1, n + 1):
            by_file = [s.name for s in select_shard(sources, (k, n))]
            by_name = select_names([s.name for s in sources], (k, n))
            assert by_file == by_name
            assert all(shard_of(name, n) == k for name in by_name)


def test_the_shard_does_not_depend_on_the_other_names() -> None:
    alone = {name: shard_of(name, 4) for name in NAMES}
    assert select_names(list(reversed(NAMES)), (2, 4)) == [
        name for name in reversed(NAMES) if alone[name] == 2
    ]


def test_parse_shard_keeps_its_contract() -> None:
    assert parse_shard(None) is None
    assert parse_shard("2/8") == (2, 8)
    for bad in ("0/2", "3/2", "x", "1/0", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_predict_tiles_shards_cover_an_imported_store(tmp_path: Path) -> None:
    """An imported store's slides are named ``<class>/<image>``: ``predict --tiles STORE
    --shard K/N`` must predict each of them in exactly one shard (it once dropped them all)."""
    import numpy as np
    from PIL import Image

    from histoduo.predict import PredictParams, predict_run
    from histoduo.store import TileStore
    from histoduo.tiling.importer import ImportParams, import_images
    from tests.test_predict import make_checkpoint

    rng = np.random.default_rng(0)
    for cls in ("lung_aca", "lung n"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"img {i}.v1.png")
    store = tmp_path / "tiles.h5"
    import_images(tmp_path / "images", store, ImportParams(tile_size_px=64, mpp=1.0))
    with TileStore(store) as tiles:
        names = tiles.slides
    assert any("/" in name and " " in name and "." in name for name in names)
    checkpoint = make_checkpoint(tmp_path / "tiny.pt", target_mpp=1.0)
    predicted: list[str] = []
    for k in (1, 2):
        report = predict_run(
            checkpoint,
            tmp_path / "out",
            PredictParams(workers=0, heatmap=False),
            tiles_store=store,
            shard=(k, 2),
        )
        assert all(o.status == "done" for o in report.outcomes)
        predicted += [o.slide for o in report.outcomes]
    assert sorted(predicted) == sorted(names)
