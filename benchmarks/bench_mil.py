"""train-mil throughput and memory on a synthetic feature cohort.

    python benchmarks/bench_mil.py                                   # 500 x 4,000 x 1,024
    python benchmarks/bench_mil.py --slides 60 --tiles 2000 --dim 512  # a 2-core machine

Writes ``--slides`` feature files (TRIDENT layout, float16, ``--tiles`` x ``--dim`` each; one
slide in memory at a time), then:

  read       every training slide's file read with ``read_feature_bag`` (what the training
             DataLoader does per bag), warm page cache, in this process: tiles/s
  train-mil  one epoch of ``train_mil`` (abmil by default) in a child process, its tiles/s
             from metrics.csv, and the peak resident memory of the child and its DataLoader
             workers (sampled from /proc)

Goals: train tiles/s >= 80 % of read tiles/s (the model keeps up with the disk), and peak
memory < 2 GiB whatever the cohort size (bags stream one at a time). The load average before
and after is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def write_cohort(folder: Path, slides: int, tiles: int, dim: int, seed: int) -> Path:
    """Feature files whose high-grade slides carry a few shifted tiles, and slides.csv."""
    from histoduo.store.features import FeatureInfo, feature_dir, write_feature_file

    features_dir = feature_dir(folder, "bench")
    labels = folder / "slides.csv"
    if labels.is_file():
        return features_dir
    rng = np.random.default_rng(seed)
    shift = rng.standard_normal(dim).astype(np.float32)
    side = int(np.ceil(np.sqrt(tiles)))
    grid = np.stack(np.divmod(np.arange(tiles), side)[::-1], axis=1).astype(np.int64) * 256
    rows = ["slide,label,patient"]
    for i in range(slides):
        name = f"slide_{i:04d}"
        label = "high_grade" if i % 2 else "low_grade"
        features = rng.standard_normal((tiles, dim), dtype=np.float32)
        if label == "high_grade":
            features[rng.choice(tiles, size=max(1, tiles // 200), replace=False)] += 3 * shift
        info = FeatureInfo(
            slide=name, encoder="bench", embedding_dim=dim, mpp=0.5, input_size_px=224
        )
        write_feature_file(features_dir / f"{name}.h5", info, features, grid)
        rows.append(f"{name},{label},patient_{i:04d}")
    labels.write_text("\n".join(rows) + "\n")
    return features_dir


def read_rate(paths: list[Path]) -> float:
    """Tiles/s of reading the files as the training dataset does (float16 -> float32)."""
    from histoduo.store.features import read_feature_bag

    tiles, started = 0, time.perf_counter()
    for path in paths:
        tiles += len(read_feature_bag(path).features)
    return tiles / (time.perf_counter() - started)


def bare_rate(paths: list[Path], args: argparse.Namespace, steps: int) -> float:
    """Tiles/s of the same model stepping on bags already in memory (8 bags, cycled): the
    compute alone, with no reading, sampling, checkpoints or validation."""
    import torch

    from histoduo.models.mil import MILModelConfig, build_mil_model
    from histoduo.store.features import read_feature_bag

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bags = [torch.from_numpy(read_feature_bag(p).features) for p in paths[:8]]
    config = MILModelConfig(aggregator=args.aggregator, in_dim=args.dim, n_classes=2)
    model = build_mil_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    tiles, started = 0, time.perf_counter()
    for step in range(steps):
        bag = bags[step % len(bags)]
        logits, _ = model(bag)
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([step % 2]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())
        tiles += len(bag)
    return tiles / (time.perf_counter() - started)


def train_child(args: argparse.Namespace) -> None:
    from histoduo.training.mil import MILConfig, train_mil

    train_mil(
        MILConfig(
            features_dir=Path(args.features_dir),
            labels_csv=Path(args.labels),
            out_dir=Path(args.run),
            aggregator=args.aggregator,
            epochs=args.epochs,
            num_workers=args.workers,
            threads=args.threads,
            device=args.device,
            early_stopping_patience=None,
        ),
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=500)
    parser.add_argument("--tiles", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--aggregator", default="abmil")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--folder", type=Path, default=None, help="keep the cohort here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--features-dir", help=argparse.SUPPRESS)
    parser.add_argument("--labels", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train_child(args)
        return

    from _measure import peak_tree_rss_gib

    print(f"load average before: {os.getloadavg()}")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench_mil_"))
    started = time.perf_counter()
    features_dir = write_cohort(folder, args.slides, args.tiles, args.dim, args.seed)
    size_gib = sum(p.stat().st_size for p in features_dir.glob("*.h5")) / 2**30
    print(
        f"cohort: {args.slides} slides x {args.tiles} tiles x {args.dim} dims float16, "
        f"{size_gib:.2f} GiB on disk in {folder} ({time.perf_counter() - started:.0f} s to write)"
    )
    run = folder / f"run_{args.aggregator}"
    command = [
        sys.executable, __file__, "--child", "--features-dir", str(features_dir),
        "--labels", str(folder / "slides.csv"), "--run", str(run),
        "--aggregator", args.aggregator, "--epochs", str(args.epochs),
        "--workers", str(args.workers), "--device", args.device,
    ]  # fmt: skip
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    started = time.perf_counter()
    peak_gib = peak_tree_rss_gib(command)
    total_s = time.perf_counter() - started
    metrics = np.genfromtxt(run / "metrics.csv", delimiter=",", names=True)
    train_rate = float(np.atleast_1d(metrics["train_tiles_per_s"])[-1])
    epoch_s = float(np.atleast_1d(metrics["train_seconds"])[-1])
    splits = (run / "splits.csv").read_text().splitlines()[1:]
    train_slides = [line.split(",")[0] for line in splits if line.split(",")[1] == "train"]
    rate = read_rate([features_dir / f"{s}.h5" for s in train_slides])
    bare = bare_rate([features_dir / f"{s}.h5" for s in train_slides], args, len(train_slides))
    report = json.loads((run / "report.json").read_text())
    print(f"read only:   {rate:,.0f} tiles/s ({len(train_slides)} training slides)")
    print(f"train-mil:   {train_rate:,.0f} tiles/s, last epoch {epoch_s:.1f} s ({args.aggregator})")
    print(f"bare model:  {bare:,.0f} tiles/s (same model on 8 bags in memory: compute alone)")
    print(f"ratio:       {train_rate / rate:.2f} of read speed (goal >= 0.80)")
    print(f"ratio:       {train_rate / bare:.2f} of the bare model (streaming overhead)")
    print(f"peak memory: {peak_gib:.2f} GiB, train-mil process tree (goal < 2 GiB)")
    print(f"whole run (epochs, val + test report, attention.csv): {total_s:.0f} s")
    print(f"test balanced accuracy {report['test']['balanced_accuracy']:.3f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
