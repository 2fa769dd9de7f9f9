"""Input validation (issue 18): bad options, slide lists, checkpoints, annotations and files
each end in one clear error naming the file (no traceback, nothing half-written) or in a
correct result. Runs through the real CLI like test_faults.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_faults import TILE, fails, leftovers, no_store_slides, succeeds

from histoduo.store import TileStore
from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 256 x 256 px synthetic slides at 0.5 um/px."""
    folder = tmp_path_factory.mktemp("validation")
    for i in range(2):
        spec = SyntheticSlideSpec(level0_width=256, level0_height=256, mpp=0.5, seed=i)
        write_synthetic_slide(folder / f"s{i}.svs", spec, workers=1).truth_geojson.unlink()
    return folder


# --- option values refused before any work ------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--label-coverage", "2", ("label coverage", "(0, 1]", "2")),
        ("--label-coverage", "nan", ("label coverage",)),
        ("--mask-mpp", "nan", ("mask mpp", "positive", "nan")),
        ("--mask-mpp", "0", ("mask mpp", "positive")),
        ("--workers", "-3", ("--workers", "greater than or equal to 0")),
    ],
)
def test_bad_option_values_refused(
    slides: Path, tmp_path: Path, flag: str, value: str, words: tuple[str, ...]
) -> None:
    out = tmp_path / "t.h5"
    fails("tile", slides / "s0.svs", "-o", out, "--tile-size", "64", "-q", flag, value,
          mentions=words)  # fmt: skip
    assert not out.exists() and not leftovers(tmp_path)


# --- slide lists ------------------------------------------------------------------------
def test_symlink_loop_is_a_clear_error(slides: Path, tmp_path: Path) -> None:
    (tmp_path / "a.svs").symlink_to(tmp_path / "b.svs")
    (tmp_path / "b.svs").symlink_to(tmp_path / "a.svs")
    for extra in ([], ["--skip-errors"]):
        fails("tile", tmp_path / "a.svs", slides / "s0.svs", "-o", tmp_path / "t.h5", *TILE,
              *extra, mentions=("a.svs", "symlink loop"))  # fmt: skip
    assert no_store_slides(tmp_path / "t.h5")


def test_csv_listing_a_slide_twice_tiles_it_once(slides: Path, tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{slides / 's0.svs'},0.5\n{slides / 's0.svs'},0.5\n")
    text = succeeds("tile", table, "-o", tmp_path / "t.h5", "--dry-run", *TILE)
    assert "from 1 slide(s)" in text and "1 tiled" in text, text
    assert TileStore(tmp_path / "t.h5").slides == ["s0"]
    report = json.loads((tmp_path / "t.h5.report.json").read_text())
    assert len(report["slides"]) == 1
    # The same slide twice with two different mpp values is ambiguous: refused.
    table.write_text(f"path,mpp\n{slides / 's0.svs'},0.5\n{slides / 's0.svs'},0.4\n")
    fails("tile", table, "-o", tmp_path / "u.h5", *TILE, mentions=("s0.svs", "listed twice"))


def test_csv_with_a_byte_order_mark(slides: Path, tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    # Excel's "CSV UTF-8" starts with a BOM, which used to hide the 'path' column.
    table.write_bytes(b"\xef\xbb\xbf" + f"path,mpp\n{slides / 's1.svs'},0.5\n".encode())
    succeeds("tile", table, "-o", tmp_path / "t.h5", "--dry-run", *TILE)
    assert TileStore(tmp_path / "t.h5").slides == ["s1"]


@pytest.mark.parametrize("mpp", ["inf", "nan", "1e300"])
def test_csv_absurd_mpp(slides: Path, tmp_path: Path, mpp: str) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{slides / 's0.svs'},{mpp}\n")
    text = fails("tile", table, "-o", tmp_path / "t.h5", *TILE, mentions=("slides.csv:2", "mpp"))
    assert ">= inf" not in text
    assert not (tmp_path / "t.h5").exists()
    fails("tile", slides / "s0.svs", "--slide-mpp", mpp, "-o", tmp_path / "t.h5", *TILE,
          mentions=("--slide-mpp", "mpp"))  # fmt: skip


# --- checkpoints ----------------------------------------------------------------------------
def _rewrite_meta(source: Path, target: Path, change) -> Path:  # noqa: ANN001
    """A copy of a checkpoint whose JSON header has ``change(header)`` applied; the tensors
    stay as they are (what a hand-edited or hostile file looks like)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    header = json.loads(metadata["histoduo"])
    change(header)
    metadata["histoduo"] = json.dumps(header)
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_faults import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", ["normal", "tumour"])


def _config_change(**changes: object):  # noqa: ANN202
    def change(header: dict) -> None:
        header["meta"]["model_config"].update(changes)

    return change


def _meta_change(**changes: object):  # noqa: ANN202
    def change(header: dict) -> None:
        header["meta"].update(changes)

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_config_change(scale_depth=10**6), ("scale_depth", "0-64", "1000000")),
        (_config_change(embed_dim=10**6), ("embed_dim", "1-8192")),
        (_config_change(embed_dim="32"), ("embed_dim", "integer")),
        (_config_change(stages=[2, 3, 10**9]), ("stages",)),
        (_config_change(mlp_ratio=float("nan")), ("mlp_ratio",)),
        (_meta_change(target_mpp="1.0"), ("target_mpp", "number")),
        (_meta_change(tile_size_px=10**9), ("tile_size_px", "8-8192")),
        (_meta_change(std=[0.0, 0.2, 0.2]), ("std",)),
    ],
)
def test_checkpoint_header_validated_before_building(
    checkpoint: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change, words
) -> None:  # noqa: ANN001
    import histoduo.models as models
    import histoduo.models.factory as factory

    bad = _rewrite_meta(checkpoint, tmp_path / "bad.pt", change)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built from an unchecked config")

    # Refused from the header alone: the builder is never reached.
    monkeypatch.setattr(factory, "build_model", never)
    monkeypatch.setattr(models, "build_model", never)
    fails("predict", "-m", bad, slides / "s0.svs", "-o", tmp_path / "p", "--device", "cpu",
          "--workers", "0", "-q", mentions=("bad.pt", *words))  # fmt: skip
    fails("model-info", "--model", bad, "--no-memory", mentions=("bad.pt", *words))
    assert not (tmp_path / "p" / "s0").exists()


def test_checkpoint_weights_of_other_shapes(checkpoint: Path, tmp_path: Path) -> None:
    from histoduo.models.checkpoint import CheckpointError, load_model

    # The config says D 64, the tensors were saved for D 32: caught on the meta device.
    bad = _rewrite_meta(checkpoint, tmp_path / "wide.pt", _config_change(embed_dim=64))
    with pytest.raises(CheckpointError, match=r"wide\.pt.*other shapes"):
        load_model(bad)


def test_checkpoint_nan_weights(slides: Path, tmp_path: Path) -> None:
    import torch
    from model_configs import tiny
    from test_faults import _meta

    from histoduo.models import build_model
    from histoduo.models.checkpoint import save_checkpoint

    state = build_model(tiny(num_classes=2)).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and "weight" in k)
    state[name] = torch.full_like(state[name], float("nan"))
    path = save_checkpoint(tmp_path / "nan.pt", state, _meta(["normal", "tumour"]))
    text = fails("predict", "-m", path, slides / "s0.svs", "-o", tmp_path / "p",
                 "--device", "cpu", "--workers", "0", "-q", mentions=("nan.pt", "NaN"))  # fmt: skip
    assert "DataLoader" not in text


def test_checkpoint_huge_or_truncated_header_and_folder(checkpoint: Path, tmp_path: Path) -> None:
    import struct

    from histoduo.models.checkpoint import CheckpointError, load_checkpoint

    huge = tmp_path / "huge.pt"
    huge.write_bytes(struct.pack("<Q", 200_000_000) + b'{"a": 1}' + b" " * 100)
    with pytest.raises(CheckpointError, match=r"huge\.pt.*header claims 200,000,000 bytes"):
        load_checkpoint(huge)
    cut = tmp_path / "cut.pt"
    data = checkpoint.read_bytes()
    (header_bytes,) = struct.unpack("<Q", data[:8])
    cut.write_bytes(data[: 8 + header_bytes // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated"):
        load_checkpoint(cut)
    folder = tmp_path / "run"
    folder.mkdir()
    os.link(checkpoint, folder / "best.pt")
    with pytest.raises(CheckpointError, match=r"run: is a folder.*best\.pt"):
        load_checkpoint(folder)
    fails("predict", "-m", folder, checkpoint, "-o", tmp_path / "p", "--device", "cpu", "-q",
          mentions=("run", "folder", "best.pt"))  # fmt: skip


# --- full and read-only disks -------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A mounted tmpfs of a given size (root only: CI runs as root)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted: list[Path] = []

    def mount(name: str, size: str, *, read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_full_disk_during_tile(slides: Path, small_disk, tmp_path: Path) -> None:  # noqa: ANN001
    import histoduo.runtime.files as files

    raw = ["--tile-size", "64", "--mpp", "0.5", "--encoding", "raw", "--workers", "0", "-q"]
    succeeds("tile", slides / "s0.svs", "-o", tmp_path / "alone.h5", *raw)
    one_slide = sum(f.stat().st_size for f in tmp_path.glob("alone.h5*") if f.is_file()) + sum(
        f.stat().st_size for f in (tmp_path / "alone.h5.d").rglob("*") if f.is_file()
    )
    disk = small_disk("full", "6m")
    out = disk / "t.h5"
    # Room for slide s0 beyond the writers' reserve, not for s1.
    free = shutil.disk_usage(disk).free
    # (A writer wants twice each block free: HDF5 may write it again when the file closes.)
    (disk / "ballast").write_bytes(b"\0" * (free - files.DISK_RESERVE_BYTES - 2 * one_slide))
    text = fails("tile", slides / "s0.svs", slides / "s1.svs", "-o", out, *raw,
                 mentions=("s1.h5", "no space left"))  # fmt: skip
    assert text.count("no space left") == 1  # printed once
    assert "1 finished slide(s) were saved" in text
    # The store lists the finished slide, which reads back whole; nothing half-written.
    assert TileStore(out).slides == ["s0"] and len(TileStore(out).coords("s0")) > 0
    assert not leftovers(disk)
    report = json.loads((disk / "t.h5.report.json").read_text())
    assert [(s["slide"], s["status"]) for s in report["slides"]] == [
        ("s0", "done"), ("s1", "write-failed")]  # fmt: skip
    # --skip-errors does not march on through a full disk either.
    (disk / "ballast").unlink()
    (disk / "ballast").write_bytes(b"\0" * (free - files.DISK_RESERVE_BYTES - 20_000))
    fails("tile", slides / "s1.svs", slides / "s0.svs", "-o", disk / "u.h5", "--skip-errors",
          *raw, mentions=("s1.h5", "no space left"))  # fmt: skip
    assert no_store_slides(disk / "u.h5") and not leftovers(disk)


def test_read_only_output_for_tile_and_merge(slides: Path, small_disk, tmp_path: Path) -> None:  # noqa: ANN001
    store = tmp_path / "a.h5"
    succeeds("tile", slides / "s0.svs", "-o", store, "--dry-run", *TILE)
    disk = small_disk("ro", "1m", read_only=True)
    text = fails("tile", slides / "s0.svs", "-o", disk / "t.h5", *TILE,
                 mentions=(str(disk), "read-only"))  # fmt: skip
    assert "Traceback" not in text and text.count("read-only") == 1
    fails("merge", store, "-o", disk / "m.h5", mentions=(str(disk), "read-only"))
    assert not list(disk.iterdir())


# --- merge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_merge_with_a_broken_slide_file(slides: Path, tmp_path: Path, damage: str) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    succeeds("tile", slides / "s0.svs", "-o", a, *TILE)
    succeeds("tile", slides / "s1.svs", "-o", b, *TILE)
    broken = tmp_path / "b.h5.d" / "clam" / "patches" / "s1.h5"
    if damage == "missing":
        broken.unlink()
    else:
        data = broken.read_bytes()
        broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.h5"
    fails("merge", a, b, "-o", out, mentions=("s1.h5", damage))
    assert not out.exists() and not (tmp_path / "out.h5.d").exists()


# --- GeoJSON annotations --------------------------------------------------------------------
def _feature(geometry: dict, name: object = "tumour") -> dict:
    properties = {"objectType": "annotation", "classification": {"name": name}}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


_SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]]}


def _tile_with(slides: Path, tmp_path: Path, text: str | bytes) -> tuple[Path, list[object]]:
    folder = tmp_path / "annotations"
    folder.mkdir()
    target = folder / "s0.geojson"
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "t.h5"
    return out, ["tile", slides / "s0.svs", "-o", out, "--annotations", folder, "--dry-run",
                 *TILE]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "words"),
    [({"a": 1}, ("classification name must be a string", '{"a": 1}')),
     ([1, 2], ("classification name must be a string",)),
     (2.5, ("classification name must be a string", "2.5"))],
)  # fmt: skip
def test_geojson_class_name_not_a_string(
    slides: Path, tmp_path: Path, name: object, words: tuple[str, ...]
) -> None:
    text = json.dumps({"type": "FeatureCollection", "features": [_feature(_SQUARE, name)]})
    out, command = _tile_with(slides, tmp_path, text)
    fails(*command, mentions=("s0.geojson", *words))
    assert no_store_slides(out)


def test_geojson_class_name_integer_is_that_class(slides: Path, tmp_path: Path) -> None:
    text = json.dumps({"type": "FeatureCollection", "features": [_feature(_SQUARE, 3)]})
    out, command = _tile_with(slides, tmp_path, text)
    succeeds(*command)
    assert TileStore(out).class_names == ["3"]


def test_geojson_nested_too_deep(slides: Path, tmp_path: Path) -> None:
    depth = 100_000
    out, command = _tile_with(slides, tmp_path, "[" * depth + "]" * depth)
    fails(*command, mentions=("s0.geojson", "nested too deeply"))
    collection: dict = _SQUARE
    for _ in range(40):  # GeometryCollections in GeometryCollections, JSON-parseable
        collection = {"type": "GeometryCollection", "geometries": [collection]}
    (tmp_path / "annotations" / "s0.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [_feature(collection)]})
    )
    fails(*command, mentions=("s0.geojson", "nested more than"))
    assert no_store_slides(out)


@pytest.mark.parametrize("value", ["1e150", "NaN", "Infinity", "-1e12"])
def test_geojson_absurd_coordinates(slides: Path, tmp_path: Path, value: str) -> None:
    ring = f"[[0, 0], [{value}, 0], [200, 200], [0, 200], [0, 0]]"
    text = (
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
        f'{{"type": "Polygon", "coordinates": [{ring}]}}, "properties": '
        '{"classification": {"name": "tumour"}}}]}'
    )
    out, command = _tile_with(slides, tmp_path, text)
    fails(*command, mentions=("s0.geojson", "coordinates"))
    assert no_store_slides(out)


def test_geojson_points_and_lines_are_warned_about(slides: Path, tmp_path: Path) -> None:
    features = [
        _feature(_SQUARE),
        _feature({"type": "Point", "coordinates": [10, 10]}),
        _feature({"type": "LineString", "coordinates": [[0, 0], [50, 50]]}),
    ]
    text = json.dumps({"type": "FeatureCollection", "features": features})
    # With a byte-order mark, as some Windows tools write it: accepted.
    out, command = _tile_with(slides, tmp_path, b"\xef\xbb\xbf" + text.encode())
    from test_faults import cli

    result = cli(*command)
    assert result.exit_code == 0, result.output
    assert "ignored 2 point/line annotation(s)" in " ".join(result.output.split())
    assert TileStore(out).class_names == ["tumour"]


# --- heatmap -----------------------------------------------------------------------------------
def _scored_run(tmp_path: Path) -> Path:
    from test_heatmap import _scores

    run = tmp_path / "run"
    for name in ("a", "b"):
        (run / name).mkdir(parents=True)
        _scores().save(run / name / "scores.npz")
        (run / name / "summary.json").write_text("{}")
    return run


def test_heatmap_truncated_scores(tmp_path: Path) -> None:
    run = _scored_run(tmp_path)
    data = (run / "b" / "scores.npz").read_bytes()
    (run / "b" / "scores.npz").write_bytes(data[: len(data) // 2])
    fails("heatmap", run, mentions=("b/scores.npz", "truncated"))
    fails("heatmap", run / "b", mentions=("b/scores.npz", "truncated"))
    assert not leftovers(tmp_path)


def test_heatmap_slide_without_scores(tmp_path: Path) -> None:
    run = _scored_run(tmp_path)
    (run / "b" / "scores.npz").unlink()
    fails("heatmap", run, mentions=("b/scores.npz", "not found", "1 slide folder(s)"))
    assert list((run / "a").glob("*.png"))  # the others are still redrawn


def test_convert_checkpoint_onto_a_folder(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    fails("convert-checkpoint", checkpoint, folder, "--trust-checkpoint",
          mentions=("models", "folder"))  # fmt: skip
    assert list(folder.iterdir()) == []


# --- unclear messages made clear -----------------------------------------------------------
def test_truncated_real_aperio_is_called_truncated(real_slide: Path, tmp_path: Path) -> None:
    # Aperio writes its first image directory at the end: a cut copy has no directory at all,
    # which readers reported as an "unsupported format".
    data = real_slide.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    for command in (["info", cut], ["tile", cut, "-o", tmp_path / "t.h5", *TILE]):
        text = fails(*command, mentions=("cut.svs", "truncated", "first image directory"))
        message = text.split("cut.svs:", 1)[1]
        assert "unsupported" not in message and message.count("truncated") == 1
        assert "were saved" not in text  # no slide was finished, so none was saved
    assert no_store_slides(tmp_path / "t.h5")


def test_dicom_without_image_type_says_what_is_missing(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from test_faults import _write_dicom_wsi

    dicom = tmp_path / "dicom" / "slide.dcm"
    dicom.parent.mkdir()
    _write_dicom_wsi(dicom, np.full((128, 128, 3), 200, np.uint8), mpp=0.5)
    ds = pydicom.dcmread(dicom)
    del ds.ImageType  # as some exporters write it; OpenSlide and wsidicom both need it
    ds.save_as(dicom)
    for command in (["info", dicom], ["tile", dicom, "-o", tmp_path / "t.h5", *TILE]):
        text = fails(*command, mentions=("slide.dcm", "without the required attribute(s)",
                                         "ImageType"))  # fmt: skip
        assert "image flavor" not in text
    assert no_store_slides(tmp_path / "t.h5")


def _lying_tiff(path: Path, *, tiled: bool) -> Path:
    """A 256 x 256 px TIFF (a few hundred kB) whose header says 200,000 x 200,000 px."""
    import struct

    import tifffile

    layout = {"tile": (256, 256)} if tiled else {"rowsperstrip": 64}
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **layout)  # fmt: skip
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        for code in (256, 257):  # ImageWidth, ImageLength as one LONG each
            struct.pack_into("<HHII", data, tif.pages[0].tags[code].offset, code, 4, 1, 200_000)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "stripped"])
def test_tiff_header_claiming_200000_px_is_refused(tmp_path: Path, tiled: bool) -> None:
    liar = _lying_tiff(tmp_path / "liar.tif", tiled=tiled)
    # Before: minutes of blank reads without a word (tiled) or a 112 GiB allocation (strips).
    for command in (["info", liar], ["tile", liar, "-o", tmp_path / "t.h5", *TILE]):
        fails(*command, mentions=("liar.tif", "claims 200,000 x 200,000 px", "holds only"))
    assert no_store_slides(tmp_path / "t.h5")


def test_overview_of_a_huge_level_is_bounded(slides: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import histoduo.slide.base as base
    from histoduo.slide import SlideError, open_slide

    # An honest slide whose coarsest level is above the bound is refused, not decoded for
    # hours: checked with the bound lowered below this small slide's smallest level.
    with open_slide(slides / "s0.svs") as slide:
        smallest = min(w * h for w, h in slide.level_dimensions)
        monkeypatch.setattr(base, "MAX_OVERVIEW_LEVEL_PX", smallest - 1)
        with pytest.raises(SlideError, match=r"s0\.svs.*coarsest usable level.*pyramid"):
            slide.thumbnail(64)
        monkeypatch.setattr(base, "MAX_OVERVIEW_LEVEL_PX", smallest)
        assert slide.thumbnail(64)[0].ndim == 3


def test_read_only_output_for_predict(checkpoint: Path, slides: Path, small_disk) -> None:  # noqa: ANN001
    disk = small_disk("ro", "1m", read_only=True)
    text = fails("predict", "-m", checkpoint, slides / "s0.svs", "-o", disk / "p", "--device",
                 "cpu", "--workers", "0", "-q", mentions=(str(disk), "read-only"))  # fmt: skip
    assert "Errno" not in text and text.count("read-only") == 1
