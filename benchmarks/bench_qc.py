"""What artefact QC adds to `tile`: one cohort tiled with --qc off and --qc exclude, one run.

    python benchmarks/bench_qc.py                      # 8 slides of 20,000 x 15,000 px, 40x -> 20x
    python benchmarks/bench_qc.py --slides 3 --width 6000 --height 4000   # quicker

The runs alternate (off, exclude, off, exclude, ...) so drifting machine load hits both, and
the best time of each is compared. Goal: QC adds at most 10 % to `tile`'s time. Pen and fold
run on the thumbnail in the planner thread; blur runs in the tile workers on pixels they
already hold (histoduo.tiling.chunks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_cohort import _slides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--width", type=int, default=20_000)
    parser.add_argument("--height", type=int, default=15_000)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    from histoduo.slide.sources import SlideSource
    from histoduo.tiling import TilingParams, tile_slides

    args.cache.mkdir(parents=True, exist_ok=True)
    paths = _slides(args.cache, args.slides, args.width, args.height)
    sources = [SlideSource(p) for p in paths]
    params = TilingParams(target_mpp=0.5, tile_size_px=args.tile_size)
    print(f"load average before: {os.getloadavg()}", flush=True)
    times: dict[str, list[float]] = {"off": [], "exclude": []}
    tiles = 0
    for _ in range(args.repeats):
        for mode in ("off", "exclude"):
            out = Path(tempfile.mkdtemp(prefix="bench-qc-")) / "t.h5"
            t0 = time.perf_counter()
            report = tile_slides(
                sources, out, params, workers=args.workers, progress=False, qc_mode=mode
            )
            times[mode].append(time.perf_counter() - t0)
            tiles = sum(r.n_tiles for r in report.results)
            shutil.rmtree(out.parent)
            print(f"  --qc {mode:<8} {times[mode][-1]:6.1f} s  ({tiles:,} tiles)", flush=True)
    off, on = min(times["off"]), min(times["exclude"])
    per_tile = _per_tile_costs(paths[0], params)
    print(f"load average after: {os.getloadavg()}")
    print(
        f"{len(paths)} slides of {args.width} x {args.height} px, {tiles:,} tiles of "
        f"{args.tile_size} px, {args.workers} workers: --qc off {off:.1f} s, --qc exclude "
        f"{on:.1f} s (best of {args.repeats}); QC adds {on / off - 1:+.1%} (goal <= +10%)"
    )
    print(per_tile)


def _per_tile_costs(path: Path, params) -> str:  # noqa: ANN001
    """The same work split by step, in one process (robust to the load of other processes):
    a tile's read + resize + JPEG against its blur measure; the slide's tissue detection
    against its pen + fold detection."""
    from histoduo.qc import detect_artefacts, tile_blur_score
    from histoduo.runtime.codec import encode_jpeg
    from histoduo.slide import open_slide
    from histoduo.tiling import TileGeometry, plan_tiles
    from histoduo.tiling.read import read_tile
    from histoduo.tissue import detect_tissue

    with open_slide(path) as slide:
        geometry = TileGeometry.for_slide(slide, params)
        t0 = time.perf_counter()
        mask = detect_tissue(slide, params.tissue)
        t_tissue = time.perf_counter() - t0
        t0 = time.perf_counter()
        detect_artefacts(mask)
        t_artefacts = time.perf_counter() - t0
        coords, _ = plan_tiles(mask, geometry, *slide.dimensions, params.min_tissue_fraction)
        coords = coords[:64]
        t_read = t_blur = 0.0
        for xy in coords:
            t0 = time.perf_counter()
            tile = read_tile(
                slide, xy, geometry.read_level, geometry.read_size_px, params.tile_size_px
            )
            encode_jpeg(tile, params.jpeg_quality)
            t1 = time.perf_counter()
            tile_blur_score(tile)
            t_blur += time.perf_counter() - t1
            t_read += t1 - t0
    n = len(coords)
    return (
        f"per tile (one process, {n} tiles): read+resize+JPEG {t_read / n * 1e3:.2f} ms, "
        f"blur {t_blur / n * 1e3:.2f} ms ({t_blur / t_read:+.1%}); per slide: tissue "
        f"{t_tissue * 1e3:.0f} ms, pen+fold {t_artefacts * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
