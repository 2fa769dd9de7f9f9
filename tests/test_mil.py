"""Slide-level MIL: aggregators, metrics, train-mil on synthetic slide-label cohorts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histoduo.models.mil import AGGREGATORS, MILModelConfig, build_mil_model, load_mil_model
from histoduo.runtime.errors import HistoduoError
from histoduo.synthetic.cohort import FeatureCohortSpec, write_feature_cohort
from histoduo.training.metrics import one_vs_rest_auc, quadratic_weighted_kappa
from histoduo.training.mil import MILConfig, MILLabelError, train_mil

# Small and quick: ~150 tiles per slide, 16-d features, a few tiles per focus.
COHORT = FeatureCohortSpec(n_slides=40, grid_side=14, embedding_dim=16, focus_tiles=4, seed=3)


def _config(cohort, out: Path, **overrides) -> MILConfig:  # noqa: ANN001
    settings = dict(
        features_dir=cohort.features_dir,
        labels_csv=cohort.labels_csv,
        out_dir=out,
        hidden_dim=16,
        attention_dim=8,
        heads=2,
        dropout=0.0,
        epochs=20,
        lr=5e-3,
        num_workers=0,
        device="cpu",
        threads=1,
        early_stopping_patience=None,
    )
    settings.update(overrides)
    return MILConfig(**settings)


def top_k_hit_rate(attention_csv: Path, focus_tiles: dict[str, np.ndarray]) -> float:
    """Share of each focus-bearing slide's k most attended tiles that lie in its foci
    (k = the slide's number of focus tiles), averaged over those slides."""
    attention = pd.read_csv(attention_csv)
    column = [c for c in attention.columns if c.startswith("attention")][-1]
    rates = []
    for slide, rows in attention.groupby("slide"):
        focus = focus_tiles[slide]
        if len(focus):
            top = rows.sort_values(column, ascending=False)["tile"].to_numpy()[: len(focus)]
            rates.append(float(np.isin(top, focus).mean()))
    return float(np.mean(rates))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return write_feature_cohort(tmp_path_factory.mktemp("mil_cohort"), COHORT)


@pytest.fixture(scope="module")
def abmil_run(cohort, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    out = tmp_path_factory.mktemp("mil_run") / "abmil"
    return train_mil(_config(cohort, out), progress=False)


# --- aggregators ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_aggregators_give_logits_and_attention_over_the_bag(aggregator: str) -> None:
    config = MILModelConfig(
        aggregator=aggregator, in_dim=8, n_classes=3, hidden_dim=16, heads=2, dropout=0.0
    )
    model = build_mil_model(config).eval()
    bag = torch.randn(11, 8)  # 11 tiles: transmil pads to a 4 x 4 grid
    logits, attention = model(bag)
    assert logits.shape == (3,)
    assert attention.shape == (11, 1)
    assert torch.allclose(attention.sum(0), torch.ones(1), atol=1e-5)
    # A bag's call does not depend on the order of its tiles for attention pooling.
    if aggregator != "transmil":  # transmil's position encoding sees the order, by design
        order = torch.randperm(11)
        shuffled_logits, shuffled_attention = model(bag[order])
        assert torch.allclose(shuffled_logits, logits, atol=1e-5)
        assert torch.allclose(shuffled_attention, attention[order], atol=1e-6)


def test_multi_branch_abmil_has_one_attention_column_per_class() -> None:
    config = MILModelConfig(in_dim=8, n_classes=3, hidden_dim=16, multi_branch=True)
    logits, attention = build_mil_model(config)(torch.randn(5, 8))
    assert logits.shape == (3,) and attention.shape == (5, 3)
    assert torch.allclose(attention.sum(0), torch.ones(3), atol=1e-5)


def test_gated_attention_follows_the_tile_that_decides() -> None:
    """Hand-set weights: the attention scorer reads feature 0, so the tile with the largest
    feature 0 gets nearly all the attention."""
    config = MILModelConfig(in_dim=4, n_classes=2, hidden_dim=4, attention_dim=4, dropout=0.0)
    model = build_mil_model(config).eval()
    with torch.no_grad():
        model.embed[0].weight.copy_(torch.eye(4))
        model.embed[0].bias.zero_()
        model.attention_v.weight.copy_(torch.eye(4) * 5)
        model.attention_u.weight.copy_(torch.eye(4) * 5)
        for layer in (model.attention_v, model.attention_u):
            layer.bias.zero_()
        model.attention_w.weight.copy_(torch.tensor([[10.0, 0, 0, 0]]))
    bag = torch.zeros(6, 4)
    bag[4, 0] = 1.0
    with torch.no_grad():
        _, attention = model(bag)
    assert int(attention[:, 0].argmax()) == 4 and float(attention[4, 0]) > 0.9


# --- metrics -------------------------------------------------------------------------------


def test_auc_and_quadratic_weighted_kappa() -> None:
    truth = np.array([0, 0, 1, 1])
    assert one_vs_rest_auc(truth, np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])) == 1
    # one positive ranked below one negative out of 4 pairs
    flipped = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    assert one_vs_rest_auc(truth, flipped) == pytest.approx(0.5)
    assert quadratic_weighted_kappa(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3]), 4) == 1.0
    # Off by one grade costs less than off by three.
    near = quadratic_weighted_kappa(np.array([0, 1, 2, 3]), np.array([1, 1, 2, 3]), 4)
    far = quadratic_weighted_kappa(np.array([0, 1, 2, 3]), np.array([3, 1, 2, 3]), 4)
    assert 0 < far < near < 1
    # Hand-computed: observed [[1,1],[0,2]], expected [[0.5,1.5],[0.5,1.5]]; disagreement
    # weighted 1 off the diagonal: observed 1, expected 1.5 + 0.5 -> kappa 1 - 1/2
    assert quadratic_weighted_kappa(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2) == (
        pytest.approx(0.5)
    )


# --- training ------------------------------------------------------------------------------


def test_abmil_calls_held_out_slides_and_attends_to_the_foci(abmil_run, cohort) -> None:  # noqa: ANN001
    out = abmil_run.run_dir
    report = json.loads((out / "report.json").read_text())
    for split in ("val", "test"):
        assert set(report[split]) >= {"balanced_accuracy", "macro_f1", "auc", "qwk"}
    assert report["test"]["balanced_accuracy"] >= 0.85, report["test"]
    assert report["test"]["auc"] >= 0.9
    hit_rate = top_k_hit_rate(out / "attention.csv", cohort.focus_tiles)
    # A random tile order would hit ~4 / 150 of the time.
    assert hit_rate >= 0.6, hit_rate
    attention = pd.read_csv(out / "attention.csv")
    assert list(attention.columns) == ["slide", "tile", "x_level0_px", "y_level0_px", "attention"]
    splits = pd.read_csv(out / "splits.csv")
    held_out = set(splits.loc[splits["split"] != "train", "slide"])
    assert set(attention["slide"]) == held_out
    per_slide = attention.groupby("slide")["attention"].sum()
    assert np.allclose(per_slide, 1.0, atol=1e-3)
    for name in ("best.pt", "last.pt", "metrics.csv", "config.json", "predictions.csv"):
        assert (out / name).is_file(), name
    for name in ("training_curves.png", "confusion_val.png", "confusion_test.png"):
        assert (out / name).stat().st_size > 1000, name


def test_splits_keep_patients_whole_and_best_is_chosen_on_validation(abmil_run) -> None:  # noqa: ANN001
    out = abmil_run.run_dir
    splits = pd.read_csv(out / "splits.csv")
    assert list(splits.columns[:2]) == ["slide", "split"]
    assert (splits.groupby("patient")["split"].nunique() == 1).all()
    assert set(splits["split"]) == {"train", "val", "test"}
    metrics = pd.read_csv(out / "metrics.csv")
    assert not any(c.startswith("test") for c in metrics.columns)  # test never seen in training
    model, meta = load_mil_model(out / "best.pt")
    scores = list(zip(metrics["val_balanced_accuracy"], -metrics["val_loss"]))
    first_best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # strict gains only
    assert meta.epoch == int(metrics["epoch"][first_best])
    assert meta.model_config["encoder"] == "synthetic"
    assert meta.class_names == ["high_grade", "low_grade"]


def test_mean_pooling_baseline_runs_on_the_same_cohort(cohort, abmil_run, tmp_path: Path) -> None:  # noqa: ANN001
    """The floor: mean pooling has no attention to find 4 tiles in 150 with. The numbers go
    in the report (printed); the assertion is only that it does not beat ABMIL."""
    result = train_mil(_config(cohort, tmp_path / "mean", aggregator="mean"), progress=False)
    mean_test, abmil_test = result.report["test"], abmil_run.report["test"]
    print(
        f"test balanced accuracy: abmil {abmil_test['balanced_accuracy']:.3f}, "
        f"mean {mean_test['balanced_accuracy']:.3f}; auc abmil {abmil_test['auc']:.3f}, "
        f"mean {mean_test['auc']:.3f}"
    )
    assert mean_test["auc"] <= abmil_test["auc"]
    attention = pd.read_csv(tmp_path / "mean" / "attention.csv")
    sizes = attention.groupby("slide")["attention"].transform("size")
    assert np.allclose(attention["attention"], 1.0 / sizes, rtol=1e-4)  # uniform


def test_transmil_and_multi_branch_runs(cohort, tmp_path: Path) -> None:  # noqa: ANN001
    result = train_mil(
        _config(cohort, tmp_path / "t", aggregator="transmil", epochs=1), progress=False
    )
    assert {"val", "test"} <= set(result.report)
    train_mil(_config(cohort, tmp_path / "mb", multi_branch=True, epochs=1), progress=False)
    attention = pd.read_csv(tmp_path / "mb" / "attention.csv")
    assert ["attention_high_grade", "attention_low_grade"] == list(attention.columns[4:])


def test_resume_continues_exactly(cohort, tmp_path: Path) -> None:  # noqa: ANN001
    whole = train_mil(_config(cohort, tmp_path / "whole", epochs=3), progress=False)
    train_mil(_config(cohort, tmp_path / "split", epochs=2), progress=False)
    resumed = train_mil(_config(cohort, tmp_path / "split", epochs=3), resume=True, progress=False)
    a = pd.read_csv(tmp_path / "whole" / "metrics.csv")
    b = pd.read_csv(tmp_path / "split" / "metrics.csv")
    assert len(b) == 3
    assert np.allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    assert resumed.report["test"]["auc"] == pytest.approx(whole.report["test"]["auc"])


def test_cross_validation_reports_mean_and_spread(cohort, tmp_path: Path) -> None:  # noqa: ANN001
    result = train_mil(_config(cohort, tmp_path / "cv", folds=3, epochs=2), progress=False)
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    assert report["folds"] == 3
    for split in ("val", "test"):
        assert len(report[split]["per_fold"]["auc"]) == 3
        assert report[split]["auc"] == pytest.approx(np.mean(report[split]["per_fold"]["auc"]))
        assert set(report[split]["std"]) == {"balanced_accuracy", "macro_f1", "auc", "qwk"}
    folds = pd.read_csv(tmp_path / "cv" / "folds.csv")
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    tested = pd.concat(
        pd.read_csv(d / "splits.csv").query("split == 'test'") for d in result.fold_dirs
    )
    assert sorted(tested["slide"]) == sorted(folds["slide"])  # every slide tested once


# --- bad input -----------------------------------------------------------------------------


def test_labels_with_a_bom_and_grades(cohort, tmp_path: Path) -> None:  # noqa: ANN001
    labels = tmp_path / "bom.csv"
    labels.write_bytes(b"\xef\xbb\xbf" + cohort.labels_csv.read_bytes())
    config = _config(cohort, tmp_path / "g", labels_csv=labels, epochs=1)
    result = train_mil(replace(config, grades=["low_grade", "high_grade"]), progress=False)
    assert result.report["class_names"] == ["low_grade", "high_grade"]
    assert result.report["ordinal"] is True


@pytest.mark.parametrize(
    ("content", "grades", "message"),
    [
        ("slide,label\nslide_0000,low_grade\nnot_embedded,high_grade\n", None, "not_embedded"),
        (
            "slide,label\nslide_0000,low_grade\nslide_0001,grade_9\n",
            ["low_grade", "high_grade"],
            "grade_9",
        ),
        ("slide,grade\nslide_0000,low_grade\n", None, "missing ['label']"),
        ("slide,label\nslide_0000,low_grade\nslide_0000,high_grade\n", None, "two labels"),
        ("slide,label\nslide_0000,\n", None, "without a label"),
    ],
)
def test_bad_label_csv_is_a_clear_error(cohort, tmp_path: Path, content, grades, message) -> None:  # noqa: ANN001
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    config = _config(cohort, tmp_path / "bad", labels_csv=labels, grades=grades)
    with pytest.raises(MILLabelError) as info:
        train_mil(config, progress=False)
    assert isinstance(info.value, HistoduoError)
    assert str(labels) in str(info.value) and message in str(info.value)
    assert not (tmp_path / "bad" / "best.pt").exists()


def test_slide_label_cohort_is_decided_by_small_foci(tmp_path: Path) -> None:
    from histoduo.synthetic import SyntheticSlideSpec
    from histoduo.synthetic.cohort import write_slide_label_cohort

    base = SyntheticSlideSpec(level0_width=768, level0_height=512, level_downsamples=(1,))
    slides, labels_csv = write_slide_label_cohort(tmp_path, 2, base, focus_fraction=0.02)
    labels = pd.read_csv(labels_csv)
    assert list(labels.columns) == ["slide", "label", "patient"]
    assert list(labels["label"]) == ["low_grade", "high_grade"]
    for slide, label in zip(slides, labels["label"]):
        high = slide.class_area_fractions()["high_grade"]
        truth = json.loads(slide.truth_geojson.read_text())
        named = {f["properties"]["classification"]["name"] for f in truth["features"]}
        if label == "high_grade":  # one or two foci of 2 % of the tissue each
            assert 0.01 < high < 0.05 and "high_grade" in named
        else:
            assert high == 0 and "high_grade" not in named


# --- the slide model in predict --------------------------------------------------------------


def test_slide_model_calls_a_slide_and_draws_its_attention(abmil_run, cohort, tmp_path) -> None:  # noqa: ANN001
    from histoduo.predict.slide_model import SlideModel, SlideModelError, write_slide_model_outputs
    from histoduo.store.features import FeatureInfo, read_feature_bag

    model = SlideModel(abmil_run.run_dir / "best.pt")
    predictions = pd.read_csv(abmil_run.run_dir / "predictions.csv")
    right = predictions[(predictions["split"] == "test") & (predictions["label"] == "high_grade")]
    right = right[right["predicted"] == "high_grade"].iloc[0]
    bag = read_feature_bag(cohort.features_dir / f"{right['slide']}.h5")
    model.check_features(bag.info, "features")
    result = model.call(bag.features)
    assert result.call == "high_grade"
    assert result.confidence == pytest.approx(right["prob_high_grade"], abs=1e-4)
    assert result.agrees_with("high_grade") is True
    assert result.agrees_with("low_grade") is False
    assert result.agrees_with(None) is None
    other = FeatureInfo(slide="x", encoder="uni", embedding_dim=16, mpp=0.5, input_size_px=224)
    with pytest.raises(SlideModelError, match="uni"):
        model.check_features(other, "features")

    fields = write_slide_model_outputs(
        tmp_path,
        bag.slide,
        result,
        bag.coords,
        tile_size_level0=COHORT.tile_size_px,
        level0_size=(COHORT.grid_side * COHORT.tile_size_px,) * 2,
        slide_mpp=0.5,
        rule_call="low_grade",
        thumbnail_downsample=COHORT.tile_size_px,  # one cell per tile
    )
    assert fields == {
        "mil_call": "high_grade",
        "mil_confidence": pytest.approx(result.confidence, abs=1e-6),
        "mil_agrees": False,
    }
    assert json.loads((tmp_path / "mil.json").read_text())["mil_agrees"] is False
    assert (tmp_path / "attention_map.png").stat().st_size > 5000

    from histoduo.predict.slide_model import attention_grid

    grid = attention_grid(
        bag.coords,
        result.attention_for_call(),
        COHORT.tile_size_px,
        (COHORT.grid_side * COHORT.tile_size_px,) * 2,
        COHORT.tile_size_px,
    )
    top = int(np.argmax(result.attention_for_call()))
    x, y = bag.coords[top] // COHORT.tile_size_px
    assert grid[y, x] == 1.0 and np.nanmax(grid) == 1.0
    assert np.isnan(grid).sum() == grid.size - len(bag.coords)  # only tiles are painted


# --- command line ----------------------------------------------------------------------------


def test_train_mil_command(cohort, tmp_path: Path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from histoduo.cli import app

    out = tmp_path / "cli_run"
    args = ["train-mil", str(cohort.features_dir), "--labels", str(cohort.labels_csv)]
    args += ["--out", str(out), "--epochs", "1", "--workers", "0", "--threads", "1", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--aggregator", "mean", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "test: balanced_accuracy" in result.output
    assert json.loads((out / "config.json").read_text())["train_mil"]["aggregator"] == "mean"

    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\nslide_0000,low_grade\nmissing_slide,high_grade\n")
    args[3] = str(bad)
    result = CliRunner().invoke(app, [*args[:5], str(tmp_path / "bad_run"), *args[6:]])
    assert result.exit_code == 1
    assert "bad.csv" in result.output and "missing_slide" in result.output
    assert "Traceback" not in result.output


def test_train_mil_command_defaults_are_the_config_defaults() -> None:
    import dataclasses
    import inspect

    from histoduo.cli.mil import train_mil_command

    defaults = {f.name: f.default for f in dataclasses.fields(MILConfig)}
    renamed = {"patience": "early_stopping_patience", "workers": "num_workers"}
    checked = 0
    for name, parameter in inspect.signature(train_mil_command).parameters.items():
        key = renamed.get(name, name)
        if key in defaults and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == defaults[key], name
            checked += 1
    assert checked >= 15


def test_synth_cohort_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histoduo.cli import app

    args = ["synth", str(tmp_path / "c"), "--cohort", "2", "--width", "512", "--height", "384"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    labels = pd.read_csv(tmp_path / "c" / "slides.csv")
    assert list(labels["label"]) == ["low_grade", "high_grade"]
    assert all((tmp_path / "c" / f"{s}.svs").is_file() for s in labels["slide"])


def test_early_stopping_counts_across_a_resume(cohort, tmp_path: Path) -> None:  # noqa: ANN001
    """Patience 2 with a learning rate too small to change the validation call: the run stops
    two epochs after its best; a run interrupted one epoch after its best and resumed must
    stop at the same epoch (not count its patience from zero again)."""
    settings = dict(lr=1e-9, early_stopping_patience=2)
    whole = train_mil(_config(cohort, tmp_path / "w", epochs=8, **settings), progress=False)
    stopped_at = whole.report["epochs_run"]
    assert stopped_at < 8 and stopped_at == whole.report["best_epoch"] + 2
    train_mil(_config(cohort, tmp_path / "r", epochs=stopped_at - 1, **settings), progress=False)
    resumed = train_mil(
        _config(cohort, tmp_path / "r", epochs=8, **settings), resume=True, progress=False
    )
    assert resumed.report["epochs_run"] == stopped_at


# --- artefact QC: flagged tiles stay out of slide-level training, as out of tile training ---


def test_feature_bag_kept_follows_the_qc_policy(tmp_path: Path) -> None:
    from histoduo.qc.params import FLAG_BLUR, FLAG_CHECKED, FLAG_FOLD, FLAG_PEN
    from histoduo.store.features import FeatureInfo, read_feature_bag, write_feature_file

    info = FeatureInfo(slide="s", encoder="e", embedding_dim=2, mpp=0.5, input_size_px=8)
    features = np.arange(10, dtype=np.float32).reshape(5, 2)
    coords = np.arange(10).reshape(5, 2)
    flags = np.array([0, FLAG_PEN, FLAG_BLUR, FLAG_FOLD, FLAG_PEN | FLAG_FOLD]) | FLAG_CHECKED

    def bag(mode: str | None, qc_flags: np.ndarray | None = flags) -> object:
        path = write_feature_file(tmp_path / f"{mode}.h5", info, features, coords,
                                  qc_flags=qc_flags, qc_mode=mode)  # fmt: skip
        return read_feature_bag(path)

    tiled_exclude = bag("exclude")
    kept = tiled_exclude.kept()  # follows the tiling mode: pen and blur out, folds stay
    np.testing.assert_array_equal(kept.tile_numbers, [0, 3])
    np.testing.assert_array_equal(kept.coords, coords[[0, 3]])
    np.testing.assert_array_equal(kept.features, features[[0, 3]])
    assert len(tiled_exclude.kept("flag").features) == 5
    assert len(tiled_exclude.kept("off").features) == 5
    tiled_flag = bag("flag")
    assert len(tiled_flag.kept().features) == 5
    np.testing.assert_array_equal(tiled_flag.kept("exclude").tile_numbers, [0, 3])
    # Never checked (an older file): nothing to leave out.
    assert len(bag("unchecked", None).kept("exclude").features) == 5
    # Every tile flagged: the bag stays whole (a slide model needs tiles to call).
    all_pen = bag("exclude", np.full(5, FLAG_CHECKED | FLAG_PEN))
    assert len(all_pen.kept().features) == 5


def test_train_mil_leaves_qc_flagged_tiles_out(cohort, tmp_path: Path) -> None:  # noqa: ANN001
    from histoduo.qc.params import FLAG_CHECKED, FLAG_PEN
    from histoduo.store.features import read_feature_bag, write_feature_file
    from histoduo.training.mil.data import BagDataset

    flagged_dir = tmp_path / "features_flagged"
    flagged = np.arange(10)  # tiles 0-9 of every slide carry pen ink
    for path in sorted(Path(cohort.features_dir).glob("*.h5")):
        bag = read_feature_bag(path)
        flags = np.full(len(bag.coords), FLAG_CHECKED, np.uint8)
        flags[flagged] |= FLAG_PEN
        write_feature_file(flagged_dir / path.name, bag.info, bag.features, bag.coords,
                           qc_flags=flags, qc_mode="exclude")  # fmt: skip
    paths = sorted(str(p) for p in flagged_dir.glob("*.h5"))
    n_tiles = pd.Series({(b := read_feature_bag(p)).slide: len(b.coords) for p in paths})
    first = n_tiles.iloc[0]
    assert len(BagDataset(paths, [0] * len(paths))[0][0]) == first - len(flagged)
    assert len(BagDataset(paths, [0] * len(paths), "flag")[0][0]) == first

    def attended_tiles(qc: str | None) -> pd.DataFrame:
        flagged_cohort = replace(cohort, features_dir=flagged_dir)
        config = _config(flagged_cohort, tmp_path / f"run_{qc}", epochs=1, qc=qc)
        train_mil(config, progress=False)
        return pd.read_csv(config.out_dir / "attention.csv")

    excluded = attended_tiles(None)  # as tiled: exclude
    assert len(excluded) and not excluded["tile"].isin(flagged).any()
    per_slide = excluded.groupby("slide").size()
    assert (per_slide == n_tiles[per_slide.index] - len(flagged)).all()
    kept = attended_tiles("flag")
    assert kept["tile"].isin(flagged).any()
    per_slide = kept.groupby("slide").size()
    assert (per_slide == n_tiles[per_slide.index]).all()
