"""Shared fixtures: small synthetic slides made by histoduo's own generator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REAL_SLIDE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"
)


@pytest.fixture(scope="session")
def real_slide() -> Path:
    if not REAL_SLIDE.exists():
        pytest.skip(f"real test slide not present at {REAL_SLIDE}")
    return REAL_SLIDE


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def _write(folder: Path, name: str, **spec_kwargs):  # noqa: ANN202
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(**{"level0_width": 3072, "level0_height": 2048, **spec_kwargs})
    return write_synthetic_slide(folder / name, spec, workers=1)


@pytest.fixture(scope="session")
def svs_slide(synth_dir: Path):  # noqa: ANN201
    """A 3072 x 2048 px, 40x (0.25 um/px) Aperio-style SVS with levels 1, 4, 16."""
    return _write(synth_dir, "svs_a.svs", seed=11)


@pytest.fixture(scope="session")
def svs_slide_b(synth_dir: Path):  # noqa: ANN201
    return _write(synth_dir, "svs_b.svs", seed=12)


@pytest.fixture(scope="session")
def tiff_slide(synth_dir: Path):  # noqa: ANN201
    """A generic tiled TIFF (levels as pages) with resolution tags in centimetres."""
    return _write(synth_dir, "tiff_a.tiff", seed=13, format="tiff")


@pytest.fixture(scope="session")
def no_mpp_slide(synth_dir: Path):  # noqa: ANN201
    return _write(
        synth_dir, "nompp.svs", seed=14, level0_width=1024, level0_height=1024, write_mpp=False
    )


@pytest.fixture(scope="session")
def labelled_slides(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Five 3072 x 2048 px synthetic slides and a folder of their ground-truth GeoJSON (one
    file per slide, as `tile --annotations` reads it): (slide sources, annotations folder).
    Written once per session for every test that tiles a labelled cohort."""
    import shutil

    from histoduo.slide.sources import SlideSource
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide

    folder = tmp_path_factory.mktemp("labelled_slides")
    annotations = folder / "annotations"
    annotations.mkdir()
    sources = []
    for index in range(5):
        spec = SyntheticSlideSpec(level0_width=3072, level0_height=2048, seed=40 + index)
        slide = write_synthetic_slide(folder / f"slide_{index}.svs", spec, workers=1)
        shutil.copyfile(slide.truth_geojson, annotations / f"slide_{index}.geojson")
        sources.append(SlideSource(slide.path))
    return sources, annotations
