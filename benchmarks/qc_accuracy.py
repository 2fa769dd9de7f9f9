"""Precision and recall of the QC detectors on synthetic slides with drawn artefacts.

Thresholds (QCParams defaults) were set on the tuning seeds; the figures to report are the
held-out seeds'. A tile counts as found when the artefact covers at least half of it, and a
flagged tile is right when the artefact touches it (see histoduo.synthetic.qceval).

    python benchmarks/qc_accuracy.py [--tune 0 1 2 3] [--test 10 11 12 13]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from histoduo.qc import ARTEFACTS, QCParams
from histoduo.synthetic import SyntheticSlideSpec
from histoduo.synthetic.qceval import evaluate_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", type=int, nargs="*", default=[0, 1, 2, 3])
    ap.add_argument("--test", type=int, nargs="*", default=[10, 11, 12, 13])
    ap.add_argument("--size", type=int, nargs=2, default=(2048, 1536), metavar=("W", "H"))
    ap.add_argument("--tile", type=int, default=128)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    base = SyntheticSlideSpec(args.size[0], args.size[1], mpp=0.5)
    # Each artefact on slides of its own (so a tile under ink in a blurred band does not
    # count against blur), then all of them together.
    specs = {
        "pen": replace(base, pen_strokes=("blue", "green", "black", "red")),
        "blur": replace(base, blur_bands=1),
        "fold": replace(base, folds=1),
        "all": replace(base, pen_strokes=("blue", "black"), blur_bands=1, folds=1),
    }
    for label, seeds in (("tuning", args.tune), ("held-out", args.test)):
        started = time.perf_counter()
        print(f"\n{label} seeds {seeds}: tiles of {args.tile} px at 0.5 um/px")
        print(f"{'slides':<7}{'artefact':<9}{'flagged':>9}{'correct':>9}{'precision':>11}"
              f"{'mostly':>8}{'found':>7}{'recall':>8}{'clean flagged':>16}")  # fmt: skip
        for kind, spec in specs.items():
            total = evaluate_seeds(spec, seeds, QCParams(), tile_size_px=args.tile)
            for name in ARTEFACTS if kind == "all" else (kind,):
                s = total.scores[name]
                clean = f"{total.clean_flagged}/{total.clean_tiles}"
                print(f"{kind:<7}{name:<9}{s.flagged:>9}{s.correct:>9}{s.precision:>11.2f}"
                      f"{s.mostly:>8}{s.found:>7}{s.recall:>8.2f}{clean:>16}")  # fmt: skip
            by = ", ".join(f"{k} {v}" for k, v in total.clean_flagged_by.items())
            print(f"{'':<7}clean tiles flagged by detector: {by}")
        print(f"({time.perf_counter() - started:.0f} s)")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
