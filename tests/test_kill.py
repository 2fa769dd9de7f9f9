"""kill -9 at several moments, then a rerun: the result equals an uninterrupted run's.

Each command runs in its own process group and gets SIGKILL (no cleanup handlers run) when
a file shows it is at a given stage, or after a seeded random delay. The rerun (with
``--resume`` for train) must end with exactly the slides, tiles and rows of a run that was
never interrupted, and leave no temporary files.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from model_configs import tiny, tiny_meta

from histoduo.models import build_model
from histoduo.models.checkpoint import load_checkpoint, save_checkpoint
from histoduo.store import TileStore, clam_dir
from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # one thread: the same float sums in every run
    "COLUMNS": "200",
}
TILE = ["--tile-size", "64", "--mpp", "1", "--workers", "0", "-q"]
CLASSES = ["normal", "tumour"]
TIMEOUT_S = 240


def histoduo(*args: object) -> list[str]:
    return [sys.executable, "-m", "histoduo", *[str(a) for a in args]]


def run_to_end(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return time.perf_counter() - started


def run_and_kill(
    command: list[str], cwd: Path, when: Callable[[], bool] | None, after_s: float | None
) -> bool:
    """Start ``command``; SIGKILL its whole process group once ``when()`` holds or
    ``after_s`` has passed. True if it was killed, False if it finished first."""
    process = subprocess.Popen(command, cwd=cwd, env=ENV, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    started = time.perf_counter()
    try:
        while process.poll() is None:
            elapsed = time.perf_counter() - started
            if (when is not None and when()) or (after_s is not None and elapsed >= after_s):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return True
            assert elapsed < TIMEOUT_S, "command hung"
            time.sleep(0.005)
        return False
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def leftovers(folder: Path) -> list[Path]:
    patterns = ("*.tmp", ".*.tmp", "*.parts", "*.prev")
    return sorted(p for pattern in patterns for p in folder.rglob(pattern))


def random_delays(reference_s: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)  # seeded: a failure reproduces
    return [rng.uniform(0.2, 0.8) * reference_s for _ in range(count)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 768 x 768 px slides at 0.5 um/px, left half 'normal', right half 'tumour'."""
    folder = tmp_path_factory.mktemp("kill")
    annotations = folder / "annotations"
    annotations.mkdir()
    for i in range(4):
        spec = SyntheticSlideSpec(level0_width=768, level0_height=768, mpp=0.5, seed=20 + i)
        slide = write_synthetic_slide(folder / f"slide{i}.svs", spec, workers=1)
        slide.truth_geojson.unlink()
        features = [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [rect]},
                "properties": {"classification": {"name": name}},
            }
            for rect, name in (
                ([[0, 0], [384, 0], [384, 768], [0, 768], [0, 0]], "normal"),
                ([[384, 0], [768, 0], [768, 768], [384, 768], [384, 0]], "tumour"),
            )
        ]
        (annotations / f"slide{i}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": features})
        )
    return folder


def _slides(cohort: Path) -> list[Path]:
    return sorted(cohort.glob("slide*.svs"))


def _store_contents(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    with TileStore(path) as store:
        return {
            name: (
                store.coords(name),
                store.labels(name),
                store.tissue_fraction(name),
                store.read_tiles(name, np.arange(store.num_tiles(name))),
            )
            for name in store.slides
        }


def _assert_same_store(got: Path, want: Path) -> None:
    a, b = _store_contents(got), _store_contents(want)
    assert sorted(a) == sorted(b)  # the same slides, each once
    for name in b:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_tile_killed_and_rerun_equals_uninterrupted(cohort: Path, tmp_path: Path) -> None:
    args = [*_slides(cohort), "--annotations", cohort / "annotations", *TILE]
    reference = tmp_path / "reference.h5"
    seconds = run_to_end(histoduo("tile", *args, "-o", reference), tmp_path)
    slides = lambda out: clam_dir(out) / "patches"  # noqa: E731 - format 2's slide files
    moments: list[tuple[str, Callable[[Path], Callable[[], bool]] | None, float | None]] = [
        ("first slide written", lambda out: lambda: any(slides(out).glob("*.h5")), None),
        ("a slide being written", lambda out: lambda: any(slides(out).glob(".*.tmp")), None),
        *[(f"after {d:.2f} s", None, d) for d in random_delays(seconds, 2, seed=1)],
    ]
    killed = 0
    for index, (label, condition, delay) in enumerate(moments):
        out = tmp_path / f"run{index}" / "tiles.h5"
        out.parent.mkdir()
        command = histoduo("tile", *args, "-o", out)
        hit = run_and_kill(command, tmp_path, condition(out) if condition else None, delay)
        # Each stage is reached before a run can end, so a stage kill that never fired means
        # the condition watches the wrong files.
        assert hit or condition is None, f"{label}: never seen before the run finished"
        killed += hit
        run_to_end(command, tmp_path)
        _assert_same_store(out, reference)
        assert not leftovers(out.parent), label
    assert killed >= 2  # most kills landed before the run finished by itself


def _tiny_checkpoint(path: Path) -> Path:
    config = tiny(num_classes=len(CLASSES))
    torch.manual_seed(0)
    meta = tiny_meta(config, CLASSES)
    return save_checkpoint(path, build_model(config).state_dict(), meta)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # ~1 min: seven processes that each import torch
def test_predict_killed_and_rerun_equals_uninterrupted(cohort: Path, tmp_path: Path) -> None:
    model = _tiny_checkpoint(tmp_path / "model.pt")
    args = ["-m", model, *_slides(cohort), "--device", "cpu", "--workers", "0",
            "--threads", "1", "--min-tissue", "0.1", "-q"]  # fmt: skip
    reference = tmp_path / "reference"
    seconds = run_to_end(histoduo("predict", *args, "-o", reference), tmp_path)
    names = [p.stem for p in _slides(cohort)]
    moments: list[tuple[str, Callable[[Path], Callable[[], bool]] | None, float | None]] = [
        ("first slide started", lambda out: lambda: any(out.glob("slide*")), None),
        ("first slide done", lambda out: lambda: any(out.glob("slide*/done")), None),
        *[(f"after {d:.2f} s", None, d) for d in random_delays(seconds, 1, seed=2)],
    ]
    killed = 0
    for index, (label, condition, delay) in enumerate(moments):
        out = tmp_path / f"run{index}"
        command = histoduo("predict", *args, "-o", out)
        hit = run_and_kill(command, tmp_path, condition(out) if condition else None, delay)
        # Each stage is reached before a run can end, so a stage kill that never fired means
        # the condition watches the wrong files.
        assert hit or condition is None, f"{label}: never seen before the run finished"
        killed += hit
        run_to_end(command, tmp_path)
        rows = _read_rows(out / "slides.csv")
        assert [r["slide"] for r in rows] == names, label  # each slide once, none missing
        assert rows == _read_rows(reference / "slides.csv"), label
        for name in names:
            got, want = out / name / "tiles.csv", reference / name / "tiles.csv"
            assert got.read_text() == want.read_text(), (label, name)
        assert not leftovers(out), label
    assert killed >= len(moments) - 1  # a kill may rarely land after a fast run finished


TRAIN = ["--backbone", "resnet18", "--embed-dim", "32", "--scale-depth", "1",
         "--patch-depth", "1", "--scale-heads", "2", "--patch-heads", "2", "--epochs", "3",
         "--iterations", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu",
         "--val-fraction", "0.25", "--test-fraction", "0.25", "--seed", "0",
         "--quiet"]  # fmt: skip
METRIC_COLUMNS = ("epoch", "train_loss", "lr", "val_loss", "val_balanced_accuracy")


@pytest.mark.slow  # ~1 min: five training processes
def test_train_resume_after_kill_equals_uninterrupted(cohort: Path, tmp_path: Path) -> None:
    store = tmp_path / "tiles.h5"
    run_to_end(histoduo("tile", *_slides(cohort), "--annotations", cohort / "annotations",
                        "-o", store, *TILE), tmp_path)  # fmt: skip
    reference = tmp_path / "reference"
    seconds = run_to_end(histoduo("train", store, "-o", reference, *TRAIN), tmp_path)
    moments: list[tuple[str, Callable[[Path], Callable[[], bool]] | None, float | None]] = [
        ("epoch 1 saved", lambda out: lambda: (out / "last.pt").exists(), None),
        *[(f"after {d:.2f} s", None, d) for d in random_delays(seconds, 1, seed=3)],
    ]
    killed = 0
    for index, (label, condition, delay) in enumerate(moments):
        out = tmp_path / f"run{index}"
        command = histoduo("train", store, "-o", out, *TRAIN)
        hit = run_and_kill(command, tmp_path, condition(out) if condition else None, delay)
        # Each stage is reached before a run can end, so a stage kill that never fired means
        # the condition watches the wrong files.
        assert hit or condition is None, f"{label}: never seen before the run finished"
        killed += hit
        resume = ["--resume"] if (out / "last.pt").exists() else []
        run_to_end([*command, *resume], tmp_path)
        got, want = _read_rows(out / "metrics.csv"), _read_rows(reference / "metrics.csv")
        assert [r["epoch"] for r in got] == ["1", "2", "3"], label  # no epoch twice or lost
        for a, b in zip(got, want):
            for column in METRIC_COLUMNS:
                assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-5), label
        for checkpoint in ("last.pt", "best.pt"):
            state = load_checkpoint(out / checkpoint)["model_state"]
            for key, value in load_checkpoint(reference / checkpoint)["model_state"].items():
                torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0, msg=key)
        report, expected = (json.loads((d / "report.json").read_text()) for d in (out, reference))
        assert report["test"] == expected["test"] and report["val"] == expected["val"], label
        assert not leftovers(out), label
    assert killed >= len(moments) - 1  # a kill may rarely land after a fast run finished
