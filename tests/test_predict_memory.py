"""Memory-bounded prediction gives the same probabilities as before: CPU slides read by light
reader processes, and CPU forwards in slices (benchmarks/bench_predict.py measures the memory)."""

from __future__ import annotations

import numpy as np
import pytest
from test_predict import make_checkpoint

from histoduo.predict import PredictParams, SlideTiles, TilePredictor, engine, tiling_for
from histoduo.predict.scoring import plan_slide
from histoduo.slide.sources import SlideSource


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> TilePredictor:
    from histoduo.models.checkpoint import load_model

    model, meta = load_model(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))
    return TilePredictor(model, meta, PredictParams(device="cpu", batch_size=7))


def test_reader_processes_match_in_process_reading(predictor: TilePredictor, svs_slide) -> None:  # noqa: ANN001
    params = predictor.params
    tiling = tiling_for(predictor.meta, params, lambda _: None)
    plan = plan_slide(SlideSource(svs_slide.path), params, tiling)
    assert len(plan.coords) > 2 * predictor.batch_size  # several chunks: order matters
    tiles = SlideTiles(
        str(svs_slide.path),
        params.backend,
        None,
        plan.coords,
        plan.geometry.read_level,
        plan.geometry.read_size_px,
        tiling.tile_size_px,
        predictor.batch_size,
        predictor.transform,
    )
    in_process = predictor.run(tiles, workers=0)  # the DataLoader path, no worker
    readers = predictor.run(tiles, workers=2)  # the light reader processes
    assert in_process.shape == (len(plan.coords), len(predictor.meta.class_names))
    np.testing.assert_array_equal(readers, in_process)


def test_cpu_forward_in_slices_gives_the_same_probabilities(
    predictor: TilePredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    x = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    whole = predictor.forward(x)
    monkeypatch.setattr(engine, "CPU_FORWARD_TILES", 3)  # 3 + 3 + 3 + 1
    sliced = predictor.forward(x)
    assert sliced.shape == (10, len(predictor.meta.class_names))
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-6)
