"""Real SLURM jobs: the templates of examples/slurm/ submitted with sbatch (``pytest -m slurm``).

A cluster must answer: ``sudo examples/slurm/local-cluster.sh up`` starts a one-node one (CI
does). Without ``sbatch`` these tests skip, except in CI (CI=true), where they fail.
The jobs run this interpreter's histoduo (HISTODUO_PYTHON = sys.executable, an absolute path).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "examples" / "slurm"
SHARDS = 3
TILE_ARGS = ["--mpp", "1.0", "--tile-size", "64"]  # the tiny checkpoint's resolution and size
# The templates ask for production sizes; tasks here must fit a 2-core CI machine.
JOB_ARGS = ["--cpus-per-task=1", "--mem=1G", "--time=10"]
# One slide lands in shard 1, two in shard 2, one in shard 3 (hash of the name, 3 shards).
SLIDES = {"case0": 0, "case1": 1, "case3": 3, "case4": 4}
CLASSES = ["normal", "tumour"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The environment jobs are submitted with; skips (fails in CI) without a cluster."""
    if shutil.which("sbatch") is None:
        reason = (
            "sbatch not found: the SLURM tests need a cluster "
            "(a one-node one: sudo examples/slurm/local-cluster.sh up)"
        )
        if _in_ci():
            pytest.fail(f"{reason}; in CI .ci/run must start it")
        pytest.skip(reason)
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.fail(
            "sbatch is installed but no SLURM controller answers "
            f"({probe.stderr.strip() or 'no nodes'}); start one: "
            "sudo examples/slurm/local-cluster.sh up"
        )
    return {**os.environ, "HISTODUO_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}


def _histoduo(*args: object, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "histoduo", *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _logs(folder: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(folder.glob("slurm-*.out")))


def _sbatch(env: dict[str, str], cwd: Path, *args: object, timeout: float = 60) -> str:
    """Submit; returns the job id."""
    cmd = ["sbatch", "--parsable", *JOB_ARGS, *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny synthetic slides and the slide CSV that lists them (relative paths)."""
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    folder = tmp_path_factory.mktemp("slurm_cohort")
    for name, seed in SLIDES.items():
        spec = SyntheticSlideSpec(level0_width=1024, level0_height=768, seed=seed)
        write_synthetic_slide(folder / "slides" / f"{name}.svs", spec, workers=1)
    _write_csv(folder / "cohort.csv", [f"slides/{name}.svs" for name in SLIDES])
    return folder


def _write_csv(path: Path, slides: list[str]) -> Path:
    path.write_text("path\n" + "".join(f"{s}\n" for s in slides))
    return path


@pytest.fixture(scope="module")
def checkpoint(cohort: Path) -> Path:
    """A tiny untrained checkpoint (64 px tiles at 1.0 um/px): only equality is tested."""
    import torch
    from model_configs import tiny, tiny_meta

    from histoduo.models import build_model
    from histoduo.models.checkpoint import save_checkpoint

    config = tiny(num_classes=len(CLASSES))
    torch.manual_seed(0)
    meta = tiny_meta(config, CLASSES)
    return save_checkpoint(cohort / "model.pt", build_model(config).state_dict(), meta)


def _store_contents(path: Path) -> dict[str, tuple[np.ndarray, list[bytes]]]:
    from histoduo.store import TileStore

    with TileStore(path) as store:
        out = {}
        for name in store.slides:
            jpeg = store.read_jpeg_bytes(name, range(store.num_tiles(name)))
            out[name] = (store.coords(name), [bytes(np.asarray(b)) for b in jpeg])
        return out


def _slides_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.pop("path")  # the store each run read: differs by design
    return sorted(rows, key=lambda r: r["slide"])


@pytest.fixture(scope="module")
def array_run(
    cluster: dict[str, str],
    cohort: Path,
    checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """tile array -> afterok merge -> afterok predict array, as submit_cohort.sh submits them."""
    folder = tmp_path_factory.mktemp("slurm_run")
    out = folder / "run"
    env = {
        **cluster,
        "SUBMIT_WAIT": "1",
        "SBATCH_ARGS": " ".join(JOB_ARGS),
        "TILE_ARGS": " ".join(TILE_ARGS),
        "PREDICT_ARGS": "--workers 0 --no-heatmap",  # maps cost time and are not compared
    }
    cmd = [TEMPLATES / "submit_cohort.sh", cohort / "cohort.csv", out, checkpoint, str(SHARDS)]
    result = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr + _logs(folder)
    return out


def test_array_jobs_tile_merge_and_predict_like_one_process(
    array_run: Path, cohort: Path, checkpoint: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    store = reference / "tiles.h5"
    quiet = ["--workers", "0", "--quiet"]
    _histoduo("tile", cohort / "cohort.csv", "--out", store, *TILE_ARGS, *quiet, cwd=tmp_path)
    _histoduo("predict", "--tiles", store, "--model", checkpoint, "--no-heatmap",
              "--out", reference / "predictions", *quiet, cwd=tmp_path)  # fmt: skip
    out = array_run

    # Each task tiled its own shard into its own store; together they are the cohort.
    parts = [out / f"tiles.shard-{k}-of-{SHARDS}.h5" for k in range(1, SHARDS + 1)]
    per_shard = [sorted(_store_contents(p)) for p in parts]
    assert all(per_shard), per_shard  # the chosen names give every shard a slide
    assert sorted(sum(per_shard, [])) == sorted(SLIDES)

    # The merged store is the single-process store: same slides, coordinates and tile bytes.
    got, want = _store_contents(out / "tiles.h5"), _store_contents(reference / "tiles.h5")
    assert sorted(got) == sorted(want) == sorted(SLIDES)
    for name, (coords, tiles) in want.items():
        np.testing.assert_array_equal(got[name][0], coords, err_msg=name)
        assert got[name][1] == tiles, name

    # Predictions of the array equal one process's, and slides.csv lists every shard's slides.
    predictions = out / "predictions"
    assert _slides_rows(predictions / "slides.csv") == _slides_rows(
        reference / "predictions" / "slides.csv"
    )
    manifests = sorted(predictions.glob("manifest.shard-*.json"))
    assert [p.name for p in manifests] == [
        f"manifest.shard-{k}-of-{SHARDS}.json" for k in range(1, SHARDS + 1)
    ]
    shards = [json.loads(p.read_text())["shard"] for p in manifests]
    assert shards == [[k, SHARDS] for k in range(1, SHARDS + 1)]


def _job_state(job: str) -> tuple[str, str]:
    """(state, reason) of a pending or running job; ('', '') once it left the queue."""
    result = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True, timeout=30
    )
    line = result.stdout.strip().splitlines()
    return tuple(line[0].split("|", 1)) if line else ("", "")  # type: ignore[return-value]


def test_a_failing_shard_holds_back_the_merge(
    cluster: dict[str, str], cohort: Path, tmp_path: Path
) -> None:
    (tmp_path / "broken.svs").write_bytes(b"II*\x00 not a slide")
    slides = [str(cohort / "slides" / "case0.svs"), str(cohort / "slides" / "case3.svs")]
    cohort_csv = _write_csv(tmp_path / "cohort.csv", [*slides, "broken.svs"])
    out = tmp_path / "run"
    tile = _sbatch(cluster, tmp_path, f"--array=1-{SHARDS}", TEMPLATES / "tile.sbatch",
                   cohort_csv, out, *TILE_ARGS)  # fmt: skip
    merge = _sbatch(cluster, tmp_path, f"--dependency=afterok:{tile}",
                    TEMPLATES / "merge.sbatch", out, SHARDS)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        state = ("", "")
        while time.monotonic() < deadline:
            state = _job_state(merge)
            if state[1] == "DependencyNeverSatisfied" or state[0] in ("", "RUNNING"):
                break
            time.sleep(1)
        assert state == ("PENDING", "DependencyNeverSatisfied"), (state, _logs(tmp_path))
    finally:
        subprocess.run(["scancel", merge], timeout=30)
    assert not (out / "tiles.h5").exists()  # the merge never ran
    # The broken slide's task failed and said why in its shard's report; the others finished.
    reports = {p: json.loads(p.read_text()) for p in out.glob("tiles.shard-*-of-3.h5.report.json")}
    statuses = {r["slide"]: r["status"] for rep in reports.values() for r in rep["slides"]}
    assert statuses["broken"] == "error", reports
    assert _logs(tmp_path).count("broken.svs") >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_under_srun_trains_on_the_merged_store(
    cluster: dict[str, str], array_run: Path, tmp_path: Path
) -> None:
    """train.sbatch: srun starts torchrun, torchrun two CPU ranks (gloo), rank 0 writes."""
    labels = {"case0": "normal", "case1": "tumour", "case3": "normal", "case4": "tumour"}
    splits = {"case0": "train", "case1": "train", "case3": "val", "case4": "val"}
    slide_labels = tmp_path / "labels.csv"
    slide_labels.write_text("slide,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    splits_csv = tmp_path / "splits.csv"
    splits_csv.write_text("slide,split\n" + "".join(f"{k},{v}\n" for k, v in splits.items()))
    env = {**cluster, "NPROC_PER_NODE": "2", "RDZV_PORT": str(_free_port())}
    model = ["--backbone", "resnet18", "--freeze-backbone", "--input-size", "64",
             "--patch-size", "32", "--embed-dim", "32", "--scale-depth", "1", "--patch-depth", "1",
             "--scale-heads", "2", "--patch-heads", "2"]  # fmt: skip
    cmd = ["sbatch", "--wait", "--cpus-per-task=2", "--mem=2G", "--time=10",
           TEMPLATES / "train.sbatch", array_run, "--device", "cpu", *model, "--epochs", "1",
           "--iterations", "2", "--batch-size", "4", "--workers", "0", "--quiet",
           "--slide-labels", slide_labels, "--splits", splits_csv]  # fmt: skip
    result = subprocess.run(
        list(map(str, cmd)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr + _logs(tmp_path)
    train = array_run / "train"
    assert (train / "best.pt").exists()
    report = json.loads((train / "report.json").read_text())
    assert report["throughput"]["world_size"] == 2  # two processes trained, not one
