"""Ablation of the pre-attention interactions (ACP, CAT) on the synthetic grading task.

Run (CPU, small budget):
    .venv/bin/python benchmarks/ablation_interaction.py --seeds 3 --epochs 2 \
        --variants baseline,acp2,cat8
Every variant trains the same small DuoFormer at the same budget (same TrainConfig, same
store, same seeds); the table reports validation/test balanced accuracy as mean +- std over
seeds and train/eval throughput (tiles/s on random input, best of ``--repeats``) relative to
the baseline. Training needs ``histoduo.training``; ``--speed-only`` measures throughput
without it. Results go to ``<work-dir>/ablation_interaction.json`` and stdout (markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from histoduo.models import ModelConfig, build_model  # noqa: E402

# name -> (acp_levels, cat_concepts)
VARIANTS: dict[str, tuple[int, int]] = {
    "baseline": (0, 0),
    "acp1": (1, 0),
    "acp2": (2, 0),
    "acp3": (3, 0),
    "cat4": (0, 4),
    "cat8": (0, 8),
    "cat16": (0, 16),
    "acp2+cat8": (2, 8),
}


def base_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        backbone=args.backbone,
        stages=tuple(int(s) for s in args.stages.split(",")),
        input_size_px=args.tile_size,
        patch_size_px=args.patch_size,
        embed_dim=args.embed_dim,
        scale_depth=args.depth,
        patch_depth=args.depth,
        scale_heads=args.heads,
        patch_heads=args.heads,
        num_classes=4,  # DEFAULT_CLASSES of the synthetic slides
        interaction_in=args.interaction_in,
        patch_block=args.patch_block,
    )


def make_store(work: Path, num_slides: int, tile_size: int) -> Path:
    """Labelled tile store from synthetic slides (cached in ``work``)."""
    from histoduo.slide.sources import SlideSource
    from histoduo.synthetic import DEFAULT_CLASSES, SyntheticSlideSpec, write_synthetic_slide
    from histoduo.tiling import TilingParams, tile_slides

    store = work / "store"
    if store.exists():
        return store
    slides_dir, ann = work / "slides", work / "ANN"
    slides_dir.mkdir(parents=True, exist_ok=True)
    ann.mkdir(exist_ok=True)
    sources = []
    for i in range(num_slides):
        # Small regions so every class is on every slide (splits need each class in train).
        spec = SyntheticSlideSpec(
            level0_width=3072, level0_height=2048, seed=i, region_size_um=200.0
        )
        slide = write_synthetic_slide(slides_dir / f"slide_{i:02d}.svs", spec, workers=1)
        shutil.copy(slide.truth_geojson, ann / f"{slide.path.stem}.geojson")
        sources.append(SlideSource(slide.path))
    tile_slides(
        sources,
        store,
        TilingParams(target_mpp=1.0, tile_size_px=tile_size),
        annotations_dir=ann,
        class_names=list(DEFAULT_CLASSES),
        labelled_only=True,
        workers=1,
        progress=False,
    )
    return store


def _flatten(metrics: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(metrics) and not isinstance(metrics, type):
        metrics = dataclasses.asdict(metrics)
    if not isinstance(metrics, dict):
        return {prefix: metrics}
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def find_balanced_accuracy(metrics: Any, split: str) -> float | None:
    """Balanced accuracy of ``split`` ("val"/"test") from a metrics object of any nesting
    (the training API is new; accept e.g. ``test_balanced_accuracy`` or ``val.bal_acc``)."""
    aliases = ("val", "valid", "validation") if split == "val" else ("test",)
    for key, value in _flatten(metrics).items():
        parts = key.lower().replace(".", "_").split("_")
        balanced = "balanced" in key.lower() or "bal" in parts
        if balanced and any(a in parts for a in aliases) and isinstance(value, int | float):
            return float(value)
    return None


def train_one(
    store: Path, out: Path, config: ModelConfig, seed: int, args: argparse.Namespace
) -> dict[str, float | None]:
    from histoduo.training import TrainConfig, train

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    options: dict[str, Any] = {"seed": seed, "epochs": args.epochs, "batch_size": args.batch_size}
    options.update(json.loads(args.train_options))
    dropped = sorted(k for k in options if k not in known)
    if dropped:
        print(f"  (TrainConfig has no {', '.join(dropped)}; ignored)")
    result = train(
        store,
        out,
        TrainConfig(**{k: v for k, v in options.items() if k in known}),
        model_config=config,
        progress=False,
    )
    return {
        "val": find_balanced_accuracy(result.metrics, "val"),
        "test": find_balanced_accuracy(result.metrics, "test"),
    }


def throughput(config: ModelConfig, batch: int, repeats: int, steps: int) -> tuple[float, float]:
    """(train, eval) tiles/s on random input: best of ``repeats`` runs of ``steps`` steps."""
    torch.manual_seed(0)
    model = build_model(config)
    size = config.input_size_px
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, config.num_classes, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_steps() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def eval_steps() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                model(x)

    rates = []
    for mode, fn in ((True, train_steps), (False, eval_steps)):
        model.train(mode)
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rates.append(batch * steps / best)
    return rates[0], rates[1]


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("ablation_interaction_work"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-options", default="{}", help="JSON of extra TrainConfig fields")
    parser.add_argument("--slides", type=int, default=6, help="synthetic slides in the store")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--interaction-in", default="both", choices=("scale", "patch", "both"))
    parser.add_argument(
        "--patch-block",
        default="prenorm",
        choices=("faithful", "prenorm"),
        help="prenorm: the authors' bare-attention patch blocks diverge on some seeds of this "
        "short run (see ModelConfig.small_cpu), which would drown any module effect",
    )
    parser.add_argument(
        "--scale-grid",
        default="map",
        choices=("map", "window"),
        help="grid of the interactions in scale attention (whole stage map or patch window)",
    )
    parser.add_argument("--speed-batch", type=int, default=16)
    parser.add_argument("--speed-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-only", action="store_true", help="skip training")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import histoduo.models.duoformer as duoformer

    duoformer.SCALE_INTERACTION_GRID = args.scale_grid  # read when a model is built
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")  # everything is relative to it
    args.work_dir.mkdir(parents=True, exist_ok=True)
    base = base_config(args)

    if not args.speed_only:
        try:
            import histoduo.training  # noqa: F401
        except ImportError as err:
            parser.error(f"training needs histoduo.training ({err}); use --speed-only")
    store = None if args.speed_only else make_store(args.work_dir, args.slides, args.tile_size)
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        acp, cat = VARIANTS[name]
        config = base.replace(acp_levels=acp, cat_concepts=cat)
        train_rate, eval_rate = throughput(config, args.speed_batch, args.repeats, args.speed_steps)
        row: dict[str, Any] = {"config": config.to_dict(), "train_tiles_s": train_rate,
                               "eval_tiles_s": eval_rate, "runs": []}  # fmt: skip
        print(f"{name}: train {train_rate:.1f} tiles/s, eval {eval_rate:.1f} tiles/s", flush=True)
        if store is not None:
            for seed in range(args.seeds):
                out = args.work_dir / "runs" / f"{name}_seed{seed}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                metrics = train_one(store, out, config, seed, args)
                metrics["seconds"] = time.perf_counter() - start
                row["runs"].append(metrics)
                print(f"  seed {seed}: {metrics}", flush=True)
        rows[name] = row

    ref = rows["baseline"]
    print("\n| variant | val bal. acc | test bal. acc | train tiles/s | eval tiles/s |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        val = [r["val"] for r in row["runs"] if r.get("val") is not None]
        test = [r["test"] for r in row["runs"] if r.get("test") is not None]
        print(
            f"| {name} | {_stats(val)} | {_stats(test)} "
            f"| {row['train_tiles_s']:.1f} ({row['train_tiles_s'] / ref['train_tiles_s']:.2f}x) "
            f"| {row['eval_tiles_s']:.1f} ({row['eval_tiles_s'] / ref['eval_tiles_s']:.2f}x) |"
        )
    report = args.work_dir / "ablation_interaction.json"
    report.write_text(json.dumps({"args": vars(args) | {"work_dir": str(args.work_dir)},
                                  "variants": rows}, indent=2, default=str))  # fmt: skip
    print(f"\nwrote {report}")


if __name__ == "__main__":
    main()
