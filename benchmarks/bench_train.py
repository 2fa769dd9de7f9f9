"""Training throughput: the full histoduo pipeline vs. a bare loop over tensors in memory.

    python benchmarks/bench_train.py                      # 64 px tiles, 64 px input
    python benchmarks/bench_train.py --tile-size 224      # 224 px tiles and input

Both loops train the same model (a small DuoFormer: ResNet-18 stages 2-4, embed_dim 64, one
scale and one patch block, 4 heads - about what a CPU can train) with the same batch size,
optimizer (AdamW), OneCycle schedule, loss and ``loss.item()`` per step, the same torch thread
count, and the same number of timed iterations after untimed warm-up iterations:

  bare       one batch of normalised float tensors, already in memory, stepped repeatedly
  pipeline   what ``histoduo.training.train`` runs: BalancedBatches sampler -> DataLoader
             (histoduo's own ``_loader``) -> TileBatches (HDF5 read, JPEG decode) ->
             TrainTransform (flips, 90 degree turns, brightness/contrast, normalise) -> step

for DataLoader workers 0, 1, 2, interleaved with bare runs (shared hosts drift). Printed:
images/s of each, the pipeline / bare ratio (goal >= 0.90 on 2 cores) and, to explain a gap,
the per-batch cost of each pipeline stage measured in this process (read+decode, augment,
step), and the machine's load average before and after. The synthetic labelled store is
made like tests/test_train.py's ``labelled_store``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_store(folder: Path, n_slides: int, tile_px: int) -> Path:
    """Synthetic slides tiled at 0.5 um/px with labels from their ground-truth annotations."""
    from histoduo.slide.sources import SlideSource
    from histoduo.synthetic import DEFAULT_CLASSES, SyntheticSlideSpec, write_synthetic_slide
    from histoduo.tiling import TilingParams, tile_slides

    store = folder / f"tiles_{tile_px}.h5"
    if store.exists():
        return store
    annotations = folder / "annotations"
    annotations.mkdir(exist_ok=True)
    side = max(3072, tile_px * 48)  # enough tiles per class at large tile sizes
    sources = []
    for index in range(n_slides):
        path = folder / f"slide_{index}_{side}.svs"
        spec = SyntheticSlideSpec(level0_width=side, level0_height=side * 2 // 3, seed=40 + index)
        slide = write_synthetic_slide(path, spec, workers=1)
        shutil.copyfile(slide.truth_geojson, annotations / f"{path.stem}.geojson")
        sources.append(SlideSource(slide.path))
    tile_slides(
        sources, store, TilingParams(target_mpp=0.5, tile_size_px=tile_px),
        annotations_dir=annotations, class_names=list(DEFAULT_CLASSES), labelled_only=True,
        progress=False,
    )  # fmt: skip
    return store


class Stepper:
    """The training step of histoduo.training.loop on a fresh, identically seeded model."""

    def __init__(self, model_config: Any, total_steps: int, channels_last: bool = True) -> None:
        from histoduo.models import build_model

        torch.manual_seed(0)
        self.model = build_model(model_config)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=1e-4, total_steps=total_steps
        )
        self.criterion = torch.nn.CrossEntropyLoss()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = self.criterion(self.model(x).float(), y)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def run_bare(model_config: Any, batch: int, warmup: int, iterations: int) -> float:
    """images/s of the step alone, on one normalised batch held in memory."""
    stepper = Stepper(model_config, warmup + iterations)
    size = model_config.input_size_px
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model_config.num_classes, (batch,))
    for _ in range(warmup):
        stepper(x, y)
    start = time.perf_counter()
    for _ in range(iterations):
        stepper(x, y)
    return batch * iterations / (time.perf_counter() - start)


def _pipeline_parts(store: Path, model_config: Any, batch: int, n_batches: int, workers: int):  # noqa: ANN202
    from histoduo.models.backbone import input_normalization
    from histoduo.store import TileStore
    from histoduo.training.augment import TrainTransform
    from histoduo.training.config import AugmentConfig
    from histoduo.training.data import BalancedBatches, TileBatches, tile_table
    from histoduo.training.loop import _loader

    table = tile_table(TileStore(store)).frame
    mean, std = (list(v) for v in input_normalization(model_config.backbone))
    transform = TrainTransform(AugmentConfig(), model_config.input_size_px, mean, std)
    dataset = TileBatches(
        store,
        table["slide"].to_numpy(),
        table["tile"].to_numpy(),
        table["label"].to_numpy(),
        transform,
    )
    sampler = BalancedBatches(table["label"].to_numpy(), batch, n_batches, seed=0)
    return dataset, sampler, (_loader(dataset, sampler, workers) if workers >= 0 else None)


def run_pipeline(
    store: Path, model_config: Any, batch: int, warmup: int, iterations: int, workers: int
) -> float:
    """images/s of sampler -> DataLoader -> read/decode -> augment -> step, warm-up excluded
    (it also absorbs the workers' start-up and the prefetch queue filling)."""
    total = warmup + iterations
    _, _, loader = _pipeline_parts(store, model_config, batch, total, workers)
    stepper = Stepper(model_config, total)
    start = 0.0
    for number, (x, y) in enumerate(loader, start=1):
        stepper(x, y)
        if number == warmup:
            start = time.perf_counter()
    rate = batch * iterations / (time.perf_counter() - start)
    del loader  # ends persistent workers before the next measurement
    return rate


def stage_costs_ms(store: Path, model_config: Any, batch: int, repeats: int) -> dict[str, float]:
    """Median per-batch ms of each pipeline stage, serially in this process."""
    from histoduo.models.preprocess import to_tensor_batch

    dataset, sampler, _ = _pipeline_parts(store, model_config, batch, repeats + 2, -1)
    stepper = Stepper(model_config, repeats + 2)
    times: dict[str, list[float]] = {"read+decode": [], "augment": [], "step": []}
    for seed, rows in sampler:
        t0 = time.perf_counter()
        tiles = dataset.read(rows)
        t1 = time.perf_counter()
        x = dataset.transform(to_tensor_batch(tiles), torch.Generator().manual_seed(seed))
        t2 = time.perf_counter()
        stepper(x, torch.as_tensor(dataset.labels[np.asarray(rows)], dtype=torch.long))
        t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(value * 1e3)
    return {key: statistics.median(values[2:]) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tile-size", type=int, default=64, help="tile = model input, px")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations")
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader workers to try")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--store-dir", type=Path, default=None, help="reuse/keep the store here")
    args = parser.parse_args()

    from _measure import print_load

    from histoduo.models import ModelConfig

    print_load("before")
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    torch.set_num_threads(threads)
    folder = args.store_dir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = make_store(folder, args.slides, args.tile_size)
    print(f"store {store} ({time.perf_counter() - t0:.0f} s to make)", flush=True)
    model_config = ModelConfig(
        backbone="resnet18", input_size_px=args.tile_size, patch_size_px=32, stages=(2, 3, 4),
        embed_dim=64, scale_depth=1, patch_depth=1, scale_heads=4, patch_heads=4, num_classes=4,
    )  # fmt: skip
    print(
        f"{cores} cores, torch threads {threads}, batch {args.batch_size}, "
        f"{args.tile_size} px, {args.warmup} warm-up + {args.iterations} timed iterations, "
        f"{args.rounds} rounds",
        flush=True,
    )
    costs = stage_costs_ms(store, model_config, args.batch_size, 10)
    total = sum(costs.values())
    print(
        "per batch, serial: "
        + ", ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in costs.items()),
        flush=True,
    )

    worker_counts = [int(w) for w in args.workers.split(",")]
    bare: list[float] = []
    piped: dict[int, list[float]] = {w: [] for w in worker_counts}
    for round_number in range(args.rounds):
        bare.append(run_bare(model_config, args.batch_size, args.warmup, args.iterations))
        print(f"round {round_number + 1}: bare {bare[-1]:.1f} img/s", flush=True)
        for workers in worker_counts:
            rate = run_pipeline(
                store, model_config, args.batch_size, args.warmup, args.iterations, workers
            )
            piped[workers].append(rate)
            print(f"round {round_number + 1}: pipeline, {workers} workers {rate:.1f} img/s",
                  flush=True)  # fmt: skip
    bare.append(run_bare(model_config, args.batch_size, args.warmup, args.iterations))
    reference = statistics.median(bare)
    print(f"\nbare loop: {reference:.1f} images/s (median of {len(bare)}: "
          f"{', '.join(f'{b:.1f}' for b in bare)})")  # fmt: skip
    best = max(worker_counts, key=lambda w: statistics.median(piped[w]))
    for workers in worker_counts:
        rate = statistics.median(piped[workers])
        mark = "  <- best" if workers == best else ""
        print(
            f"pipeline, {workers} workers: {rate:.1f} images/s, ratio {rate / reference:.3f} "
            f"(cost {1 - rate / reference:+.1%}){mark}"
        )
    ratio = statistics.median(piped[best]) / reference
    verdict = "meets" if ratio >= 0.90 else "misses"
    print(f"goal pipeline >= 0.90 x bare: {verdict} ({ratio:.3f} with {best} workers)")
    print_load("after")
    if args.store_dir is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
