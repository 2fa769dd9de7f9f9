"""Training: it learns the synthetic task, splits by slide, resumes exactly, fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.models import ModelConfig
from histoduo.models.checkpoint import load_checkpoint, load_model
from histoduo.store import TileStore, copy_store
from histoduo.synthetic import DEFAULT_CLASSES
from histoduo.tiling import TilingParams, tile_slides
from histoduo.training import LabelError, TrainConfig, evaluate, train
from histoduo.training import loop as loop_module
from histoduo.training.data import make_splits, tile_table

SMALL = ModelConfig.small_cpu()
N_SLIDES = 5


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory: pytest.TempPathFactory, labelled_slides) -> Path:  # noqa: ANN001
    """Five synthetic slides tiled at 0.5 um/px, 64 px, labels from their ground truth."""
    sources, annotations = labelled_slides
    assert len(sources) == N_SLIDES
    store = tmp_path_factory.mktemp("train_store") / "tiles.h5"
    tile_slides(
        sources, store, TilingParams(target_mpp=0.5, tile_size_px=64),
        annotations_dir=annotations, class_names=list(DEFAULT_CLASSES), labelled_only=True,
        workers=2, progress=False,
    )  # fmt: skip
    return store


def _config(**overrides) -> TrainConfig:  # noqa: ANN003
    settings = dict(epochs=4, iterations_per_epoch=25, batch_size=32, lr=1e-3,
                    val_fraction=0.2, test_fraction=0.2, num_workers=1, seed=0)  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def trained(labelled_store: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    out = tmp_path_factory.mktemp("run") / "run"
    return train(labelled_store, out, _config(), model_config=SMALL, progress=False)


def test_a_small_duoformer_learns_the_synthetic_task(trained) -> None:
    assert trained.metrics["val_balanced_accuracy"] >= 0.9
    assert trained.metrics["test_balanced_accuracy"] >= 0.85
    run = trained.run_dir
    for name in ("config.json", "splits.csv", "metrics.csv", "best.pt", "last.pt",
                 "report.json", "training_curves.png", "confusion_val.png",
                 "confusion_test.png"):  # fmt: skip
        assert (run / name).exists(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4]
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    report = json.loads((run / "report.json").read_text())
    assert set(report["test"]["per_class"]) == set(DEFAULT_CLASSES)
    assert np.array(report["test"]["confusion_matrix"]).shape == (4, 4)


def test_shuffled_labels_stay_near_chance(labelled_store: Path, tmp_path: Path) -> None:
    shuffled = tmp_path / "shuffled.h5"
    copy_store(labelled_store, shuffled)  # index + slide files
    rng = np.random.default_rng(0)
    with h5py.File(shuffled, "r+") as f:
        for group in f["slides"].values():
            labels = group["labels"][()]
            group["labels"][...] = rng.permutation(labels)
        del group  # a live object keeps its linked slide file open (and locked) after close
    result = train(shuffled, tmp_path / "run", _config(epochs=2), model_config=SMALL,
                   progress=False)  # fmt: skip
    assert result.metrics["test_balanced_accuracy"] < 0.5  # chance is 0.25 for 4 classes


def test_no_slide_crosses_splits(labelled_store: Path, trained) -> None:
    splits = pd.read_csv(trained.run_dir / "splits.csv")
    assert splits["slide"].is_unique
    assert set(splits["split"]) == {"train", "val", "test"}
    assert (splits["split"] == "train").sum() >= 2
    table = tile_table(TileStore(labelled_store))
    again = make_splits(table, 0.2, 0.2, seed=0)
    assert again == dict(zip(splits["group"], splits["split"]))  # seeded: reproducible
    other = make_splits(table, 0.2, 0.2, seed=1)
    assert set(other.values()) == {"train", "val", "test"}


def test_checkpoint_rebuilds_the_identical_model(trained, labelled_store: Path) -> None:
    model, meta = load_model(trained.best_checkpoint)
    assert meta.class_names == list(DEFAULT_CLASSES)
    assert meta.roles.grades == ["low_grade", "high_grade"]
    assert meta.target_mpp == 0.5 and meta.tile_size_px == 64 and meta.input_size_px == 64
    state = load_checkpoint(trained.best_checkpoint)["model_state"]
    again, _ = load_model(trained.best_checkpoint)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())


def test_resume_continues_exactly(
    labelled_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(epochs=2, iterations_per_epoch=4, num_workers=0)
    whole = train(labelled_store, tmp_path / "whole", config, model_config=SMALL, progress=False)

    original = loop_module._write_metrics

    def killed_after_first_epoch(out, history):  # noqa: ANN001, ANN202
        original(out, history)
        raise KeyboardInterrupt  # the job dies right after epoch 1 is saved

    monkeypatch.setattr(loop_module, "_write_metrics", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(labelled_store, tmp_path / "split", config, model_config=SMALL, progress=False)
    monkeypatch.setattr(loop_module, "_write_metrics", original)
    resumed = train(labelled_store, tmp_path / "split", config, model_config=SMALL,
                    resume=True, progress=False)  # fmt: skip

    a = load_checkpoint(whole.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    for key, value in a["model_state"].items():
        assert torch.allclose(value.float(), b["model_state"][key].float(), atol=1e-5), key
    metrics_a = pd.read_csv(whole.run_dir / "metrics.csv")
    metrics_b = pd.read_csv(resumed.run_dir / "metrics.csv")
    assert np.allclose(metrics_a["train_loss"], metrics_b["train_loss"], atol=1e-5)
    assert np.allclose(metrics_a["val_balanced_accuracy"], metrics_b["val_balanced_accuracy"])


def test_authors_preset_steps_onecycle_every_iteration(labelled_store: Path, tmp_path) -> None:
    config = TrainConfig.authors(epochs=2, iterations_per_epoch=3, batch_size=8, num_workers=0,
                                 val_fraction=0.2, test_fraction=0.0)  # fmt: skip
    assert config.augment.rotation_deg == 360 and config.optimizer == "adam"
    result = train(labelled_store, tmp_path / "authors", config, model_config=SMALL,
                   progress=False)  # fmt: skip
    lrs = pd.read_csv(result.run_dir / "metrics.csv")["lr"].to_list()
    # Stepped per iteration, OneCycle ends far below its peak; stepped per epoch (the
    # authors' bug) it would still sit near max_lr / 25 = 4e-6 after the first epoch.
    assert lrs[-1] < 1e-6
    _, meta = load_model(result.best_checkpoint)
    assert meta.eval_resize == "center_crop"


def test_slide_level_labels(labelled_store: Path, tmp_path: Path) -> None:
    store = TileStore(labelled_store)
    labels = tmp_path / "labels.csv"
    rows = ["slide,label"] + [
        f"{name},{'high_grade' if i % 2 else 'low_grade'}" for i, name in enumerate(store.slides)
    ]
    labels.write_text("\n".join(rows) + "\n")
    table = tile_table(store, labels)
    per_slide = table.frame.groupby("slide")["label"].nunique()
    assert (per_slide == 1).all()
    conflicting = tmp_path / "conflict.csv"
    conflicting.write_text(f"slide,label\n{store.slides[0]},normal\n{store.slides[0]},necrosis\n")
    with pytest.raises(LabelError, match="more than one label") as err:
        tile_table(store, conflicting)
    assert "conflict.csv" in str(err.value)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"slide,label\n{store.slides[0]},grade_9\n")
    with pytest.raises(LabelError, match="unknown class"):
        tile_table(store, unknown)


def test_bad_inputs_fail_clearly(labelled_store: Path, tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled.h5"
    copy_store(labelled_store, unlabelled)  # index + slide files
    with h5py.File(unlabelled, "r+") as f:
        del f.attrs["class_names"]
        for group in f["slides"].values():
            del group["labels"]
        del group  # a live object keeps its linked slide file open (and locked) after close
    with pytest.raises(LabelError, match="no labels") as err:
        train(unlabelled, tmp_path / "r1", _config(), model_config=SMALL, progress=False)
    assert "unlabelled.h5" in str(err.value)

    one_class = tmp_path / "one_class.h5"
    copy_store(labelled_store, one_class)  # index + slide files
    with h5py.File(one_class, "r+") as f:
        for group in f["slides"].values():
            group["labels"][...] = np.where(group["labels"][()] == 3, 0, group["labels"][()])
        del group  # a live object keeps its linked slide file open (and locked) after close
    with pytest.raises(LabelError, match="no training tiles for class"):
        train(one_class, tmp_path / "r2", _config(), model_config=SMALL, progress=False)

    runner = CliRunner()
    missing = runner.invoke(app, ["train", str(tmp_path / "absent.h5"), "--out", str(tmp_path)])
    assert missing.exit_code != 0 and "absent.h5" in " ".join(missing.output.split())
    foreign = tmp_path / "foreign.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    result = runner.invoke(app, ["evaluate", str(labelled_store), "--model", str(foreign)])
    assert result.exit_code != 0
    assert "not a histoduo checkpoint" in " ".join(result.output.split())


def test_evaluate_matches_the_training_report(trained, labelled_store: Path) -> None:
    report = evaluate(labelled_store, trained.best_checkpoint, split="test")
    saved = json.loads((trained.run_dir / "report.json").read_text())["test"]
    assert report["n_tiles"] == saved["n_tiles"]
    assert report["balanced_accuracy"] == pytest.approx(saved["balanced_accuracy"])
    result = CliRunner().invoke(
        app, ["evaluate", str(labelled_store), "--model", str(trained.best_checkpoint),
              "--split", "val", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["split"] == "val"


def test_a_runs_splits_csv_can_be_given_back(labelled_store: Path, trained) -> None:
    from histoduo.training.data import read_splits

    table = tile_table(TileStore(labelled_store))
    written = pd.read_csv(trained.run_dir / "splits.csv")
    assert read_splits(trained.run_dir / "splits.csv", table) == dict(
        zip(written["group"], written["split"])
    )
    # Grouped by patient: a slide-keyed splits.csv still maps every patient to one split.
    patients = tile_table(TileStore(labelled_store))
    patients.frame["group"] = ["p" + s[-1] for s in patients.frame["slide"]]
    mapped = read_splits(trained.run_dir / "splits.csv", patients)
    assert set(mapped) == set(patients.frame["group"])


def test_report_has_throughput(trained) -> None:
    speed = json.loads((trained.run_dir / "report.json").read_text())["throughput"]
    assert speed["device"] == "cpu" and speed["decode"] == "worker"
    assert speed["train_tiles_per_s"] > 0 and speed["eval_tiles_per_s"] > 0
    assert speed["train_tiles_per_s_last_epoch"] > 0
    assert speed["peak_gpu_memory_gib"] is None  # measured on CUDA only
    assert speed["batch_size"] == 32


def test_training_decoding_on_the_device_matches_workers(
    labelled_store: Path, tmp_path: Path
) -> None:
    """The GPU's training path (workers read JPEG bytes; decode + augmentation in the main
    process with each batch's seed), run on CPU, trains exactly as the worker path does."""
    from model_configs import tiny

    histories = {}
    for mode in ("worker", "device"):
        config = _config(epochs=1, iterations_per_epoch=3, batch_size=8, decode=mode)
        result = train(labelled_store, tmp_path / mode, config, model_config=tiny(), progress=False)
        histories[mode] = pd.read_csv(result.run_dir / "metrics.csv")
        report = json.loads((result.run_dir / "report.json").read_text())
        assert report["throughput"]["decode"] == mode
    worker, device = histories["worker"], histories["device"]
    assert worker["train_loss"].to_numpy() == pytest.approx(device["train_loss"].to_numpy())
    assert worker["val_loss"].to_numpy() == pytest.approx(device["val_loss"].to_numpy())


def test_resume_keeps_the_runs_splits_and_can_extend_it(
    labelled_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histoduo.training import session as session_module

    out = tmp_path / "run"
    # no test slides: each epoch is three steps and one validation
    config = _config(epochs=1, iterations_per_epoch=3, batch_size=8, num_workers=0,
                     test_fraction=0.0)  # fmt: skip
    train(labelled_store, out, config, model_config=SMALL, progress=False)
    splits_before = (out / "splits.csv").read_text()
    # Flags that decide the splits must match the run's: the error names the flag.
    for change, flag in [
        ({"seed": 1}, "--seed"),
        ({"val_fraction": 0.3}, "--val-fraction"),
        ({"test_fraction": 0.2}, "--test-fraction"),
        ({"splits_csv": str(out / "splits.csv")}, "--splits"),
    ]:
        other = _config(**{**config.__dict__, **change})
        with pytest.raises(LabelError, match=flag):
            train(labelled_store, out, other, model_config=SMALL, resume=True, progress=False)

    def no_new_splits(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a resumed run recomputed its splits")

    monkeypatch.setattr(session_module, "make_splits", no_new_splits)
    # More epochs than the run planned: a cosine tail instead of OneCycle's "Tried to step".
    longer = _config(**{**config.__dict__, "epochs": 3})
    train(labelled_store, out, longer, model_config=SMALL, resume=True, progress=False)
    lrs = pd.read_csv(out / "metrics.csv")["lr"].to_list()
    assert len(lrs) == 3
    assert lrs[0] < 1e-6  # the first run's OneCycle had annealed
    assert lrs[1] > 0.3 * 0.1 * config.lr  # the tail restarted from a tenth of --lr ...
    assert lrs[2] < lrs[1]  # ... and anneals over the added epochs
    state = load_checkpoint(out / "last.pt")["train_state"]
    assert state["schedule_epochs"] == 3 and state["tail"]["steps"] == 2 * 3
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 3
    # An extended run resumes and extends again (its tail is rebuilt from last.pt).
    again = _config(**{**config.__dict__, "epochs": 4})
    train(labelled_store, out, again, model_config=SMALL, resume=True, progress=False)
    assert len(pd.read_csv(out / "metrics.csv")) == 4
    assert (out / "splits.csv").read_text() == splits_before
