"""Forward throughput of DuoFormer vs. ResNet-50 vs. dense matmul (the practical limit).

Run:  .venv/bin/python benchmarks/bench_models.py --device cpu --dtype bf16
FLOPs per tile are counted (FlopCounterMode on the meta device, FLOPs = 2 x MACs), achieved
FLOP/s = FLOPs/tile x tiles/s, utilisation = achieved / square-matmul FLOP/s in the same dtype.
Low precision is tried two ways: ``autocast`` (fp32 weights, cast per call) and ``cast``
(model.to(dtype), weights stored in low precision); the faster is the practical choice.
Timings take the best of ``--repeats`` runs, which filters noise from other work on the host;
the matmul reference is re-measured next to every row (shared hosts drift by 2x within minutes)
and each row's utilisation is against its own neighbouring reference.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from histoduo.models import ModelConfig, build_model  # noqa: E402
from histoduo.models.info import model_info  # noqa: E402
from histoduo.runtime.device import maybe_compile  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

CONFIGS: dict[str, ModelConfig] = {
    "resnet50": ModelConfig(arch="resnet", backbone="resnet50"),
    "duoformer-paper": ModelConfig(),  # R50 S0-S3, D 768, L 8, h 8, p 32, learned token
    "duoformer-small": ModelConfig(
        backbone="resnet18",
        stages=(2, 3, 4),
        embed_dim=256,
        scale_depth=2,
        scale_heads=4,
        patch_depth=2,
        patch_heads=4,
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time_s(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(
    device: torch.device, dtype: torch.dtype, repeats: int, size: int = 4096
) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = best_time_s(lambda: a @ b, device, repeats, warmup=1)
    return 2 * size**3 / seconds


def bench_model(
    config: ModelConfig,
    batch_size: int,
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    channels_last: bool,
    compile_model: bool = False,
) -> float:
    """Seconds per forward of ``batch_size`` tiles (best of ``repeats``)."""
    model = build_model(config).eval().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    size = config.input_size_px
    x = torch.randn(batch_size, 3, size, size, device=device).to(memory_format=memory_format)
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if mode == "cast":
        model = model.to(dtype)
        x = x.to(dtype)
    elif mode == "autocast":
        autocast = torch.autocast(device.type, dtype=dtype)
    model = maybe_compile(model, compile_model)

    def forward() -> None:
        with torch.inference_mode(), autocast:
            model(x)

    return best_time_s(forward, device, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--models", default="resnet50,duoformer-paper,duoformer-small")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--paper-max-batch", type=int, default=8,
        help="skip larger batches for duoformer-paper (~500 GFLOPs/tile: slow on CPU)",
    )  # fmt: skip
    parser.add_argument("--modes", default="autocast,cast", help="autocast and/or cast")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["fp32"] if dtype == torch.float32 else args.modes.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    peak = matmul_flops_per_s(device, dtype, repeats=max(3, args.repeats))
    print(
        f"device {device} ({torch.get_num_threads()} threads), dtype {args.dtype}: "
        f"4096^3 matmul {peak / 1e9:.1f} GFLOP/s"
    )
    header = (
        f"{'model':<17} {'mode':<9} {'batch':>5} {'GFLOP/tile':>10} {'tiles/s':>9} "
        f"{'GFLOP/s':>9} {'mm GF/s':>8} {'util':>6} {'vs R50':>7}"
    )
    print(header)
    print("-" * len(header))
    resnet_rate: dict[tuple[str, int], float] = {}
    for name in args.models.split(","):
        config = CONFIGS[name]
        gflops = model_info(config, measure_memory=False).gflops_per_tile
        for mode in modes:
            for batch in batch_sizes:
                if name == "duoformer-paper" and batch > args.paper_max_batch:
                    continue
                seconds = bench_model(
                    config, batch, mode, device, dtype, args.repeats, args.warmup,
                    channels_last=not args.no_channels_last, compile_model=args.compile,
                )  # fmt: skip
                row_peak = matmul_flops_per_s(device, dtype, repeats=3)
                tiles_per_s = batch / seconds
                achieved = gflops * 1e9 * tiles_per_s
                if name == "resnet50":
                    resnet_rate[(mode, batch)] = tiles_per_s
                ratio = resnet_rate.get((mode, batch))
                vs_r50 = f"{tiles_per_s / ratio:7.3f}" if ratio else f"{'-':>7}"
                print(
                    f"{name:<17} {mode:<9} {batch:>5} {gflops:>10.1f} {tiles_per_s:>9.2f} "
                    f"{achieved / 1e9:>9.1f} {row_peak / 1e9:>8.1f} "
                    f"{achieved / row_peak:>6.0%} {vs_r50}",
                    flush=True,
                )
    print("util = achieved GFLOP/s / the 4096^3 matmul GFLOP/s measured right after the row")


if __name__ == "__main__":
    main()
