"""Slide-label cohorts: the slide's label is set by one or two small foci of the deciding class.

Two forms, for the two ends of the MIL pipeline:

- :func:`write_slide_label_cohort` writes real synthetic slides (pixels, pyramid, ground-truth
  GeoJSON): low-grade tumour and normal tissue everywhere, plus, on "high_grade" slides, one
  or two small high-grade foci. ``slides.csv`` holds ``slide,label,patient``. This is what
  ``histoduo synth --cohort N`` writes; tile + embed them to get features.
- :func:`write_feature_cohort` skips pixels and encoders: each tile's feature is a noisy
  embedding of its tissue class (normal, low grade, high grade), written straight into
  TRIDENT-layout feature files, with the foci's tiles known. Tests and the MIL benchmark use
  it: a slide-level model must find a few focus tiles among hundreds to call the slide.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from histoduo.runtime.files import atomic_write, atomic_write_text
from histoduo.synthetic.spec import SyntheticSlideSpec
from histoduo.synthetic.truth import SyntheticSlide

COHORT_LABELS = ("low_grade", "high_grade")
COHORT_CLASSES = ("normal", "low_grade", "high_grade")


def _write_labels(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "label", "patient"])
        writer.writerows(rows)
    return path


def cohort_slide_spec(
    base: SyntheticSlideSpec, index: int, *, focus_fraction: float = 0.015
) -> tuple[SyntheticSlideSpec, str]:
    """Slide ``index``'s spec and label: odd slides are high grade (one or two foci of
    ``focus_fraction`` of the tissue each), even slides low grade (no high-grade tissue)."""
    seed = base.seed + index
    rng = np.random.default_rng([seed, 0xC0407])
    label = COHORT_LABELS[index % 2]
    normal = float(rng.uniform(0.2, 0.6))
    spec = replace(
        base,
        seed=seed,
        classes=COHORT_CLASSES,
        class_weights=(normal, 1.0 - normal, 0.0),  # high grade only where a focus puts it
        foci=(("high_grade", focus_fraction),) * int(rng.integers(1, 3))
        if label == "high_grade"
        else (),
    )
    return spec, label


def write_slide_label_cohort(
    out_dir: str | Path,
    n_slides: int,
    base: SyntheticSlideSpec,
    *,
    focus_fraction: float = 0.015,
    prefix: str = "cohort",
    workers: int | None = None,
) -> tuple[list[SyntheticSlide], Path]:
    """``n_slides`` slides with ground truth next to each, and ``out_dir/slides.csv``."""
    from histoduo.synthetic.write import write_synthetic_slide

    if n_slides < 2:
        raise ValueError("a slide-label cohort needs at least 2 slides (one of each label)")
    out = Path(out_dir)
    slides, rows = [], []
    for i in range(n_slides):
        spec, label = cohort_slide_spec(base, i, focus_fraction=focus_fraction)
        ext = "svs" if spec.format == "svs" else "tiff"
        name = f"{prefix}_{i:03d}"
        slides.append(write_synthetic_slide(out / f"{name}.{ext}", spec, workers=workers))
        rows.append((name, label, f"patient_{i:03d}"))
    return slides, _write_labels(out / "slides.csv", rows)


# --- feature-level cohorts -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FeatureCohortSpec:
    """A cohort of feature bags whose label is decided by a few focus tiles."""

    n_slides: int = 40
    grid_side: int = 20  # tiles on a side of the slide's tile grid (tissue is a disc in it)
    embedding_dim: int = 32
    focus_tiles: int = 6  # tiles per focus; a high-grade slide has one or two foci
    noise: float = 1.0  # per-dimension std of each tile's feature around its class centre
    class_distance: float = 5.0  # distance between class centres
    tile_size_px: int = 256  # level-0 px per tile (coords step)
    seed: int = 0
    encoder: str = "synthetic"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.n_slides < 2 or self.grid_side < 4 or self.embedding_dim < len(COHORT_CLASSES):
            raise ValueError("need >= 2 slides, a grid side >= 4 and >= 3 dims")
        if self.focus_tiles < 1:
            raise ValueError("focus_tiles must be >= 1")


@dataclass
class FeatureCohort:
    features_dir: Path
    labels_csv: Path
    focus_tiles: dict[str, np.ndarray]  # slide -> row numbers of its focus tiles (may be empty)
    labels: dict[str, str]


def _class_centres(spec: FeatureCohortSpec) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, 0xCE47])
    # Orthonormal directions (QR of a random matrix): every pair of classes is equally far.
    basis, _ = np.linalg.qr(rng.standard_normal((spec.embedding_dim, len(COHORT_CLASSES))))
    return basis.T * spec.class_distance / np.sqrt(2)  # orthonormal vectors are sqrt(2) apart


def _slide_tiles(
    spec: FeatureCohortSpec, index: int, centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(features, coords, focus rows, label) of one slide."""
    rng = np.random.default_rng([spec.seed, index, 0x5117])
    side = spec.grid_side
    yy, xx = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2
    radius = side / 2 * rng.uniform(0.7, 1.0)
    inside = np.hypot(xx - centre, yy - centre) <= radius
    gx, gy = xx[inside], yy[inside]
    # Normal tissue on one side of a random line through the disc, tumour on the other;
    # how much is tumour varies per slide (what mean pooling has to see through).
    angle = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(-0.4, 0.3) * radius
    along = (gx - centre) * np.cos(angle) + (gy - centre) * np.sin(angle)
    classes = np.where(along > offset, 1, 0)  # 1 = low grade tumour, 0 = normal
    label = COHORT_LABELS[index % 2]
    focus = np.zeros(len(gx), dtype=bool)
    if label == "high_grade":
        tumour = np.flatnonzero(classes == 1)
        for _ in range(int(rng.integers(1, 3))):
            seed_tile = tumour[rng.integers(len(tumour))]
            distance = np.hypot(gx - gx[seed_tile], gy - gy[seed_tile])
            distance[classes != 1] = np.inf
            focus[np.argsort(distance, kind="stable")[: spec.focus_tiles]] = True
        classes = np.where(focus, 2, classes)
    features = centres[classes] + spec.noise * rng.standard_normal((len(gx), spec.embedding_dim))
    coords = np.stack([gx, gy], axis=1).astype(np.int64) * spec.tile_size_px
    return features, coords, np.flatnonzero(focus), label


def _focus_geojson(coords: np.ndarray, rows: np.ndarray, tile_px: int) -> dict:
    """One QuPath annotation per focus tile square (level-0 px), class high_grade."""
    features = []
    for x, y in coords[rows].tolist():
        ring = [[x, y], [x + tile_px, y], [x + tile_px, y + tile_px], [x, y + tile_px], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "high_grade", "color": [200, 0, 0]},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_feature_cohort(out_dir: str | Path, spec: FeatureCohortSpec) -> FeatureCohort:
    """Feature files in ``out_dir/features_<encoder>/``, ``out_dir/slides.csv`` and the foci's
    ground truth as ``out_dir/truth/<slide>.geojson``; one slide in memory at a time."""
    from histoduo.store.features import FeatureInfo, feature_dir, write_feature_file

    out = Path(out_dir)
    folder = feature_dir(out, spec.encoder)
    centres = _class_centres(spec)
    focus_rows, labels, rows = {}, {}, []
    for i in range(spec.n_slides):
        name = f"slide_{i:04d}"
        features, coords, focus, label = _slide_tiles(spec, i, centres)
        info = FeatureInfo(
            slide=name,
            encoder=spec.encoder,
            embedding_dim=spec.embedding_dim,
            mpp=0.5,
            input_size_px=spec.tile_size_px,
            extra={"tile_size_px": spec.tile_size_px, "synthetic": True},
        )
        write_feature_file(
            folder / f"{name}.h5",
            info,
            features,
            coords,
            {"patch_size": spec.tile_size_px, "patch_size_level0": spec.tile_size_px},
            dtype=spec.dtype,
        )
        truth = _focus_geojson(coords, focus, spec.tile_size_px)
        atomic_write_text(out / "truth" / f"{name}.geojson", json.dumps(truth))
        focus_rows[name], labels[name] = focus, label
        rows.append((name, label, f"patient_{i // 2:04d}" if i % 4 < 2 else f"patient_{i:04d}"))
    return FeatureCohort(folder, _write_labels(out / "slides.csv", rows), focus_rows, labels)
