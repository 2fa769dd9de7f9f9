"""``histoduo import``: labelled image folders become a tile store that training reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.models import ModelConfig
from histoduo.runtime.exitcodes import EXIT_SOME_FAILED
from histoduo.store import TileStore
from histoduo.tiling.importer import ImageImportError, ImportParams, import_images, mosaic_coords
from histoduo.training import TrainConfig, train
from histoduo.training.data import tile_table

CLASSES = ("stroma", "tumor", "normal")
COLOURS = {"stroma": (230, 120, 200), "tumor": (90, 40, 150), "normal": (250, 220, 235)}
PER_CLASS = 6
TINY = ModelConfig(
    backbone="resnet18", input_size_px=64, patch_size_px=32, stages=(2, 3, 4), embed_dim=32,
    scale_depth=1, patch_depth=1, scale_heads=2, patch_heads=2,
)  # fmt: skip


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 6 PNGs of random sizes 40-90 px, each class its own colour."""
    root = tmp_path_factory.mktemp("patches") / "dataset"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            w, h = (int(v) for v in rng.integers(40, 91, size=2))
            noise = rng.integers(-15, 16, size=(h, w, 3))
            pixels = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


def _csv(folder: Path, path: Path, label_of: dict[str, str] | None = None) -> Path:
    """image,label,slide,patient: three images per slide, two slides per patient."""
    rows = ["image,label,slide,patient"]
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            image = f"{name}/{name}_{i}.png"
            label = (label_of or {}).get(image, name)
            rows.append(f"{image},{label},s{c}_{i // 3},p{c}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_class_folders_become_a_store(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles.h5"
    code, output = _cli("import", str(folder), "--out", str(out), "--mpp", "0.5",
                        "--tile-size", "64", "--workers", "0")  # fmt: skip
    assert code == 0, output
    assert "splits are per image" in output  # no ids: warned
    store = TileStore(out)
    assert store.class_names == sorted(CLASSES)
    assert len(store.slides) == 3 * PER_CLASS  # one group per image
    slide = "tumor/tumor_0.png"
    assert slide in store.slides
    tile = store.read_tile(slide, 0)
    assert tile.shape == (64, 64, 3)
    assert np.abs(tile.reshape(-1, 3).mean(0) - COLOURS["tumor"]).max() < 8  # the right image
    assert store.labels(slide).tolist() == [sorted(CLASSES).index("tumor")]
    attrs = store.attrs(slide)
    assert attrs["tile_encoding"] == "jpeg" and attrs["tile_size_px"] == 64
    # Resized from its own side: the store's resolution is scaled, the median over images.
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["target_mpp"] == pytest.approx(attrs["target_mpp"])
    assert 0.5 * 40 / 64 <= attrs["target_mpp"] <= 0.5 * 90 / 64
    assert report["skipped"] == [] and report["n_images"] == 18
    table = tile_table(store)
    assert table.counts() == dict.fromkeys(sorted(CLASSES), PER_CLASS)


def test_csv_groups_images_by_slide_and_trains(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "grouped.h5"
    labels = _csv(folder, tmp_path / "labels.csv")
    report = import_images(
        folder, out, ImportParams(tile_size_px=64, mpp=0.5, encoding="raw",
                                  class_names=CLASSES), labels_csv=labels,
    )  # fmt: skip
    assert not any("per image" in w for w in report.warnings)
    store = TileStore(out)
    assert store.class_names == list(CLASSES)  # --classes order, not sorted
    assert sorted(store.slides) == sorted(f"s{c}_{k}" for c in range(3) for k in range(2))
    assert store.num_tiles("s1_0") == 3
    assert store.labels("s1_0").tolist() == [1, 1, 1]
    assert store.attrs("s1_0")["patient"] == "p1"
    assert store.attrs("s1_0")["tile_encoding"] == "raw"
    np.testing.assert_array_equal(store.coords("s1_0"), mosaic_coords(3, 64))
    assert store.coords("s1_0")[:, 0].tolist() == [0, 64, 0]  # a 2 x 2 mosaic, row-major
    assert store.read_tiles("s1_0", [0, 2]).shape == (2, 64, 64, 3)
    thumbnail, downsample = store.thumbnail("s1_0")
    mask, _ = store.tissue_mask("s1_0")
    assert thumbnail.shape[:2] == mask.shape and mask.sum() == 3 * (64 / downsample) ** 2
    table = tile_table(store, split_by="patient")
    assert set(table.frame["group"]) == {"p0", "p1", "p2"}

    config = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=8, num_workers=0,
                         val_fraction=0.3, test_fraction=0.0)  # fmt: skip
    result = train(out, tmp_path / "run", config, model_config=TINY, progress=False)
    assert result.best_checkpoint.exists()
    assert "val_balanced_accuracy" in result.metrics


def test_bad_images_fail_or_are_skipped(folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    for name in CLASSES[:2]:
        (broken / name).mkdir(parents=True)
        for src in sorted((folder / name).glob("*.png"))[:2]:
            (broken / name / src.name).write_bytes(src.read_bytes())
    truncated = broken / "tumor" / "tumor_9.png"
    truncated.write_bytes((folder / "tumor" / "tumor_0.png").read_bytes()[:200])
    (broken / "stroma" / "notes.jpg").write_text("not an image")
    out = tmp_path / "b.h5"

    code, output = _cli("import", str(broken), "--out", str(out), "--mpp", "0.5",
                        "--tile-size", "32", "--workers", "0")  # fmt: skip
    assert code != 0 and "notes.jpg" in output
    assert not out.exists()
    with pytest.raises(ImageImportError, match="tumor_9.png"):  # passes the header check
        _only_truncated(broken, out)
    assert not out.exists() and not Path(f"{out}.parts").exists()

    code, output = _cli("import", str(broken), "--out", str(out), "--mpp", "0.5",
                        "--tile-size", "32", "--skip-errors", "--workers", "2")  # fmt: skip
    assert code == EXIT_SOME_FAILED, output  # imported, with images left out
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert sorted(s["image"] for s in report["skipped"]) == [
        "stroma/notes.jpg", "tumor/tumor_9.png"]  # fmt: skip
    assert len(TileStore(out).slides) == 4


def _only_truncated(broken: Path, out: Path) -> None:
    (broken / "stroma" / "notes.jpg").unlink()
    try:
        import_images(broken, out, ImportParams(tile_size_px=32, mpp=0.5))
    finally:
        (broken / "stroma" / "notes.jpg").write_text("not an image")


def test_bad_inputs_fail_clearly(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    unknown = _csv(folder, tmp_path / "unknown.csv", {"tumor/tumor_2.png": "necrosis"})
    with pytest.raises(ImageImportError, match="unknown class name 'necrosis'") as err:
        import_images(folder, out, ImportParams(tile_size_px=64, mpp=0.5), labels_csv=unknown)
    assert "unknown.csv" in str(err.value)

    code, output = _cli("import", str(folder), "--out", str(out), "--tile-size", "64")
    assert code != 0 and "--mpp" in output  # resolution unknown
    code, output = _cli("import", str(folder), "--out", str(out), "--mpp", "0.5")
    assert code != 0 and "--tile-size" in output  # sizes differ
    code, output = _cli("import", str(folder), "--out", str(out), "--mpp", "0.5",
                        "--tile-size", "64", "--classes", "tumor,normal")  # fmt: skip
    assert code != 0 and "stroma" in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = _cli("import", str(empty), "--out", str(out), "--mpp", "0.5")
    assert code != 0 and "empty" in output and "no images" in output
    assert not out.exists()
