"""Deterministic synthetic H&E-like pyramidal slides with known ground truth.

A slide is described by a :class:`SyntheticSlideSpec`. Everything is a pure function of the spec
and of absolute level-0 coordinates, so any region can be rendered at any downsample on its own
(``render_region``) and crops of a big render equal small renders. The writer renders each
pyramid level independently, strip by strip, so level 0 is never held in memory.

Ground truth lives in a small "layout" grid (one cell per ``cell`` level-0 pixels): 0 is
background, ``i + 1`` is ``class_names[i]``. Pixels, ``label_map`` and the QuPath GeoJSON are all
derived from that one grid.

Modules: ``spec`` (the spec and the written slide), ``style`` (noise and class styles),
``layout`` (the truth grid), ``render`` (pixels of any region), ``write`` (files and GeoJSON).
"""

from histoduo.synthetic.layout import SyntheticSlide, label_map
from histoduo.synthetic.render import render_region
from histoduo.synthetic.spec import DEFAULT_CLASSES, SyntheticSlideSpec
from histoduo.synthetic.write import (
    truth_feature_collection,
    write_synthetic_cohort,
    write_synthetic_slide,
)

__all__ = [
    "DEFAULT_CLASSES",
    "SyntheticSlide",
    "SyntheticSlideSpec",
    "label_map",
    "render_region",
    "truth_feature_collection",
    "write_synthetic_cohort",
    "write_synthetic_slide",
]
