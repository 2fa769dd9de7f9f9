"""Tiling throughput, memory and tissue-detection time, as ratios measured in one run.

    python benchmarks/bench_tiling.py   # 20,000 x 15,000 and 40,000 x 30,000 px, 40x -> 20x
    python benchmarks/bench_tiling.py --also-scale 0 --width 8000 --height 6000   # quicker

Prints, for the same tiles of the same slide:
  histoduo     `tile_slides` (worker processes read/resize/encode JPEG, one HDF5 writer)
  reference    what CLAM/TRIDENT do: one process, OpenSlide read_region at the level, resize,
               write raw tiles to HDF5
  limit        the same tiles read and resized by the same number of processes, nothing
               encoded or written (the practical ceiling)
and the peak memory (RSS of the whole process tree) of `histoduo tile` at two slide sizes.
Goals on 2 cores: histoduo >= 2x reference, >= 80% of limit, peak memory < 1 GiB and flat in
slide size, tissue detection < 0.5 s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _slide(folder: Path, width: int, height: int, seed: int = 7) -> Path:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    path = folder / f"bench_{width}x{height}.svs"
    if not path.exists():
        t0 = time.perf_counter()
        spec = SyntheticSlideSpec(level0_width=width, level0_height=height, mpp=0.25, seed=seed)
        write_synthetic_slide(path, spec)
        print(f"wrote {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def _plan(path: Path, params) -> tuple[np.ndarray, int, int, int]:  # noqa: ANN001
    from histoduo.slide import open_slide
    from histoduo.tiling import TileGeometry, plan_tiles
    from histoduo.tissue import detect_tissue

    with open_slide(path) as slide:
        geometry = TileGeometry.for_slide(slide, params)
        mask = detect_tissue(slide, params.tissue)
        coords, _ = plan_tiles(mask, geometry, *slide.dimensions, params.min_tissue_fraction)
        return coords, geometry.tile_size_level0, geometry.read_level, geometry.read_size_px


def _time_tissue(path: Path, repeats: int = 5) -> float:
    from histoduo.slide import open_slide
    from histoduo.tissue import TissueParams, detect_tissue

    best = float("inf")
    for _ in range(repeats):
        with open_slide(path) as slide:
            t0 = time.perf_counter()
            detect_tissue(slide, TissueParams())
            best = min(best, time.perf_counter() - t0)
    return best


def _reference(path: Path, coords: np.ndarray, size0: int, tile_px: int, out: Path) -> float:
    """CLAM/TRIDENT style: one process, OpenSlide at the best level, PIL resize, raw HDF5."""
    import h5py
    import openslide
    from PIL import Image

    t0 = time.perf_counter()
    slide = openslide.OpenSlide(str(path))
    level = slide.get_best_level_for_downsample(size0 / tile_px)
    ds = slide.level_downsamples[level]
    read_px = round(size0 / ds)
    with h5py.File(out, "w") as f:
        imgs = f.create_dataset(
            "imgs", (len(coords), tile_px, tile_px, 3), np.uint8, chunks=(1, tile_px, tile_px, 3)
        )
        f.create_dataset("coords", data=coords)
        for i, (x, y) in enumerate(coords):
            region = slide.read_region((int(x), int(y)), level, (read_px, read_px)).convert("RGB")
            if read_px != tile_px:
                region = region.resize((tile_px, tile_px), Image.Resampling.LANCZOS)
            imgs[i] = np.asarray(region)
    slide.close()
    return time.perf_counter() - t0


def _read_only(task: tuple[str, np.ndarray, int, int, int]) -> int:
    from histoduo.tiling.read import read_tile

    path, coords, level, read_px, tile_px = task
    from histoduo.slide import open_slide

    with open_slide(path) as slide:
        for xy in coords:
            read_tile(slide, xy, level, read_px, tile_px)
    return len(coords)


def _limit(
    path: Path, coords: np.ndarray, level: int, read_px: int, tile_px: int, workers: int
) -> float:
    chunks = [coords[i : i + 256] for i in range(0, len(coords), 256)]
    ctx = mp.get_context("forkserver")
    with ctx.Pool(workers) as pool:
        pool.map(
            _read_only, [(str(path), coords[:2], level, read_px, tile_px)] * workers
        )  # warm up
        t0 = time.perf_counter()
        sum(
            pool.imap_unordered(
                _read_only, [(str(path), c, level, read_px, tile_px) for c in chunks]
            )
        )
        return time.perf_counter() - t0


def _histoduo(path: Path, params, out: Path, workers: int) -> tuple[float, int]:  # noqa: ANN001
    from histoduo.slide.sources import SlideSource
    from histoduo.tiling import tile_slides

    t0 = time.perf_counter()
    report = tile_slides(
        [SlideSource(path)], out, params, workers=workers, overwrite=True, progress=False
    )
    return time.perf_counter() - t0, report.results[0].n_tiles


def _peak_memory_of_cli(path: Path, out: Path, tile_px: int) -> float:
    """Peak RSS (GiB) of `histoduo tile` and its workers."""
    from _measure import peak_tree_rss_gib

    cmd = [
        sys.executable,
        "-m",
        "histoduo",
        "tile",
        str(path),
        "--out",
        str(out),
        "--mag",
        "20",
        "--tile-size",
        str(tile_px),
        "--overwrite",
        "--quiet",
    ]
    return peak_tree_rss_gib(cmd)


def _compare(path: Path, workers: int, tile_px: int, cache: Path) -> dict[str, float]:
    from histoduo.tiling import TilingParams

    params = TilingParams(target_mpp=0.5, tile_size_px=tile_px)
    coords, size0, level, read_px = _plan(path, params)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp_dir = Path(tmp)
        limit_s = _limit(path, coords, level, read_px, tile_px, workers)
        ours_s, n = _histoduo(path, params, tmp_dir / "ours.h5", workers)
        ref_s = _reference(path, coords, size0, tile_px, tmp_dir / "ref.h5")
        ours_mb = (tmp_dir / "ours.h5").stat().st_size / 1e6
        ref_mb = (tmp_dir / "ref.h5").stat().st_size / 1e6
    assert n == len(coords), (n, len(coords))
    print(
        f"\n{path.name}: {n} tiles of {tile_px} px at 0.5 um/px (level-0 footprint {size0} px, "
        f"read level {level}), {workers} workers"
    )
    print(f"{'':12}{'tiles/s':>10}{'seconds':>10}")
    for name, seconds in (("histoduo", ours_s), ("reference", ref_s), ("limit", limit_s)):
        print(f"{name:12}{n / seconds:10.0f}{seconds:10.2f}")
    print(f"histoduo / reference = {ref_s / ours_s:.2f}x  (goal >= 2x)")
    print(
        f"histoduo / limit     = {limit_s / ours_s:.0%}  (goal >= 80%; histoduo's time includes "
        f"starting its workers and detecting tissue, the limit's does not)"
    )
    print(f"store size: histoduo JPEG {ours_mb:.0f} MB, reference raw {ref_mb:.0f} MB")
    return {"ours": ours_s, "ref": ref_s, "limit": limit_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=20_000)
    parser.add_argument("--height", type=int, default=15_000)
    parser.add_argument(
        "--also-scale",
        type=int,
        default=2,
        help="also measure a slide this many times wider and taller (0 = skip); real slides "
        "are larger still, and per-run start-up weighs less on them",
    )
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--cache", type=Path, default=Path("bench-out"))
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    path = _slide(args.cache, args.width, args.height)
    print(f"tissue detection: {_time_tissue(path):.3f} s on {path.name} (goal < 0.5 s)")
    _compare(path, args.workers, args.tile_size, args.cache)
    if args.also_scale:
        big = _slide(args.cache, args.width * args.also_scale, args.height * args.also_scale)
        _compare(big, args.workers, args.tile_size, args.cache)

    if not args.skip_memory:
        small = _slide(args.cache, args.width // 2, args.height // 2, seed=8)
        with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
            peak_small = _peak_memory_of_cli(small, Path(tmp) / "s.h5", args.tile_size)
            peak_big = _peak_memory_of_cli(path, Path(tmp) / "b.h5", args.tile_size)
        print(
            f"\npeak memory of `histoduo tile` (process tree RSS): "
            f"{args.width // 2}x{args.height // 2}: {peak_small:.2f} GiB, "
            f"{args.width}x{args.height}: {peak_big:.2f} GiB "
            f"(ratio {peak_big / peak_small:.2f}; goal < 1 GiB and flat)"
        )


if __name__ == "__main__":
    main()
