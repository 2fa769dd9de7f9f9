"""Per-tile class labels from QuPath GeoJSON annotations, one file per slide."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.slide import SlideError
from histoduo.slide.sources import SlideSource
from histoduo.store import StoreError
from histoduo.tiling.params import TilingParams
from histoduo.tissue import TissueMask


@dataclass
class Labeller:
    """Per-tile class labels from QuPath GeoJSON annotations, one file per slide."""

    annotations_dir: Path
    class_names: list[str]
    min_coverage: float

    @classmethod
    def from_dir(
        cls,
        annotations_dir: str | Path,
        params: TilingParams,
        class_names: Sequence[str] | None = None,
    ) -> Labeller:
        """Classes are ``class_names`` when given (a fixed vocabulary for a cohort), else
        every class name found in the folder's files, sorted."""
        from histoduo.slide.geojson import read_annotations

        folder = Path(annotations_dir)
        if not folder.is_dir():
            raise StoreError(folder, "annotations folder not found")
        names: set[str] = set()
        for path in sorted(folder.glob("*.geojson")) + sorted(folder.glob("*.json")):
            for ann in read_annotations(path):
                if ann.class_name and ann.class_name.lower() not in _NON_CLASS_NAMES:
                    names.add(ann.class_name)
        if class_names:
            if len(set(class_names)) != len(class_names):
                raise ValueError(f"duplicate names in the class list {list(class_names)}")
            return cls(folder, list(class_names), params.label_min_coverage)
        if not names:
            raise StoreError(folder, "no classified annotations (classification.name) found")
        return cls(folder, sorted(names), params.label_min_coverage)

    def annotation_file(self, source: SlideSource) -> Path | None:
        for suffix in (".geojson", ".json"):
            candidate = self.annotations_dir / f"{source.name}{suffix}"
            if candidate.exists():
                return candidate
        return None

    def labels_for(
        self, source: SlideSource, mask: TissueMask, coords: np.ndarray, size0: int
    ) -> np.ndarray:
        from histoduo.slide.geojson import rasterize, read_annotations

        labels = np.full(len(coords), -1, dtype=np.int16)
        path = self.annotation_file(source)
        if path is None or len(coords) == 0:
            return labels
        annotations = [
            a
            for a in read_annotations(path, warn=False)  # from_dir read it and warned
            if a.class_name and a.class_name.lower() not in _NON_CLASS_NAMES
        ]
        _check_annotations(annotations, path, mask)
        unknown = sorted({a.class_name for a in annotations} - set(self.class_names))
        if unknown:
            raise SlideError(
                path,
                f"unknown class name(s) {unknown}; the store's classes are {self.class_names}",
            )
        best = np.zeros(len(coords), dtype=np.float64)
        for index, name in enumerate(self.class_names):
            selected = [a for a in annotations if a.class_name == name]
            if not selected:
                continue
            painted = rasterize(selected, mask.mask.shape, mask.downsample) > 0
            coverage = replace(mask, mask=painted).fractions_in_boxes(coords, float(size0))
            better = (coverage >= self.min_coverage) & (coverage > best)
            labels[better] = index
            best = np.maximum(best, np.where(better, coverage, 0))
        return labels


def _check_annotations(annotations: list[Any], path: Path, mask: TissueMask) -> None:
    """A self-crossing polygon or one wholly off the slide: a SlideError naming the file."""
    from histoduo.slide.geojson import check_annotations

    if mask.level0_size is not None:
        try:
            check_annotations(annotations, path, mask.level0_size)
        except ValueError as exc:
            raise SlideError(path, str(exc).removeprefix(f"{path}: ")) from None


# Annotation classes that mark areas, not tissue classes.
_NON_CLASS_NAMES = {"tissue", "region", "ignore", "background", "other"}
