"""Device selection and fallbacks, the inference dtype, the device-side decode path (run on
CPU), slide prefetching, and bench_gpu.py's exit where there is no GPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.predict import PredictParams, predict_run
from histoduo.runtime import decode
from histoduo.runtime import device as accel
from histoduo.runtime.pool import default_workers
from histoduo.runtime.prefetch import Prefetcher
from histoduo.slide.sources import SlideSource
from histoduo.store import TileStore
from histoduo.store.read import read_encoded
from histoduo.training.augment import EvalTransform, TrainTransform
from histoduo.training.config import AugmentConfig, TrainConfig
from histoduo.training.data import EncodedTileBatches, TileBatches

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, available: bool, count: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# --- device selection ----------------------------------------------------------------------


def test_auto_picks_the_gpu_only_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, False)
    assert accel.resolve_device("auto") == torch.device("cpu")
    assert accel.resolve_device("cpu") == torch.device("cpu")
    _fake_cuda(monkeypatch, True, 2)
    assert accel.resolve_device("auto") == torch.device("cuda", 0)
    assert accel.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # torchrun
    assert accel.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert accel.resolve_device("cpu") == torch.device("cpu")


def test_a_missing_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, False)
    with pytest.raises(accel.DeviceError, match="--device cuda was asked for.*--device cpu"):
        accel.resolve_device("cuda")
    _fake_cuda(monkeypatch, True, 2)
    with pytest.raises(accel.DeviceError, match=r"cuda:2 .*2 CUDA device\(s\).*cuda:1"):
        accel.resolve_device("cuda:2")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            accel.resolve_device(bad)
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        PredictParams(device="gpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        TrainConfig(device="tpu")
    assert PredictParams(device="cuda:3").device == "cuda:3"  # checked when the run starts


def test_cli_asks_for_a_missing_gpu_cleanly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tile_store: Path, checkpoint: Path
) -> None:
    _fake_cuda(monkeypatch, False)
    runner = CliRunner()
    out = tmp_path / "out"
    for args in (
        ["predict", "--tiles", str(tile_store), "--model", str(checkpoint), "--out", str(out)],
        ["evaluate", str(tile_store), "--model", str(checkpoint)],
    ):
        result = runner.invoke(app, [*args, "--device", "cuda"])
        assert result.exit_code == 1, result.output
        assert "--device cuda was asked for" in " ".join(result.output.split())
        assert "Traceback" not in result.output
    assert not list(out.glob("*/done"))  # nothing was predicted


def test_precision_batch_and_worker_policy() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert accel.resolve_precision("auto", gpu) == "bf16"
    assert accel.resolve_precision("auto", cpu) == "fp32"
    assert accel.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        accel.resolve_precision("fp16", gpu)
    assert (accel.default_batch_size(gpu), accel.default_batch_size(cpu)) == (256, 64)
    assert default_workers("pixels", cores=2) == 1
    assert default_workers("pixels", cores=16) == 15
    assert default_workers("bytes", cores=16) == 4  # readers only: the GPU decodes
    assert default_workers("bytes", cores=1) == 1
    gpu_opts, cpu_opts = accel.loader_options(gpu, 4), accel.loader_options(cpu, 0)
    assert gpu_opts == {"num_workers": 4, "pin_memory": True, "prefetch_factor": 4}
    assert cpu_opts == {"num_workers": 0, "pin_memory": False, "prefetch_factor": None}
    assert accel.peak_memory_gib(cpu) is None


def test_bf16_weights_predict_like_fp32(checkpoint: Path) -> None:
    """The GPU's dtype path (bf16 weights, autocast, bf16 input), run on CPU."""
    from histoduo.models.checkpoint import load_model
    from histoduo.predict import TilePredictor

    model, meta = load_model(checkpoint)
    x = torch.randn(6, 3, 64, 64)
    fp32 = TilePredictor(model, meta, PredictParams(device="cpu", precision="fp32"))
    model, meta = load_model(checkpoint)
    bf16 = TilePredictor(model, meta, PredictParams(device="cpu", precision="bf16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(fp32.model.parameters()).dtype == torch.float32
    p32, p16 = fp32.forward(x), bf16.forward(x)
    assert p16.dtype == np.float32 and np.allclose(p16.sum(1), 1, atol=1e-3)
    assert np.abs(p32 - p16).max() < 0.05


# --- the decode path -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tile_store(tmp_path_factory: pytest.TempPathFactory, svs_slide) -> Path:  # noqa: ANN001
    from test_predict import CLASSES

    from histoduo.tiling import TilingParams, tile_slides

    folder = tmp_path_factory.mktemp("accel")
    (folder / "annotations").mkdir()
    shutil.copyfile(svs_slide.truth_geojson, folder / "annotations" / "svs_a.geojson")
    store = folder / "tiles.h5"
    tile_slides(
        [SlideSource(svs_slide.path)],
        store,
        TilingParams(target_mpp=1.0, tile_size_px=64),
        annotations_dir=folder / "annotations",
        class_names=CLASSES,
        workers=0,
        progress=False,
    )
    return store


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory: pytest.TempPathFactory, svs_slide) -> Path:  # noqa: ANN001
    from histoduo.tiling import TilingParams, tile_slides

    store = tmp_path_factory.mktemp("accel_raw") / "raw.h5"
    tile_slides(
        [SlideSource(svs_slide.path)],
        store,
        TilingParams(target_mpp=1.0, tile_size_px=64, encoding="raw"),
        workers=0,
        progress=False,
    )
    return store


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_predict import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("accel_ckpt") / "tiny.pt")


def test_jpeg_bytes_decode_to_the_stores_tiles(tile_store: Path) -> None:
    with TileStore(tile_store) as store:
        slide = store.slides[0]
        idx = np.array([5, 0, 3, 3, 7])  # any order, repeats
        batch = read_encoded(store, slide, idx)
        assert batch.jpeg is not None and len(batch) == 5
        assert all(b.dtype == np.uint8 and b[:2].tolist() == [0xFF, 0xD8] for b in batch.jpeg)
        decoded = decode.decode_batch(batch, torch.device("cpu"))
        reference = store.read_tiles(slide, idx)
    assert decoded.dtype == torch.uint8 and decoded.shape == (5, 3, 64, 64)
    diff = np.abs(decoded.permute(0, 2, 3, 1).numpy().astype(int) - reference.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5  # JPEG decoders may round differently


def test_torchvisions_cpu_decoder_matches_the_stores(tile_store: Path) -> None:
    if not decode.torchvision_decodes("cpu"):
        pytest.skip("torchvision's image extension does not load next to this torch")
    from torchvision.io import decode_jpeg

    with TileStore(tile_store) as store:
        slide = store.slides[0]
        blobs = store.read_jpeg_bytes(slide, [0, 1, 2])
        reference = store.read_tiles(slide, [0, 1, 2])
    images = decode_jpeg([torch.from_numpy(b) for b in blobs], device="cpu")
    got = torch.stack(images).permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(got - reference.astype(int)).max() <= 3


def test_raw_stores_travel_as_pixels(raw_store: Path) -> None:
    with TileStore(raw_store) as store:
        slide = store.slides[0]
        batch = read_encoded(store, slide, [2, 1])
        assert batch.jpeg is None and batch.pixels.shape == (2, 64, 64, 3)
        decoded = decode.decode_batch(batch, torch.device("cpu"))
        assert np.array_equal(decoded.permute(0, 2, 3, 1).numpy(), store.read_tiles(slide, [2, 1]))


def test_decode_policy(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not decode.decode_on_device("auto", cpu)  # CPU: workers decode in parallel
    assert decode.decode_on_device("device", cpu)
    assert not decode.decode_on_device("worker", gpu)
    monkeypatch.setattr(decode, "torchvision_decodes", lambda device: device == "cuda:0")
    assert decode.decode_on_device("auto", gpu)
    monkeypatch.setattr(decode, "torchvision_decodes", lambda device: False)
    with caplog.at_level("WARNING"):
        assert not decode.decode_on_device("auto", gpu)
    assert "decoding in DataLoader workers" in caplog.text
    with pytest.raises(ValueError, match="decode must be one of"):
        decode.decode_on_device("gpu", cpu)


def _loader(dataset: TileBatches, sampler: object) -> object:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)


@pytest.mark.parametrize("store_name", ["tile_store", "raw_store"])
def test_device_side_batches_equal_worker_batches(
    store_name: str, request: pytest.FixtureRequest
) -> None:
    """Train and eval batches decoded + augmented in the main process (the GPU path) are the
    worker path's, pixel for pixel, seed for seed."""
    path = request.getfixturevalue(store_name)
    with TileStore(path) as store:
        slide = store.slides[0]
        n = store.num_tiles(slide)
    slides, tiles = np.array([slide] * n), np.arange(n)
    labels = np.arange(n) % 3
    augment = AugmentConfig(rotation_deg=20, hed_sigma=0.03, brightness=0.2)
    cpu = torch.device("cpu")
    for transform, sampler in (
        (TrainTransform(augment, 48, MEAN, STD), [(11, [3, 1, 4]), (12, [0, 5])]),
        (EvalTransform(48, MEAN, STD, "center_crop"), [[2, 0, 1], [6]]),
    ):
        worker = TileBatches(path, slides, tiles, labels, transform)
        device = EncodedTileBatches(path, slides, tiles, labels, transform)
        pairs = zip(
            decode.device_batches(_loader(worker, sampler), cpu),
            decode.device_batches(_loader(device, sampler), cpu, channels_last=True),
        )
        for (xw, yw), (xd, yd) in pairs:
            assert xd.shape == xw.shape and xd.dtype == torch.float32
            assert xd.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(xw, xd, atol=1e-5)
            assert torch.equal(yw, yd)


def test_gpu_side_transforms_keep_to_the_device() -> None:
    """Every random draw of the augmentation must land on the batch's device: the meta
    device raises on any CPU tensor mixed in, as CUDA would."""
    augment = AugmentConfig(
        rotation_deg=30, hed_sigma=0.05, center_crop_fraction=0.8, random_crop=True
    )
    x = torch.zeros(4, 3, 64, 64, dtype=torch.uint8, device="meta")
    out = TrainTransform(augment, 32, MEAN, STD)(x, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == (4, 3, 32, 32)
    assert EvalTransform(32, MEAN, STD, "resize")(x).shape == (4, 3, 32, 32)


def test_predict_decoding_on_the_device_matches_workers(
    tmp_path: Path,
    tile_store: Path,
    checkpoint: Path,
    svs_slide,  # noqa: ANN001
) -> None:
    probs = {}
    for mode in ("worker", "device"):
        for name, kwargs in (
            ("store", {"tiles_store": tile_store}),
            ("slide", {"sources": [SlideSource(svs_slide.path)]}),
        ):
            out = tmp_path / f"{mode}_{name}"
            params = PredictParams(decode=mode, workers=1, device="cpu")
            predict_run(checkpoint, out, params, **kwargs)
            probs[mode, name] = np.load(out / "svs_a" / "scores.npz")["probs"]
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["runtime"]["decode"] == mode
            assert manifest["runtime"]["device"] == "cpu"
    for name in ("store", "slide"):
        assert probs["device", name].shape == probs["worker", name].shape
        assert np.allclose(probs["device", name], probs["worker", name], atol=1e-4)


def test_evaluate_decoding_on_the_device_matches_workers(
    tile_store: Path, checkpoint: Path, tmp_path: Path
) -> None:
    from histoduo.training import evaluate

    reports = [
        evaluate(tile_store, checkpoint, decode=mode, num_workers=1)
        for mode in ("worker", "device")
    ]
    assert reports[0]["n_tiles"] == reports[1]["n_tiles"] > 0
    assert reports[0]["loss"] == pytest.approx(reports[1]["loss"], abs=1e-4)
    assert [r["throughput"]["decode"] for r in reports] == ["worker", "device"]
    assert reports[1]["throughput"]["tiles_per_s"] > 0
    assert reports[1]["throughput"]["peak_gpu_memory_gib"] is None  # CPU


# --- prefetching the next slide ------------------------------------------------------------


def test_prefetcher_works_ahead_and_raises_in_turn() -> None:
    started: list[str] = []
    second_started = threading.Event()

    def work(key: str) -> str:
        started.append(key)
        if key == "b":
            second_started.set()
        if key == "c":
            raise ValueError("c is broken")
        return key.upper()

    with Prefetcher(work, ["a", "b", "c", "d"], depth=1) as ahead:
        assert ahead.get("a") == "A"
        assert second_started.wait(5)  # b was under way before anyone asked for it
        assert ahead.get("b") == "B"
        with pytest.raises(ValueError, match="c is broken"):
            ahead.get("c")
        assert ahead.get("d") == "D"
        assert ahead.get("z") == "Z"  # not listed: computed on the spot
    assert sorted(started) == ["a", "b", "c", "d", "z"]  # each computed once
    with Prefetcher(work, ["a", "b"], depth=0) as now:
        started.clear()
        assert now.get("a") == "A" and started == ["a"]  # nothing ahead


def test_prefetcher_close_drops_work_not_started() -> None:
    """close() cancels queued keys and waits only for the one running: a close that just
    waited would run every queued key."""
    import threading

    calls: list[int] = []
    release = threading.Event()

    def blocked(key: int) -> int:
        calls.append(key)
        if key:  # the worker's keys wait until the test lets them finish
            release.wait(10)
        return key

    ahead = Prefetcher(blocked, list(range(10)), depth=3)
    assert ahead.get(0) == 0  # computed on the spot; 1-3 queued on the one worker thread
    closing = threading.Thread(target=ahead.close)
    closing.start()
    deadline = time.monotonic() + 10
    while ahead._futures and time.monotonic() < deadline:  # close() cancels, then waits
        time.sleep(0.01)
    release.set()
    closing.join(10)
    assert not closing.is_alive()
    assert sorted(calls) in ([0], [0, 1])  # 1 may have been running; 2 and 3 never start


def test_predict_prefetches_the_next_slide(
    tmp_path: Path,
    checkpoint: Path,
    svs_slide,
    svs_slide_b,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """With prefetching, slide b is planned in the background while slide a is predicted;
    the results are those of a run without it."""
    import histoduo.predict.run as predict_module

    planned_in: dict[str, str] = {}
    plan = predict_module.plan_slide

    def spy(source, params, tiling):  # noqa: ANN001, ANN202
        planned_in[source.name] = threading.current_thread().name
        return plan(source, params, tiling)

    monkeypatch.setattr(predict_module, "plan_slide", spy)
    sources = [SlideSource(svs_slide.path), SlideSource(svs_slide_b.path)]
    results = {}
    for depth in (0, 1):
        out = tmp_path / f"depth{depth}"
        planned_in.clear()
        predict_run(
            checkpoint, out, PredictParams(workers=0, prefetch_slides=depth), sources=sources
        )
        results[depth] = [np.load(out / s.name / "scores.npz")["probs"] for s in sources]
        threads = dict(planned_in)
        if depth:
            assert threads["svs_b"].startswith("prefetch")
        else:
            assert not any(t.startswith("prefetch") for t in threads.values())
    for a, b in zip(results[0], results[1]):
        assert np.array_equal(a, b)


# --- the GPU benchmark ---------------------------------------------------------------------


def test_bench_gpu_says_no_cuda_and_exits_0(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench_gpu.py would run for minutes")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--cache", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert not list(tmp_path.iterdir())  # wrote nothing
