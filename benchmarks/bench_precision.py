"""CPU forward tiles/s in fp32 against bf16 weights + autocast, interleaved in one run.

    python benchmarks/bench_precision.py                 # small DuoFormer, 224 px, batch 16
    python benchmarks/bench_precision.py --reps 5 --batch 32

Why: `--precision auto` keeps fp32 on CPU. On CPUs with native bf16 (AVX512-BF16, AMX)
bf16 can be faster; this measures it on the machine at hand, alternating the two so a
shared machine's load hits both alike. The best of the repetitions is the figure.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3, help="batches per repetition")
    parser.add_argument("--size", type=int, default=224, help="input px")
    args = parser.parse_args()

    import torch

    from histoduo.models import ModelConfig, build_model
    from histoduo.runtime.device import Runtime

    torch.manual_seed(0)
    config = ModelConfig.small_cpu(input_size_px=args.size)
    x = torch.randn(args.batch, 3, args.size, args.size)
    runs = {}
    for precision in ("fp32", "bf16"):
        runtime = Runtime.create("cpu", precision)
        runs[precision] = (runtime, runtime.prepare_model(build_model(config)))
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.reps):
        for precision, (runtime, model) in runs.items():
            xi = runtime.model_input(x)
            with torch.inference_mode(), runtime.autocast():
                model(xi)  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    model(xi)
                rates[precision].append(args.batch * args.iters / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in rates.items()}
    print(f"small DuoFormer {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads")
    for precision, values in rates.items():
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"{precision}: best {best[precision]:6.1f} tiles/s  ({shown})")
    print(f"bf16 / fp32 = {best['bf16'] / best['fp32']:.2f}")


if __name__ == "__main__":
    main()
