"""End to end: train a tiny model on synthetic slides, predict held-out slides, check the
tile predictions against the ground-truth regions and the slide-level grade calls."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from histoduo.predict import PredictParams, predict_run
from histoduo.slide.sources import SlideSource
from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide
from histoduo.tiling import TilingParams, tile_slides

CLASSES = ["normal", "low_grade", "high_grade", "necrosis"]
TILING = TilingParams(target_mpp=0.5, tile_size_px=64)


def _slide(folder: Path, name: str, **kwargs):  # noqa: ANN202
    spec = SyntheticSlideSpec(**{"level0_width": 2048, "level0_height": 2048, "mpp": 0.5, **kwargs})
    return write_synthetic_slide(folder / f"{name}.svs", spec, workers=1)


def _labelled_store(slides: list, folder: Path, name: str) -> Path:
    annotations = folder / f"{name}_annotations"
    annotations.mkdir()
    for slide in slides:
        shutil.copy(slide.truth_geojson, annotations / f"{slide.path.stem}.geojson")
    store = folder / f"{name}.h5"
    tile_slides(
        [SlideSource(s.path) for s in slides],
        store,
        TILING,
        annotations_dir=annotations,
        class_names=CLASSES,
        labelled_only=True,
        workers=1,
        progress=False,
    )
    return store


def _model_config():  # noqa: ANN202
    from histoduo.models import ModelConfig

    return ModelConfig.small_cpu(len(CLASSES))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoduo.training import TrainConfig, train

    folder = tmp_path_factory.mktemp("e2e_train")
    slides = [
        _slide(folder, f"train{i}", seed=100 + i, class_weights=(1, 1, 1, 1)) for i in range(3)
    ]
    config = TrainConfig(
        epochs=4, iterations_per_epoch=25, batch_size=32, lr=1e-3, val_fraction=0.34,
        test_fraction=0.0, num_workers=1,
    )  # fmt: skip
    store = _labelled_store(slides, folder, "train")
    result = train(store, folder / "model", config, model_config=_model_config(), progress=False)
    return Path(result.best_checkpoint)


def test_tiles_match_truth_and_grades(trained: Path, tmp_path: Path) -> None:
    held_out = _slide(tmp_path, "heldout", seed=200, class_weights=(1, 1, 1, 1))
    above = _slide(
        tmp_path,
        "focus_above",
        seed=201,
        classes=("low_grade",),
        foci=(("high_grade", 0.2),),
    )
    # A real high-grade focus, but only ~2% of the tumour: under the 5% the rule asks for.
    below = _slide(
        tmp_path, "focus_below", seed=202, classes=("low_grade",), foci=(("high_grade", 0.02),)
    )
    out = tmp_path / "out"
    sources = [SlideSource(s.path) for s in (held_out, above, below)]
    report = predict_run(trained, out, PredictParams(workers=1, heatmap=True), sources=sources)
    calls = {o.slide: o.call for o in report.outcomes}

    # Tile-level agreement with the ground truth regions (tiles with a clear label).
    from histoduo.store import TileStore

    truth_store = _labelled_store([held_out], tmp_path, "truth")
    with TileStore(truth_store) as store:
        truth = {
            tuple(xy): int(lab) for xy, lab in zip(store.coords("heldout"), store.labels("heldout"))
        }
    scores = np.load(out / "heldout" / "scores.npz")
    pred = scores["probs"].argmax(axis=1)
    matched = [(truth[tuple(xy)], p) for xy, p in zip(scores["coords"], pred) if tuple(xy) in truth]
    assert len(matched) > 50
    accuracy = float(np.mean([t == p for t, p in matched]))
    assert accuracy >= 0.85, f"tile accuracy {accuracy:.2f}"

    truth_fractions = held_out.class_area_fractions()
    expected = "high_grade" if truth_fractions.get("high_grade", 0) > 0.05 else "low_grade"
    assert calls["heldout"] == expected
    assert calls["focus_above"] == "high_grade"
    assert calls["focus_below"] == "low_grade"
    # The model did see the small focus; the rule's minimum share is what keeps it out.
    import json

    grade = json.loads((out / "focus_below" / "summary.json").read_text())["grade"]
    assert grade["class_tiles"].get("high_grade", 0) >= 1
    assert 0 < grade["grade_fractions"]["high_grade"] < 0.05

    # Honest calls: the trained model's confident call on the held-out slide carries no
    # uncertainty flag (the untrained model's is flagged: tests/test_report.py).
    held = json.loads((out / "heldout" / "summary.json").read_text())["grade"]
    print("held-out call", held["call"], "confidence", held["confidence"], held["uncertainty"])
    assert held["uncertain"] is False, held["uncertainty"]
    assert held["confidence"] >= 0.6
    with (out / "slides.csv").open() as handle:
        rows = {r["slide"]: r for r in csv.DictReader(handle)}
    assert rows["heldout"]["uncertain"] == "False" and rows["heldout"]["uncertainty_codes"] == ""
    assert (out / "report.html").exists()
