"""End-to-end `predict` tiles/s against model-forward-only tiles/s, measured in one run.

    python benchmarks/bench_predict.py                      # small DuoFormer, 224 px, CPU
    python benchmarks/bench_predict.py --model tiny         # 64 px toy model (I/O bound)
    python benchmarks/bench_predict.py --device cuda --model paper --batch 256

For one synthetic slide:
  forward-only  the same tiles, read and transformed beforehand and held in memory, through
                the same TilePredictor (model, batch, precision, threads)
  end-to-end    `predict_run` as the CLI calls it: tissue detection, tiling from the
                checkpoint, reader processes reading the slide, the model, and every output
                (CSV, scores, GeoJSON and the maps: heatmaps are on by default, ~5 s a slide
                on 2 cores, a fixed cost that a 175-tile slide feels and a real one does not)
and the peak memory of `histoduo predict` on two slide sizes: the process tree's summed RSS
(the goal's measure: < 1 GiB, flat in slide size), its summed PSS (shared library pages
counted once), the share of each process (main, fork server, DataLoader worker), and the
model's own share (its weights, and the activations of one forward measured in this process).
Goal on 2 cores with a small model: end-to-end >= 90% of forward-only. The machine's load
average is printed before and after: a load above the core count means shared cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import peak_tree_memory, print_load  # noqa: E402

CLASSES = ["normal", "low_grade", "high_grade", "necrosis"]

MODELS = {
    # ~1.5 GFLOPs/tile: the kind of model that runs on CPU
    "small": dict(
        backbone="resnet18",
        input_size_px=224,
        patch_size_px=32,
        stages=(2, 3, 4),
        embed_dim=256,
        scale_depth=2,
        patch_depth=2,
        scale_heads=4,
        patch_heads=4,
    ),
    # the authors' configuration (GPU)
    "paper": dict(backbone="resnet50", input_size_px=224),
    # a toy: faster than one core can read tiles, so bound by I/O by construction
    "tiny": dict(
        backbone="resnet18",
        input_size_px=64,
        patch_size_px=32,
        embed_dim=32,
        scale_depth=1,
        patch_depth=1,
        scale_heads=2,
        patch_heads=2,
    ),
}


def _checkpoint(path: Path, model: str, mpp: float) -> Path:
    from _measure import untrained_checkpoint

    from histoduo.models import ModelConfig

    config = ModelConfig(arch="duoformer", num_classes=len(CLASSES), **MODELS[model])
    return untrained_checkpoint(path, config, CLASSES, mpp, config.input_size_px)


def _slide(folder: Path, size: int) -> Path:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    path = folder / f"predict_{size}.svs"
    if not path.exists():
        write_synthetic_slide(
            path, SyntheticSlideSpec(level0_width=size, level0_height=size, seed=5)
        )
    return path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """This process's peak RSS while the block runs, sampled in a thread."""

    def __enter__(self) -> _PeakRss:
        self.before = self.peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def _forward_only(ckpt: Path, slide_path: Path, params) -> tuple[float, int, dict]:  # noqa: ANN001
    """tiles/s of the model alone on the slide's tiles, already in memory, and the model's
    memory: weights (parameter bytes) and the RSS its forwards added above the held batches."""
    import torch

    from histoduo.models.checkpoint import load_model
    from histoduo.predict import SlideTiles, TilePredictor, tiling_for
    from histoduo.slide import open_slide
    from histoduo.tiling import TileGeometry, plan_tiles
    from histoduo.tissue import detect_tissue

    model, meta = load_model(ckpt)
    predictor = TilePredictor(model, meta, params)
    tiling = tiling_for(meta, params, lambda _: None)
    with open_slide(slide_path) as slide:
        geometry = TileGeometry.for_slide(slide, tiling)
        mask = detect_tissue(slide, tiling.tissue)
        coords, _ = plan_tiles(mask, geometry, *slide.dimensions, tiling.min_tissue_fraction)
    tiles = SlideTiles(
        str(slide_path),
        "auto",
        None,
        coords,
        geometry.read_level,
        geometry.read_size_px,
        tiling.tile_size_px,
        predictor.batch_size,
        predictor.transform,
    )
    from histoduo.runtime.decode import model_batch

    device = predictor.runtime.device
    # Model-ready batches on the device (on a GPU, decoded and normalised there beforehand).
    batches = [model_batch(x, device, predictor.transform.finish) for _, x in tiles]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with _PeakRss() as first:
        predictor.forward(batches[0])  # warm-up (its peak: the activations of one forward)
    t0 = time.perf_counter()
    for x in batches:
        predictor.forward(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = len(coords) / (time.perf_counter() - t0)
    model_memory = {"weights": weights, "forward": first.peak - first.before}
    return rate, len(coords), model_memory


def _end_to_end(ckpt: Path, slide_path: Path, params, out: Path) -> tuple[float, int]:  # noqa: ANN001
    from histoduo.models.checkpoint import load_model
    from histoduo.predict import predict_run
    from histoduo.slide.sources import SlideSource

    loaded = load_model(ckpt)  # loading weights is not tile work; the CLI does it once per run
    t0 = time.perf_counter()
    report = predict_run(
        ckpt, out, params, sources=[SlideSource(slide_path)], overwrite=True, model_and_meta=loaded
    )
    seconds = time.perf_counter() - t0
    n = report.outcomes[0].n_tiles
    return n / seconds, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="default: predict's default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--size",
        type=int,
        default=16384,
        help="slide side in level-0 px (small slides measure mostly one-off start-up)",
    )
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=(8192, 16384))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    from histoduo.predict import PredictParams

    print_load("before")
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(args.cache / f"bench_{args.model}.pt", args.model, mpp=0.5)
    params = PredictParams(
        device=args.device, batch_size=args.batch, workers=args.workers, torch_threads=args.threads
    )
    slide_path = _slide(args.cache, args.size)
    forward, n, model_memory = _forward_only(ckpt, slide_path, params)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        pipeline, n2 = _end_to_end(ckpt, slide_path, params, Path(tmp))
    assert n == n2, (n, n2)
    print(f"{args.model} DuoFormer on {slide_path.name}: {n} tiles, device {args.device}")
    print(f"forward-only  {forward:8.1f} tiles/s")
    print(
        f"end-to-end    {pipeline:8.1f} tiles/s  = {pipeline / forward:.0%} of forward-only "
        f"(goal >= 90%)"
    )
    batch = params.batch_size or "default"
    print(
        f"the model's own memory: weights {model_memory['weights'] / 2**20:.0f} MiB, "
        f"one forward (loader batch {batch}) {model_memory['forward'] / 2**20:.0f} MiB of RSS"
    )

    if not args.skip_memory:
        for size in args.memory_sizes:
            path = _slide(args.cache, size)
            with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
                cmd = [
                    sys.executable,
                    "-m",
                    "histoduo",
                    "predict",
                    str(path),
                    "--model",
                    str(ckpt),
                    "--out",
                    tmp,
                    "--device",
                    args.device,
                    "--quiet",
                ]
                peak = peak_tree_memory(cmd)
            roles = ", ".join(
                f"{name} {rss:.2f} (PSS {pss:.2f})" for name, (rss, pss) in peak["roles"].items()
            )
            print(
                f"peak memory of `histoduo predict` on {size}x{size}: RSS sum "
                f"{peak['rss_gib']:.2f} GiB (goal < 1), PSS sum {peak['pss_gib']:.2f} GiB; "
                f"at the RSS peak, GiB: {roles}"
            )
    print_load("after")


if __name__ == "__main__":
    main()
