"""Two gloo processes train exactly what one process trains on the same global batches.

torchrun (``python -m torch.distributed.run``) starts this file as a script on two CPU
ranks; every rank draws the same global batch and keeps half of it, and DDP averages the
gradients, so the weights must match a one-process run on the whole batch.

What makes the comparison exact, and why:
- ``freeze_backbone=True``: the backbone's BatchNorm stays in eval mode. Trained with batch
  statistics, each rank would normalise its half-batch by that half's mean and variance and
  the two runs would legitimately differ (SyncBatchNorm would fix that, but it needs a GPU).
  The default ``learned`` scale token and the transformer blocks have no BatchNorm.
- Augmentation off: each rank draws its augmentation from a seed of (run, epoch, batch,
  rank), so with augmentation on a tile is augmented differently from the one-process run.
- Batch size divisible by the world size, so DDP's average of the per-rank mean losses is
  the mean over the global batch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from histoduo.models import ModelConfig, build_model
from histoduo.models.checkpoint import load_checkpoint
from histoduo.synthetic import DEFAULT_CLASSES
from histoduo.training import TrainConfig, train
from histoduo.training.config import AugmentConfig
from histoduo.training.loop import _seed_everything

TINY = ModelConfig(
    backbone="resnet18", input_size_px=64, patch_size_px=32, stages=(2, 3, 4), embed_dim=32,
    scale_depth=1, patch_depth=1, scale_heads=2, patch_heads=2, freeze_backbone=True,
)  # fmt: skip
SEEDS = (45, 42, 46)
TIMEOUT_S = 120


def _config(store: Path) -> TrainConfig:
    return TrainConfig(
        epochs=1, iterations_per_epoch=3, batch_size=8, lr=1e-4, num_workers=0, device="cpu",
        splits_csv=str(store.parent / "splits.csv"), seed=0,
        augment=AugmentConfig(flips=False, rotate90=False, brightness=0.0, contrast=0.0),
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic slides tiled at 0.5 um/px, 64 px, labels from their ground truth."""
    from histoduo.slide.sources import SlideSource
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide
    from histoduo.tiling import TilingParams, tile_slides

    folder = tmp_path_factory.mktemp("ddp_store")
    annotations = folder / "annotations"
    annotations.mkdir()
    sources = []
    for seed in SEEDS:  # slide 45 has tiles of all four classes
        spec = SyntheticSlideSpec(level0_width=2048, level0_height=1536, seed=seed)
        slide = write_synthetic_slide(folder / f"slide_{seed}.svs", spec, workers=1)
        shutil.copyfile(slide.truth_geojson, annotations / f"slide_{seed}.geojson")
        sources.append(SlideSource(slide.path))
    store = folder / "tiles.h5"
    tile_slides(
        sources, store, TilingParams(target_mpp=0.5, tile_size_px=64),
        annotations_dir=annotations, class_names=list(DEFAULT_CLASSES), labelled_only=True,
        workers=1, progress=False,
    )  # fmt: skip
    (folder / "splits.csv").write_text(
        "slide,split\nslide_45,train\nslide_42,train\nslide_46,val\n"
    )
    return store


def test_two_processes_match_one(small_store: Path, tmp_path: Path) -> None:
    one = train(
        small_store, tmp_path / "one", _config(small_store), model_config=TINY, progress=False
    )

    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", env["MASTER_ADDR"], "--master-port", env["MASTER_PORT"],
        __file__, str(small_store), str(tmp_path / "two"),
    ]  # fmt: skip
    # A session of its own, so a stuck rank can be killed together with the launcher.
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = launcher.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    assert launcher.returncode == 0, output[-4000:]

    a = load_checkpoint(one.last_checkpoint)["model_state"]
    b = load_checkpoint(tmp_path / "two" / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), atol=1e-5, rtol=1e-4), key
    # ... and training moved the weights: this is no comparison of two untouched models.
    _seed_everything(0)
    initial = build_model(TINY.replace(num_classes=len(DEFAULT_CLASSES))).state_dict()
    moved = [k for k, v in a.items() if not torch.equal(v, initial[k])]
    assert any(k.startswith("head") for k in moved), moved
    assert not any(k.startswith("backbone") and "running" not in k for k in moved)
    # The loss in metrics.csv is over all ranks, so it matches the one-process loss.
    loss_one = pd.read_csv(one.run_dir / "metrics.csv")["train_loss"]
    loss_two = pd.read_csv(tmp_path / "two" / "metrics.csv")["train_loss"]
    assert loss_one.to_numpy() == pytest.approx(loss_two.to_numpy(), rel=1e-4)
    for name in ("config.json", "splits.csv", "best.pt", "report.json", "confusion_val.png"):
        assert (tmp_path / "two" / name).exists(), name
    assert "rank 1 returned" in output  # the final report reached every rank


def _worker(store: str, out: str) -> None:
    """One rank of the torchrun launch (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    result = train(store, out, _config(Path(store)), model_config=TINY, progress=False)
    rank = int(os.environ["RANK"])
    print(f"rank {rank} returned {sorted(result.metrics)}", flush=True)
    assert result.metrics["val_balanced_accuracy"] is not None


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
