"""GPU throughput of histoduo in one run, every figure against a reference from the same run.

    python benchmarks/bench_gpu.py                 # ~6-7 minutes on one GPU
    python benchmarks/bench_gpu.py --json bench-gpu.json

On a machine without CUDA it prints "no CUDA device" and exits 0 (nothing is written).
``--smoke`` runs every part on the CPU at toy sizes (64 px tiles, a 3072 x 2048 slide): it
checks the script, not the speed.

What it measures, in order (untrained models saved as histoduo checkpoints; no downloads):
  1. dense bf16 matmul TFLOP/s                      the GPU's practical limit
  2. DuoFormer paper config forward tiles/s          batch sweep, bf16 weights, channels_last;
     DuoFormer small config, ResNet-50               utilisation = tiles/s x FLOPs/tile / (1)
                                                     (FLOPs from histoduo.models.info)
  3. `evaluate` end-to-end on a synthetic JPEG store vs forward-only on as many tiles
     (goal >= 90%): HDF5 read in workers, nvJPEG decode + normalisation on the GPU, model,
     metrics
  4. `predict` end-to-end on a synthetic 40,000 x 30,000 px slide (0.5 um/px) vs forward-only
     on its tiles (goal >= 90%): tissue detection, tiling, workers reading the slide, the
     model, every output file
  5. peak GPU memory (torch's allocator) of each part

The synthetic slide is written by a subprocess started first, so it is rendered on the CPUs
while parts 1-2 use the GPU. Each part has a time budget; the run is sized to finish in
under 8 minutes on an H100/H200-class GPU with 16 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's histoduo

CLASSES = ["normal", "low_grade", "high_grade", "necrosis"]
TARGET_MPP = 0.5


@dataclass(frozen=True)
class Sizes:
    """What the run measures on: the real run, or the CPU smoke test of the script."""

    device: str = "cuda"
    tile_px: int = 224
    slide_w: int = 40_000
    slide_h: int = 30_000
    slide_mpp: float = 0.5  # a 20x scan: tiles are read at level 0 without resampling
    matmul_n: int = 8192
    matmul_s: float = 4.0
    batches: tuple[tuple[int, ...], ...] = ((64, 128, 256, 512), (256, 1024), (256, 512))
    forward_s: float = 3.0
    eval_work_s: float = 25.0  # forward-only seconds of tiles in the evaluate store
    min_tiles: int = 2048
    toy_models: bool = False  # the smoke test: one toy DuoFormer under all three names

    @classmethod
    def smoke(cls) -> Sizes:
        return cls("cpu", 64, 1536, 1024, 0.5, 256, 0.2, ((2, 4), (4,), (4,)), 0.2, 0.0, 48, True)


def _configs(sizes: Sizes) -> dict[str, Any]:
    from histoduo.models import ModelConfig

    n, px = len(CLASSES), sizes.tile_px
    if sizes.toy_models:
        toy = ModelConfig(
            arch="duoformer", backbone="resnet18", num_classes=n, input_size_px=px,
            patch_size_px=32, embed_dim=32, scale_depth=1, patch_depth=1, scale_heads=2,
            patch_heads=2,
        )  # fmt: skip
        return dict.fromkeys(("duoformer-paper", "duoformer-small", "resnet50"), toy)
    return {
        "duoformer-paper": ModelConfig(
            arch="duoformer", backbone="resnet50", num_classes=n, input_size_px=px
        ),
        "duoformer-small": ModelConfig.small_cpu(num_classes=n, input_size_px=px),
        "resnet50": ModelConfig(
            arch="resnet", backbone="resnet50", num_classes=n, input_size_px=px
        ),
    }


def _checkpoint(path: Path, config: Any, sizes: Sizes) -> Path:
    from _measure import untrained_checkpoint

    return untrained_checkpoint(path, config, CLASSES, TARGET_MPP, sizes.tile_px)


def _slide_spec(sizes: Sizes) -> Any:
    from histoduo.synthetic import SyntheticSlideSpec

    return SyntheticSlideSpec(
        level0_width=sizes.slide_w, level0_height=sizes.slide_h, mpp=sizes.slide_mpp, seed=7
    )


def _start_slide_writer(path: Path, sizes: Sizes, workers: int) -> subprocess.Popen | None:
    """Render the big slide in another process (CPU) while this one uses the GPU."""
    if path.exists():
        return None
    code = (
        "import sys; from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide; "
        f"write_synthetic_slide(sys.argv[1], SyntheticSlideSpec(level0_width={sizes.slide_w}, "
        f"level0_height={sizes.slide_h}, mpp={sizes.slide_mpp}, seed=7), workers={workers})"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", code, str(path)], env=env)


class Clock:
    """The run's time budget: parts ask how long they may take."""

    def __init__(self, total_s: float) -> None:
        self.start = time.perf_counter()
        self.total_s = total_s

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def left_s(self) -> float:
        return self.total_s - self.elapsed_s


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(sizes: Sizes) -> float:
    import torch

    n, device = sizes.matmul_n, sizes.device
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < sizes.matmul_s:
        for _ in range(10):
            a @ b
        _sync(device)
        iters += 10
    rate = 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12
    del a, b
    _reset_peak()
    return rate


def _predictor(checkpoint: Path, batch_size: int, device: str, compile_model: bool = False) -> Any:
    from histoduo.models.checkpoint import load_model
    from histoduo.predict import PredictParams, TilePredictor

    model, meta = load_model(checkpoint)
    params = PredictParams(device=device, batch_size=batch_size, compile=compile_model)
    return TilePredictor(model, meta, params)


def forward_rate(predictor: Any, batch_size: int, seconds: float) -> float:
    """tiles/s of TilePredictor.forward on normalised batches already on the device."""
    size = predictor.meta.input_size_px
    x = predictor.runtime.model_input(predictor.runtime.to_device(randn(batch_size, size)))
    for _ in range(3):  # cudnn autotuning, compilation
        predictor.forward(x)
    _sync(predictor.runtime.device.type)
    tiles, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predictor.forward(x)  # returns numpy: synchronises
        tiles += batch_size
    return tiles / (time.perf_counter() - t0)


def randn(batch_size: int, size: int) -> Any:
    import torch

    return torch.randn(batch_size, 3, size, size)


def _peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GiB"


def sweep(checkpoint: Path, batches: tuple[int, ...], sizes: Sizes) -> dict[str, Any]:
    import torch

    rates: dict[int, float | None] = {}
    peaks: dict[int, float | None] = {}
    seconds = sizes.forward_s
    for batch in batches:
        _reset_peak()
        predictor = _predictor(checkpoint, batch, sizes.device)
        try:
            rates[batch] = forward_rate(predictor, batch, seconds)
            peaks[batch] = _peak_gib()
        except torch.cuda.OutOfMemoryError:
            rates[batch] = peaks[batch] = None
        del predictor
    best = max((b for b in rates if rates[b]), key=lambda b: rates[b])  # type: ignore[arg-type]
    return {"tiles_per_s": rates, "peak_gib": peaks, "best_batch": best}


def _tile_pool(n: int, sizes: Sizes) -> list[Any]:
    """JPEG tiles of synthetic tissue (the same renderer as the slides), q90 as tiling."""
    from histoduo.runtime.codec import encode_jpeg
    from histoduo.synthetic import render_region

    px = sizes.tile_px
    side = int(n**0.5) + 1
    spec = _slide_spec(sizes)
    region = render_region(spec, sizes.slide_w // 3, sizes.slide_h // 3, side * px, side * px)
    tiles = []
    for i in range(side):
        for j in range(side):
            tile = region[i * px : (i + 1) * px, j * px : (j + 1) * px]
            tiles.append(encode_jpeg(np.ascontiguousarray(tile), 90))
    return tiles[:n]


def write_store(path: Path, n_tiles: int, sizes: Sizes, n_slides: int = 4) -> Path:
    """A labelled JPEG tile store of ``n_tiles`` 224 px tiles (a pool of real-looking tiles
    repeated: decode cost is that of tissue, not noise)."""
    from histoduo.store import SlideGroupData, SlidePartWriter, assemble_store

    pool = _tile_pool(min(512, n_tiles), sizes)
    TILE_PX = sizes.tile_px  # noqa: N806
    parts = []
    per_slide = -(-n_tiles // n_slides)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for s in range(n_slides):
            n = min(per_slide, n_tiles - s * per_slide)
            name = f"synthetic_{s}"
            coords = np.stack([np.arange(n) * TILE_PX, np.zeros(n, int)], axis=1)
            data = SlideGroupData(
                name=name,
                source_path=f"{name}.svs",
                coords=coords,
                tissue_fraction=np.ones(n, np.float32),
                attrs={
                    "tile_size_px": TILE_PX,
                    "target_mpp": TARGET_MPP,
                    "slide_mpp": sizes.slide_mpp,
                    "tile_size_level0": TILE_PX,
                    "stride_level0": TILE_PX,
                    "level0_width": int(n * TILE_PX),
                    "level0_height": TILE_PX,
                },
                coords_attrs={},
                thumbnail=np.zeros((8, 8, 3), np.uint8),
                tissue_mask=np.ones((8, 8), bool),
                mask_downsample=1.0,
                labels=(np.arange(n) % len(CLASSES)).astype(np.int16),
            )
            part = Path(tmp) / f"{name}.h5"
            writer = SlidePartWriter(part, data, "jpeg", TILE_PX)
            for start in range(0, n, 1024):
                stop = min(start + 1024, n)
                writer.append([pool[i % len(pool)] for i in range(start, stop)])
            parts.append((writer.commit(), name))
        assemble_store(path, parts, class_names=CLASSES)
    return path


def bench_evaluate(
    store: Path, checkpoint: Path, batch: int, forward: float, sizes: Sizes
) -> dict[str, Any]:
    from histoduo.training import evaluate

    _reset_peak()
    t0 = time.perf_counter()
    report = evaluate(store, checkpoint, device=sizes.device, batch_size=batch)
    seconds = time.perf_counter() - t0
    rate = report["n_tiles"] / seconds
    return {
        "tiles": report["n_tiles"],
        "seconds": seconds,
        "end_to_end_tiles_per_s": rate,
        "loop_tiles_per_s": report["throughput"]["tiles_per_s"],
        "forward_tiles_per_s": forward,
        "ratio": rate / forward,
        "decode": report["throughput"]["decode"],
        "peak_gib": _peak_gib(),
    }


def bench_predict(slide: Path, checkpoint: Path, batch: int, sizes: Sizes) -> dict[str, Any]:
    from histoduo.models.checkpoint import load_model
    from histoduo.predict import PredictParams, predict_run
    from histoduo.slide.sources import SlideSource

    _reset_peak()
    loaded = load_model(checkpoint)  # weights load once per run, not per slide
    params = PredictParams(device=sizes.device, batch_size=batch)
    with tempfile.TemporaryDirectory(dir=slide.parent) as out:
        t0 = time.perf_counter()
        report = predict_run(
            checkpoint,
            out,
            params,
            sources=[SlideSource(slide)],
            overwrite=True,
            model_and_meta=loaded,
        )
        wall = time.perf_counter() - t0
        manifest = json.loads(Path(report.manifest_path).read_text())
    outcome = report.outcomes[0]
    peak = _peak_gib()
    forward = forward_rate(_predictor(checkpoint, batch, sizes.device), batch, sizes.forward_s)
    rate = outcome.n_tiles / wall
    return {
        "tiles": outcome.n_tiles,
        "seconds": wall,
        "end_to_end_tiles_per_s": rate,
        "forward_tiles_per_s": forward,
        "ratio": rate / forward,
        "workers": manifest["runtime"]["workers"],
        "decode": manifest["runtime"]["decode"],
        "peak_gib": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("bench-out/gpu"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--budget-s", type=float, default=450.0, help="whole run (s)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: test the script")
    args = parser.parse_args()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: bench_gpu.py measures GPUs only; nothing was run")
        return 0
    sizes = Sizes.smoke() if args.smoke else Sizes()

    clock = Clock(args.budget_s)
    args.cache.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    slide = args.cache / f"synthetic_{sizes.slide_w}x{sizes.slide_h}.svs"
    writer = _start_slide_writer(slide, sizes, max(1, cores - 2))
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if sizes.device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cores": cores,
    }

    def show(line: str) -> None:
        print(f"[{clock.elapsed_s:6.1f} s] {line}", flush=True)

    from histoduo.models.info import model_info

    limit = matmul_tflops(sizes)
    results["matmul_bf16_tflops"] = limit
    n = sizes.matmul_n
    show(f"dense bf16 matmul ({n}x{n} @ {n}x{n}): {limit:.1f} TFLOP/s")

    checkpoints: dict[str, Path] = {}
    results["forward"] = {}
    for (name, config), batches in zip(_configs(sizes).items(), sizes.batches):
        checkpoints[name] = _checkpoint(args.cache / f"{name}.pt", config, sizes)
        gflops = model_info(config, measure_memory=False).gflops_per_tile
        found = sweep(checkpoints[name], batches, sizes)
        best = found["best_batch"]
        rate = found["tiles_per_s"][best]
        util = rate * gflops * 1e9 / (limit * 1e12)
        results["forward"][name] = {**found, "gflops_per_tile": gflops, "utilisation": util}
        rates = ", ".join(
            f"b{b}: {r:.0f}" if r else f"b{b}: OOM" for b, r in found["tiles_per_s"].items()
        )
        show(
            f"{name:16s} {gflops:7.1f} GFLOP/tile  tiles/s {rates}  -> best b{best} "
            f"{rate:.0f} tiles/s = {util:.0%} of the matmul rate, "
            f"peak {_gib(found['peak_gib'][best])}"
        )

    paper = results["forward"]["duoformer-paper"]
    batch = 256 if paper["tiles_per_s"].get(256) else paper["best_batch"]  # predict's default
    forward = paper["tiles_per_s"][batch]
    if args.compile:
        _reset_peak()
        compiled = _predictor(checkpoints["duoformer-paper"], batch, sizes.device, True)
        rate = forward_rate(compiled, batch, 5.0)
        results["forward"]["duoformer-paper-compiled"] = {"tiles_per_s": rate, "batch": batch}
        show(f"duoformer-paper torch.compile b{batch}: {rate:.0f} tiles/s")
        del compiled

    # evaluate: ~25 s of forward work, within what the budget leaves
    work_s = min(sizes.eval_work_s, clock.left_s() / 8)
    n_tiles = int(min(60_000, max(sizes.min_tiles, forward * work_s)))
    store = write_store(args.cache / f"eval_{n_tiles}.h5", n_tiles, sizes)
    show(f"wrote a {n_tiles}-tile JPEG store")
    ckpt = checkpoints["duoformer-paper"]
    results["evaluate"] = bench_evaluate(store, ckpt, batch, forward, sizes)
    e = results["evaluate"]
    show(
        f"evaluate paper b{batch}: end-to-end {e['end_to_end_tiles_per_s']:.0f} tiles/s vs "
        f"forward-only {forward:.0f} = {e['ratio']:.0%} (goal >= 90%; decode {e['decode']}, "
        f"loop alone {e['loop_tiles_per_s']:.0f} tiles/s), peak {_gib(e['peak_gib'])}"
    )

    if writer is not None:
        show("waiting for the synthetic slide ...")
        try:
            writer.wait(timeout=max(10.0, clock.left_s() - 60))
        except subprocess.TimeoutExpired:
            writer.kill()
            show("the synthetic slide was not ready in time: predict part skipped")
        if writer.returncode not in (0, None):
            show(f"the slide writer failed (exit {writer.returncode}): predict part skipped")
    if slide.exists():
        results["predict"] = bench_predict(slide, ckpt, batch, sizes)
        p = results["predict"]
        show(
            f"predict paper b{batch} on {sizes.slide_w}x{sizes.slide_h}: {p['tiles']} tiles in "
            f"{p['seconds']:.1f} s, end-to-end {p['end_to_end_tiles_per_s']:.0f} tiles/s vs "
            f"forward-only {p['forward_tiles_per_s']:.0f} = {p['ratio']:.0%} (goal >= 90%; "
            f"{p['workers']} workers), peak {_gib(p['peak_gib'])}"
        )
    peaks = [v for f in results["forward"].values() for v in f.get("peak_gib", {}).values()]
    peaks += [results[k]["peak_gib"] for k in ("evaluate", "predict") if k in results]
    known = [v for v in peaks if v is not None]
    results["peak_gpu_memory_gib"] = max(known) if known else None
    show(f"peak GPU memory of any part: {_gib(results['peak_gpu_memory_gib'])}")
    results["seconds"] = clock.elapsed_s
    show(f"done in {clock.elapsed_s:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
