"""Predict pipeline tiles/s vs model-forward-only tiles/s on the same tiles, same run.

    .venv/bin/python benchmarks/bench_predict.py [--device cpu|cuda] [--workers 0 1 2]
        [--threads N] [--batch 64] [--sizes 4096 8192]

Forward-only: the same tiles, read and transformed beforehand, held in memory, through the
same TilePredictor (model, batch, precision). Pipeline: DataLoader workers open the slide,
read + transform, main process runs the model (TilePredictor.run). Peak RSS of the process
(ru_maxrss, includes workers' children separately) is reported per slide size.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    args = parser.parse_args()

    import numpy as np
    import torch

    from histoduo.checkpoint import load_model
    from histoduo.predict import PredictParams, SlideTiles, TilePredictor
    from histoduo.slide import open_slide
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide
    from histoduo.tiling import TileGeometry, TilingParams, plan_tiles
    from histoduo.tissue import detect_tissue

    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_predict import make_checkpoint

    ckpt = make_checkpoint(tmp / "tiny.pt", target_mpp=0.5)
    model, meta = load_model(ckpt)
    tiling = TilingParams(target_mpp=0.5, tile_size_px=64)
    for size in args.sizes:
        slide_path = tmp / f"s{size}.svs"
        write_synthetic_slide(slide_path, SyntheticSlideSpec(size, size, seed=1), workers=2)
        with open_slide(slide_path) as slide:
            geometry = TileGeometry.for_slide(slide, tiling)
            mask = detect_tissue(slide, tiling.tissue)
            coords, _ = plan_tiles(mask, geometry, *slide.dimensions, 0.25)
        for workers in args.workers:
            params = PredictParams(
                device=args.device,
                batch_size=args.batch,
                workers=workers,
                torch_threads=args.threads,
            )
            predictor = TilePredictor(model, meta, params)
            tiles = SlideTiles(
                str(slide_path),
                "auto",
                None,
                coords,
                geometry.tile_size_level0,
                64,
                predictor.batch_size,
                predictor.transform,
            )
            batches = [x for _, x in tiles]  # in memory, already transformed
            predictor(batches[0])  # warm-up
            t0 = time.perf_counter()
            for x in batches:
                predictor(x)
            if args.device == "cuda":
                torch.cuda.synchronize()
            forward = len(coords) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            probs = predictor.run(tiles, workers)
            pipeline = len(coords) / (time.perf_counter() - t0)
            assert np.isfinite(probs).all()
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"slide {size}x{size} tiles={len(coords)} workers={workers} "
                f"threads={torch.get_num_threads()} forward-only={forward:.0f}/s "
                f"pipeline={pipeline:.0f}/s ratio={pipeline / forward:.2f} "
                f"peak_rss={peak_mb:.0f}MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
