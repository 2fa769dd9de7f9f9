"""How well QC finds the artefacts drawn on a synthetic slide: per-artefact precision and
recall over tiles, and how many clean tissue tiles it flags.

Works from renders (no slide file): the thumbnail at the tissue step's resolution for pen
and folds, and each tile at level 0, JPEG-compressed like a stored tile, for blur.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from histoduo.qc import ARTEFACTS, FLAG_BITS, QCParams, detect_artefacts, tile_blur_scores, tile_qc
from histoduo.synthetic.render import render_region
from histoduo.synthetic.spec import SyntheticSlideSpec
from histoduo.tissue import TissueMask, TissueParams, detect_tissue_array

# A flagged tile is right when the artefact touches it (truth share above this) ...
TOUCH_FRACTION = 0.05
# ... and a tile mostly under an artefact (truth share at least this) must be flagged.
MOSTLY_FRACTION = 0.5


@dataclass
class ArtefactScore:
    flagged: int = 0
    correct: int = 0  # flagged tiles the artefact touches
    mostly: int = 0  # tiles mostly under the artefact
    found: int = 0  # of those, flagged

    @property
    def precision(self) -> float:
        return self.correct / self.flagged if self.flagged else float("nan")

    @property
    def recall(self) -> float:
        return self.found / self.mostly if self.mostly else float("nan")

    def add(self, other: ArtefactScore) -> None:
        self.flagged += other.flagged
        self.correct += other.correct
        self.mostly += other.mostly
        self.found += other.found


@dataclass
class SlideQCEval:
    scores: dict[str, ArtefactScore]
    clean_tiles: int  # tissue tiles no artefact touches
    clean_flagged: int  # of those, flagged for anything
    n_tiles: int
    clean_flagged_by: dict[str, int] = field(default_factory=dict)  # per detector


def _truth_fractions(truth: np.ndarray, ds: float, coords: np.ndarray, size0: float) -> np.ndarray:
    mask = TissueMask(mask=truth, downsample=ds, thumbnail=np.empty((0, 0, 3)), slide_mpp=None)
    return mask.fractions_in_boxes(coords, size0)


def evaluate_slide(
    spec: SyntheticSlideSpec,
    params: QCParams = QCParams(),
    *,
    tile_size_px: int = 128,
    tissue: TissueParams = TissueParams(),
    min_tissue_fraction: float = 0.25,
    jpeg_quality: int = 90,
    measure_blur: bool = True,
) -> SlideQCEval:
    """Run the detectors on ``spec``'s slide and score them against its drawn artefacts."""
    import imagecodecs

    from histoduo.synthetic.artefacts import artefact_masks
    from histoduo.synthetic.layout import label_map

    W, H = spec.level0_width, spec.level0_height
    ds = max(1.0, tissue.mask_mpp / spec.mpp)
    thumb = render_region(spec, 0, 0, int(np.ceil(W / ds)), int(np.ceil(H / ds)), ds)
    mask, _ = detect_tissue_array(thumb, spec.mpp * ds, tissue)
    tmask = TissueMask(mask=mask, downsample=ds, thumbnail=thumb, slide_mpp=spec.mpp,
                       level0_size=(W, H))  # fmt: skip
    masks = detect_artefacts(tmask, params)
    size = tile_size_px
    grid = np.array(
        [(x, y) for y in range(0, H - size + 1, size) for x in range(0, W - size + 1, size)]
    )
    keep = tmask.fractions_in_boxes(grid, size) >= min_tissue_fraction
    coords = grid[keep]
    tiles = []
    for x, y in coords if measure_blur else []:
        tile = render_region(spec, int(x), int(y), size, size, 1.0)
        tiles.append(imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(tile, level=jpeg_quality)))
    blur = tile_blur_scores(tiles, params) if measure_blur else None
    qc = tile_qc(masks, coords, size, blur, params)
    truth_ds = 4.0
    truth = artefact_masks(spec, truth_ds, label_map(spec, truth_ds) > 0)
    fractions = {k: _truth_fractions(truth[k], truth_ds, coords, size) for k in ARTEFACTS}
    scores = {}
    touched = np.zeros(len(coords), bool)
    for name in ARTEFACTS:
        flagged = (qc.flags & FLAG_BITS[name]) > 0
        frac = fractions[name]
        touched |= frac > 0
        scores[name] = ArtefactScore(
            flagged=int(flagged.sum()),
            correct=int((flagged & (frac > TOUCH_FRACTION)).sum()),
            mostly=int((frac >= MOSTLY_FRACTION).sum()),
            found=int((flagged & (frac >= MOSTLY_FRACTION)).sum()),
        )
    clean = ~touched
    by = {k: int((((qc.flags & FLAG_BITS[k]) > 0) & clean).sum()) for k in ARTEFACTS}
    return SlideQCEval(scores, int(clean.sum()), int((qc.flagged & clean).sum()), len(coords), by)


def evaluate_seeds(
    base: SyntheticSlideSpec, seeds: list[int], params: QCParams = QCParams(), **kw: object
) -> SlideQCEval:
    """Totals of :func:`evaluate_slide` over ``base`` drawn with each seed."""
    from dataclasses import replace

    total = SlideQCEval({k: ArtefactScore() for k in ARTEFACTS}, 0, 0, 0)
    for seed in seeds:
        one = evaluate_slide(replace(base, seed=seed), params, **kw)  # type: ignore[arg-type]
        for k in ARTEFACTS:
            total.scores[k].add(one.scores[k])
        total.clean_tiles += one.clean_tiles
        total.clean_flagged += one.clean_flagged
        for k in ARTEFACTS:
            total.clean_flagged_by[k] = total.clean_flagged_by.get(k, 0) + one.clean_flagged_by[k]
        total.n_tiles += one.n_tiles
    return total
