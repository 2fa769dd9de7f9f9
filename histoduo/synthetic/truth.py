"""A written synthetic slide and its ground truth: class labels, tissue, drawn artefacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoduo.synthetic.artefacts import artefact_masks
from histoduo.synthetic.layout import _layout, label_map
from histoduo.synthetic.spec import SyntheticSlideSpec


@dataclass
class SyntheticSlide:
    """A written synthetic slide and accessors for its ground truth."""

    path: Path
    spec: SyntheticSlideSpec
    truth_geojson: Path
    artefacts_geojson: Path | None = None  # written when the spec draws artefacts

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def label_map(self, downsample: float) -> np.ndarray:
        """int16 (ceil(H/ds), ceil(W/ds)): 0 background, i+1 = class_names[i]."""
        return label_map(self.spec, downsample)

    def artefact_masks(self, downsample: float) -> dict[str, np.ndarray]:
        """Ground truth of the drawn artefacts: {"pen", "blur", "fold"} -> bool masks."""
        return artefact_masks(self.spec, downsample, self.tissue_mask(downsample))

    def tissue_mask(self, downsample: float) -> np.ndarray:
        return self.label_map(downsample) > 0

    def class_area_fractions(self) -> dict[str, float]:
        """Area of each class as a fraction of tissue area (exact, from the layout)."""
        lay = _layout(self.spec).labels
        n = max(int((lay > 0).sum()), 1)
        return {c: float((lay == i + 1).sum()) / n for i, c in enumerate(self.class_names)}
