"""Incremental cost of the tile store: adding one slide to stores of N slides, N = 4 and 16.

    python benchmarks/bench_store.py                       # 4096 x 3072 px slides
    python benchmarks/bench_store.py --width 2048 --height 1536   # quicker

For each N, a store of N slides is tiled, then one more slide is added two ways:
  rerun   `tile_slides` over the N + 1 slides (N are skipped, 1 is tiled)
  merge   the new slide tiled into its own store, then `merge_stores([store, new], store)`
and the script prints the wall time and the extra disk of each (bytes of the store index plus
its folder, after minus before). Goal: cost independent of N (ratio N=16 / N=4 ~ 1), where
format 1 rebuilt the whole store (a copy of every slide, and twice the disk meanwhile).

The slides are hard links of one synthetic slide under different names: the store's cost does
not depend on the pixels, and this keeps the script quick.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _slide(folder: Path, width: int, height: int) -> Path:
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    path = folder / f"store_bench_{width}x{height}.svs"
    if not path.exists():
        write_synthetic_slide(
            path, SyntheticSlideSpec(level0_width=width, level0_height=height, seed=3)
        )
    return path


def _names(base: Path, folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / f"slide_{i:03d}.svs"
        if not path.exists():
            os.link(base, path)
        paths.append(path)
    return paths


def _disk(*stores: Path) -> int:
    """Bytes allocated on disk by the stores (index + folder), hard links counted once."""
    seen: set[int] = set()
    total = 0
    for store in stores:
        files = [store] if store.exists() else []
        for root, _, names in os.walk(store.with_name(store.name + ".d")):
            files.extend(Path(root) / name for name in names)
        for path in files:
            st = path.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def _measure(n: int, slides: list[Path], work: Path, params, workers: int) -> dict[str, float]:  # noqa: ANN001
    from histoduo.slide.sources import SlideSource
    from histoduo.store import merge_stores
    from histoduo.tiling import tile_slides

    store = work / f"store_{n}.h5"
    sources = [SlideSource(p) for p in slides[:n]]
    tile_slides(sources, store, params, workers=workers, progress=False)
    before = _disk(store)
    t0 = time.perf_counter()
    report = tile_slides(
        [*sources, SlideSource(slides[n])], store, params, workers=workers, progress=False
    )
    rerun_s = time.perf_counter() - t0
    assert sorted(r.status for r in report.results) == ["done"] + ["skipped"] * n
    rerun_bytes = _disk(store) - before

    single = work / f"single_{n}.h5"
    tile_slides([SlideSource(slides[n + 1])], single, params, workers=workers, progress=False)
    before = _disk(store, single)
    t0 = time.perf_counter()
    names = merge_stores([store, single], store)
    merge_s = time.perf_counter() - t0
    assert len(names) == n + 2
    merge_bytes = _disk(store, single) - before
    return {
        "rerun_s": rerun_s,
        "rerun_mb": rerun_bytes / 1e6,
        "merge_s": merge_s,
        "merge_mb": merge_bytes / 1e6,
        "store_mb": _disk(store) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--height", type=int, default=3072)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    from histoduo.tiling import TilingParams

    args.cache.mkdir(parents=True, exist_ok=True)
    base = _slide(args.cache, args.width, args.height)
    params = TilingParams(target_mpp=0.5, tile_size_px=256)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        work = Path(tmp)
        slides = _names(base, work, 18)
        rows = {n: _measure(n, slides, work, params, args.workers) for n in (4, 16)}
    print(f"\nadding 1 slide ({args.width}x{args.height} px, 40x -> 20x, 256 px tiles):")
    print(f"{'N':>4}{'store MB':>10}{'rerun s':>10}{'rerun MB':>10}{'merge s':>10}{'merge MB':>10}")
    for n, r in rows.items():
        print(
            f"{n:>4}{r['store_mb']:>10.1f}{r['rerun_s']:>10.2f}{r['rerun_mb']:>10.2f}"
            f"{r['merge_s']:>10.3f}{r['merge_mb']:>10.3f}"
        )
    small, big = rows[4], rows[16]
    print(
        f"ratio N=16 / N=4: rerun time {big['rerun_s'] / small['rerun_s']:.2f}, "
        f"rerun disk {big['rerun_mb'] / small['rerun_mb']:.2f}, "
        f"merge time {big['merge_s'] / small['merge_s']:.2f}  (goal ~1)"
    )
    print(
        "merge hard-links the slide file: its extra disk is the index and the TRIDENT file; "
        "format 1 copied the whole store (the 'store MB' column) on every run"
    )


if __name__ == "__main__":
    main()
