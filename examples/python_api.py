"""The library behind the CLI, from Python: tile a slide, read tiles, grade probabilities.

python examples/python_api.py [WORKDIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from histoduo.grading import ClassRoles, GradeParams, grade_slide
from histoduo.slide import open_slide
from histoduo.slide.sources import SlideSource
from histoduo.store import TileStore
from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide
from histoduo.tiling import TilingParams, tile_slides
from histoduo.tissue import detect_tissue


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    slide = write_synthetic_slide(
        work / "slide.svs", SyntheticSlideSpec(level0_width=2048, level0_height=1536, seed=3)
    )
    with open_slide(slide.path) as opened:
        print(opened.info())
        mask = detect_tissue(opened)
        print(f"tissue: {mask.area_mm2():.3f} mm^2")

    report = tile_slides(
        [SlideSource(slide.path)],
        work / "tiles.h5",
        TilingParams(target_mpp=0.5, tile_size_px=128),
        progress=False,
    )
    print(f"{report.results[0].n_tiles} tiles")
    with TileStore(work / "tiles.h5") as store:
        name = store.slides[0]
        tiles = store.read_tiles(name, [0, 1])
        print(name, store.coords(name)[:2].tolist(), tiles.shape, tiles.dtype)

    # The slide-level rule on made-up tile probabilities: 90 low-grade, 10 high-grade tiles.
    classes = ["normal", "low_grade", "high_grade", "necrosis"]
    probs = np.zeros((100, 4))
    probs[:90, 1] = 1.0
    probs[90:, 2] = 1.0
    call = grade_slide(probs, classes, ClassRoles.infer(classes), GradeParams())
    print(f"slide-level call: {call.call} ({call.reason})")


if __name__ == "__main__":  # tiling starts worker processes: keep the guard
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("example-api"))
