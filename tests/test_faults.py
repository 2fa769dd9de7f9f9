"""Fault injection: each command's inputs broken one way at a time, through the real CLI.

Every case must end in a clear error (naming the file and the problem, a non-zero exit, no
Python traceback, nothing half-written) or in a correct result.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from model_configs import tiny, tiny_meta
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.models import build_model
from histoduo.models.checkpoint import CheckpointMeta, save_checkpoint
from histoduo.store import TileStore
from histoduo.synthetic import DEFAULT_CLASSES, SyntheticSlideSpec, write_synthetic_slide

TILE = ["--tile-size", "64", "--mpp", "1", "--workers", "0", "-q"]
TINY_MODEL = ["--backbone", "resnet18", "--embed-dim", "32", "--scale-depth", "1",
              "--patch-depth", "1", "--scale-heads", "2", "--patch-heads", "2"]  # fmt: skip
TINY_RUN = ["--epochs", "1", "--iterations", "1", "--batch-size", "4", "--workers", "0", "-q"]
PREDICT = ["--device", "cpu", "--workers", "0", "-q"]
CLASSES = ["normal", "tumour"]


# --- helpers ------------------------------------------------------------------------------
def cli(*args: object):  # noqa: ANN201 - click Result
    return CliRunner(env={"COLUMNS": "400"}).invoke(app, [str(a) for a in args])


def _text(result) -> str:  # noqa: ANN001
    return " ".join(result.output.split())


def fails(*args: object, mentions: tuple[str, ...]) -> str:
    """Run a command that must fail cleanly; returns its output on one line."""
    return failed_cleanly(cli(*args), mentions)


def failed_cleanly(result, mentions: tuple[str, ...]) -> str:  # noqa: ANN001
    text = _text(result)
    assert result.exit_code != 0, text
    # A typer.Exit is a SystemExit; anything else escaped the CLI's error handling.
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}: {text}"
    assert "Traceback" not in result.output
    for word in mentions:
        assert word in text, f"{word!r} not in: {text}"
    return text


def succeeds(*args: object) -> str:
    result = cli(*args)
    assert result.exit_code == 0, f"{result.exception!r}: {_text(result)}"
    return _text(result)


def succeeds_raw(*args: object) -> str:
    result = cli(*args)
    assert result.exit_code == 0, f"{result.exception!r}: {_text(result)}"
    return result.stdout


def leftovers(folder: Path) -> list[Path]:
    """Temporary or partial files a failed command must not leave behind."""
    patterns = ("*.tmp", ".*.tmp", "*.parts", "*.prev")
    return sorted(p for pattern in patterns for p in folder.rglob(pattern))


def no_store_slides(path: Path) -> bool:
    """A failed tile run may record an empty store (it resumes); never a partial slide."""
    return not path.exists() or TileStore(path).slides == []


def _meta(class_names: list[str], **model: object) -> CheckpointMeta:
    return tiny_meta(tiny(num_classes=len(class_names), **model), class_names)


def write_checkpoint(path: Path, class_names: list[str], **meta_model: object) -> Path:
    """A tiny checkpoint; ``meta_model`` changes the stored config, not the weights."""
    state = build_model(tiny(num_classes=len(class_names))).state_dict()
    return save_checkpoint(path, state, _meta(class_names, **meta_model))


class _Payload:
    """Unpickling this runs os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _polygon_collection(coords: list[list[float]], class_name: str) -> str:
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [coords]},
        "properties": {"objectType": "annotation", "classification": {"name": class_name}},
    }
    return json.dumps({"type": "FeatureCollection", "features": [feature]})


def _annotations(folder: Path, slide_name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{slide_name}.geojson").write_text(text)
    return folder


# --- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 512 x 512 px synthetic slides at 0.5 um/px; annotations/ labels the left half of
    each 'normal' and the right half 'tumour', so every slide has tiles of both classes."""
    folder = tmp_path_factory.mktemp("faults")
    annotations = folder / "annotations"
    annotations.mkdir()
    for i in range(2):
        spec = SyntheticSlideSpec(level0_width=512, level0_height=512, mpp=0.5, seed=i)
        slide = write_synthetic_slide(folder / f"slide{i}.svs", spec, workers=1)
        slide.truth_geojson.unlink()
        features = [
            json.loads(_polygon_collection(rect, name))["features"][0]
            for rect, name in (
                ([[0, 0], [256, 0], [256, 512], [0, 512]], "normal"),
                ([[256, 0], [512, 0], [512, 512], [256, 512]], "tumour"),
            )
        ]
        (annotations / f"slide{i}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": features})
        )
    return folder


@pytest.fixture(scope="module")
def store(cohort: Path) -> Path:
    path = cohort / "tiles.h5"
    succeeds("tile", cohort / "slide0.svs", cohort / "slide1.svs", "-o", path,
             "--annotations", cohort / "annotations", *TILE)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def checkpoint(cohort: Path) -> Path:
    return write_checkpoint(cohort / "model.pt", CLASSES)


# --- slides -------------------------------------------------------------------------------
def test_truncated_slide(cohort: Path, checkpoint: Path, tmp_path: Path) -> None:
    data = (cohort / "slide0.svs").read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 3])
    fails("info", cut, mentions=("cut.svs", "truncated"))
    fails("tile", cut, "-o", tmp_path / "t.h5", *TILE, mentions=("cut.svs", "truncated"))
    assert no_store_slides(tmp_path / "t.h5")
    fails("predict", "-m", checkpoint, cut, "-o", tmp_path / "p", *PREDICT,
          mentions=("cut.svs", "truncated"))  # fmt: skip
    assert not (tmp_path / "p" / "cut" / "tiles.csv").exists()
    assert not leftovers(tmp_path)


def test_zero_byte_slide(checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    fails("info", empty, mentions=("empty.svs", "empty file"))
    fails("tile", empty, "-o", tmp_path / "t.h5", *TILE, mentions=("empty.svs", "empty file"))
    assert no_store_slides(tmp_path / "t.h5")
    fails("predict", "-m", checkpoint, empty, "-o", tmp_path / "p", *PREDICT,
          mentions=("empty.svs", "empty file"))  # fmt: skip
    assert not leftovers(tmp_path)


def test_random_bytes_slide(tmp_path: Path) -> None:
    noise = tmp_path / "noise.svs"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes())
    # The message says which formats do work.
    fails("info", noise, mentions=("noise.svs", "unsupported", "Aperio .svs", "DICOM"))
    fails("tile", noise, "-o", tmp_path / "t.h5", *TILE, mentions=("noise.svs", "unsupported"))
    fails("tissue", noise, "-o", tmp_path / "masks", mentions=("noise.svs", "unsupported"))
    assert no_store_slides(tmp_path / "t.h5") and not leftovers(tmp_path)


def test_multichannel_fluorescence_qptiff(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "fluo.qptiff"
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as tif:
        for channel in ("DAPI", "CD8", "PanCK", "Autofluorescence"):
            description = (
                '<?xml version="1.0" encoding="utf-8"?><PerkinElmer-QPI-ImageDescription>'
                f"<ImageType>FullResolution</ImageType><Name>{channel}</Name>"
                "</PerkinElmer-QPI-ImageDescription>"
            )
            tif.write(rng.integers(0, 255, (256, 256), np.uint8), tile=(128, 128),
                      photometric="minisblack", description=description, metadata=None,
                      resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    for command in (["info", path], ["tile", path, "-o", tmp_path / "t.h5", *TILE]):
        fails(*command, mentions=("fluo.qptiff", "fluorescence", "4 channels", "brightfield RGB"))
    assert no_store_slides(tmp_path / "t.h5")


def _write_dicom_wsi(path: Path, rgb: np.ndarray, mpp: float, tile_px: int = 64) -> None:
    """A single-level DICOM VL Whole Slide Microscopy image, TILED_FULL, uncompressed RGB."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    height, width = rgb.shape[:2]
    frames = []
    for y in range(0, height, tile_px):
        for x in range(0, width, tile_px):
            frame = np.full((tile_px, tile_px, 3), 255, np.uint8)
            part = rgb[y : y + tile_px, x : x + tile_px]
            frame[: part.shape[0], : part.shape[1]] = part
            frames.append(frame)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality, ds.ImageType = "SM", ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PatientName, ds.PatientID, ds.StudyID = "Fault^Test", "1", "1"
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, 1, "histoduo tests"
    ds.Rows = ds.Columns = tile_px
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mpp / 1000, height * mpp / 1000
    ds.ImagedVolumeDepth = 0.001
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mpp / 1000, mpp / 1000], 0.001  # mm
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = Sequence([optical])
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_wsi_is_read(cohort: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from histoduo.slide import open_slide

    with open_slide(cohort / "slide0.svs") as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)
    (tmp_path / "dicom").mkdir()
    dicom = tmp_path / "dicom" / "slide0.dcm"
    _write_dicom_wsi(dicom, rgb, mpp=0.5)
    info = json.loads(succeeds_raw("info", dicom, "--json"))
    assert (info["level0_width"], info["level0_height"], info["mpp"]) == (512, 512, 0.5)
    assert info["vendor"] == "dicom"
    # The same pixels as the SVS: the same tissue and exactly the same tiles.
    succeeds("tile", dicom, "-o", tmp_path / "dicom.h5", "--dry-run", *TILE)
    succeeds("tile", cohort / "slide0.svs", "-o", tmp_path / "svs.h5", "--dry-run", *TILE)
    coords_dicom = TileStore(tmp_path / "dicom.h5").coords("slide0")
    coords_svs = TileStore(tmp_path / "svs.h5").coords("slide0")
    assert len(coords_svs) > 0 and np.array_equal(coords_dicom, coords_svs)


# --- slide CSVs ---------------------------------------------------------------------------
def test_slide_csv_missing_file(cohort: Path, checkpoint: Path, tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{cohort / 'slide0.svs'},0.5\nabsent.svs,0.5\n")
    fails("tile", table, "-o", tmp_path / "t.h5", *TILE, mentions=("absent.svs", "not found"))
    fails("predict", "-m", checkpoint, table, "-o", tmp_path / "p", *PREDICT,
          mentions=("absent.svs", "not found"))  # fmt: skip
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("mpp", ["abc", "0", "-1"])
def test_slide_csv_bad_mpp(cohort: Path, checkpoint: Path, tmp_path: Path, mpp: str) -> None:
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{cohort / 'slide0.svs'},{mpp}\n")
    problem = f"mpp {mpp!r} is not a number" if mpp == "abc" else "mpp must be positive"
    fails("tile", table, "-o", tmp_path / "t.h5", *TILE,
          mentions=("slides.csv:2", problem))  # fmt: skip
    assert not (tmp_path / "t.h5").exists()
    fails("predict", "-m", checkpoint, table, "-o", tmp_path / "p", *PREDICT,
          mentions=("slides.csv:2", problem))  # fmt: skip
    assert not (tmp_path / "p").exists()


def test_slide_csv_empty_mpp_cell(cohort: Path, tmp_path: Path) -> None:
    # An empty cell means "use the slide's own mpp": a correct result, not an error.
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{cohort / 'slide0.svs'},\n")
    succeeds("tile", table, "-o", tmp_path / "t.h5", "--dry-run", *TILE)
    assert TileStore(tmp_path / "t.h5").attrs("slide0")["slide_mpp"] == pytest.approx(0.5)
    # ... and a slide without an mpp of its own is then a clear error.
    spec = SyntheticSlideSpec(level0_width=256, level0_height=256, mpp=0.5, write_mpp=False)
    write_synthetic_slide(tmp_path / "nompp.svs", spec, workers=1)
    table.write_text("path,mpp\nnompp.svs,\n")
    fails("tile", table, "-o", tmp_path / "n.h5", *TILE,
          mentions=("nompp.svs", "no resolution", "--slide-mpp", "'mpp' column"))  # fmt: skip
    assert no_store_slides(tmp_path / "n.h5")


# --- tiling options -----------------------------------------------------------------------
def test_tile_size_zero(cohort: Path, checkpoint: Path, tmp_path: Path) -> None:
    slide = cohort / "slide0.svs"
    fails("tile", slide, "-o", tmp_path / "t.h5", "--tile-size", "0", "--workers", "0",
          mentions=("tile size", "got 0"))  # fmt: skip
    fails("predict", "-m", checkpoint, slide, "-o", tmp_path / "p", "--tile-size", "0",
          *PREDICT, mentions=("tile size", "got 0"))  # fmt: skip
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "p").exists()


def test_min_tissue_two(cohort: Path, checkpoint: Path, tmp_path: Path) -> None:
    slide = cohort / "slide0.svs"
    fails("tile", slide, "-o", tmp_path / "t.h5", "--min-tissue", "2", "--workers", "0",
          mentions=("tissue fraction", "0-1", "2"))  # fmt: skip
    fails("predict", "-m", checkpoint, slide, "-o", tmp_path / "p", "--min-tissue", "2",
          *PREDICT, mentions=("tissue fraction", "0-1"))  # fmt: skip
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "p").exists()


# --- tile stores --------------------------------------------------------------------------
def _broken_store_commands(path: Path, checkpoint: Path, tmp_path: Path) -> list[list[object]]:
    return [
        ["train", path, "-o", tmp_path / "run", *TINY_MODEL, *TINY_RUN],
        ["evaluate", path, "-m", checkpoint, "--device", "cpu"],
        ["predict", "-m", checkpoint, "--tiles", path, "-o", tmp_path / "p", *PREDICT],
        ["merge", path, path.with_name("other.h5"), "-o", tmp_path / "merged.h5"],
    ]


def test_truncated_tiles_h5(store: Path, checkpoint: Path, tmp_path: Path) -> None:
    data = store.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    shutil.copy(store, tmp_path / "other.h5")
    for command in _broken_store_commands(cut, checkpoint, tmp_path):
        fails(*command, mentions=("cut.h5", "HDF5", "truncated"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged.h5").exists()
    assert not leftovers(tmp_path)


def test_random_bytes_tiles_h5(store: Path, checkpoint: Path, tmp_path: Path) -> None:
    noise = tmp_path / "noise.h5"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    shutil.copy(store, tmp_path / "other.h5")
    for command in _broken_store_commands(noise, checkpoint, tmp_path):
        fails(*command, mentions=("noise.h5", "cannot open as HDF5"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged.h5").exists()
    assert not leftovers(tmp_path)


def test_dry_run_store_given_to_train(cohort: Path, checkpoint: Path, tmp_path: Path) -> None:
    dry = tmp_path / "dry.h5"
    succeeds("tile", cohort / "slide0.svs", cohort / "slide1.svs", "-o", dry, "--dry-run",
             "--annotations", cohort / "annotations", *TILE)  # fmt: skip
    assert TileStore(dry).labels("slide0") is not None  # labelled, so only pixels are missing
    fails("train", dry, "-o", tmp_path / "run", *TINY_MODEL, *TINY_RUN,
          mentions=("dry.h5", "no pixels", "--dry-run"))  # fmt: skip
    assert not (tmp_path / "run").exists()
    fails("predict", "-m", checkpoint, "--tiles", dry, "-o", tmp_path / "p", *PREDICT,
          mentions=("dry.h5", "no pixels"))  # fmt: skip
    fails("evaluate", dry, "-m", checkpoint, "--device", "cpu", mentions=("dry.h5", "no pixels"))


def test_merge_of_two_stores_holding_the_same_slide(
    cohort: Path, store: Path, tmp_path: Path
) -> None:
    only0 = tmp_path / "only0.h5"
    succeeds("tile", cohort / "slide0.svs", "-o", only0, "--annotations",
             cohort / "annotations", *TILE)  # fmt: skip
    merged = tmp_path / "merged.h5"
    fails("merge", store, only0, "-o", merged, mentions=("only0.h5", "'slide0'", "more than one"))
    assert not merged.exists() and not leftovers(tmp_path)


# --- GeoJSON ------------------------------------------------------------------------------
def test_geojson_invalid_json(cohort: Path, tmp_path: Path) -> None:
    folder = _annotations(tmp_path / "ann", "slide0", '{"type": "FeatureCollection", "feat')
    fails("tile", cohort / "slide0.svs", "-o", tmp_path / "t.h5", "--annotations", folder,
          *TILE, mentions=("slide0.geojson", "not valid JSON"))  # fmt: skip
    fails("tissue", cohort / "slide0.svs", "-o", tmp_path / "masks", "--roi",
          folder / "slide0.geojson", mentions=("slide0.geojson", "not valid JSON"))  # fmt: skip
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "masks").exists()
    assert not leftovers(tmp_path)


def test_geojson_self_intersecting_polygon(cohort: Path, tmp_path: Path) -> None:
    bowtie = [[0, 0], [400, 400], [400, 0], [0, 400], [0, 0]]
    folder = _annotations(tmp_path / "ann", "slide0", _polygon_collection(bowtie, "normal"))
    mentions = ("slide0.geojson", "feature 1 ('normal')", "self-intersecting", "x=200, y=200")
    fails("tile", cohort / "slide0.svs", "-o", tmp_path / "t.h5", "--annotations", folder,
          *TILE, mentions=mentions)  # fmt: skip
    assert no_store_slides(tmp_path / "t.h5")
    fails("tissue", cohort / "slide0.svs", "-o", tmp_path / "masks", "--roi",
          folder / "slide0.geojson", mentions=mentions)  # fmt: skip
    assert not leftovers(tmp_path)


def test_geojson_coordinates_outside_slide(cohort: Path, tmp_path: Path) -> None:
    far = [[10_000, 10_000], [20_000, 10_000], [20_000, 20_000], [10_000, 20_000]]
    folder = _annotations(tmp_path / "far", "slide0", _polygon_collection(far, "normal"))
    mentions = ("slide0.geojson", "entirely outside the slide", "512 x 512")
    fails("tile", cohort / "slide0.svs", "-o", tmp_path / "t.h5", "--annotations", folder,
          *TILE, mentions=mentions)  # fmt: skip
    assert no_store_slides(tmp_path / "t.h5")
    fails("tissue", cohort / "slide0.svs", "-o", tmp_path / "masks", "--roi",
          folder / "slide0.geojson", mentions=mentions)  # fmt: skip
    # Partly outside is fine: the polygon is cut at the slide's edge.
    beyond = [[-100, -100], [9000, -100], [9000, 9000], [-100, 9000]]
    folder = _annotations(tmp_path / "beyond", "slide0", _polygon_collection(beyond, "normal"))
    succeeds("tile", cohort / "slide0.svs", "-o", tmp_path / "ok.h5", "--annotations", folder,
             "--dry-run", *TILE)  # fmt: skip
    labels = TileStore(tmp_path / "ok.h5").labels("slide0")
    assert labels is not None and len(labels) > 0 and set(labels.tolist()) == {0}


def test_geojson_unknown_class(cohort: Path, tmp_path: Path) -> None:
    square = [[0, 0], [400, 0], [400, 400], [0, 400]]
    folder = _annotations(tmp_path / "ann", "slide0", _polygon_collection(square, "martian"))
    fails("tile", cohort / "slide0.svs", "-o", tmp_path / "t.h5", "--annotations", folder,
          "--classes", ",".join(DEFAULT_CLASSES), *TILE,
          mentions=("slide0.geojson", "unknown class", "'martian'"))  # fmt: skip
    assert no_store_slides(tmp_path / "t.h5") and not leftovers(tmp_path)


# --- image import -------------------------------------------------------------------------
def _image_folder(root: Path, classes: tuple[str, ...], count: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (64, 64, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.jpg")
    return root


def test_import_folder_with_one_class(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "patches", ("tumour",))
    out = tmp_path / "one.h5"
    fails("import", folder, "-o", out, "--mpp", "0.5", "--workers", "0",
          mentions=("patches", "only one class (tumour)", "--classes"))  # fmt: skip
    assert not out.exists() and not leftovers(tmp_path)


def test_import_non_image_file(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "patches", ("normal", "tumour"))
    (folder / "normal" / "notes.txt").write_text("scanned on the old scanner")  # ignored
    (folder / "tumour" / "fake.png").write_text("this is not a PNG")
    out = tmp_path / "t.h5"
    fails("import", folder, "-o", out, "--mpp", "0.5", "--workers", "0",
          mentions=("fake.png", "cannot read as an image", "--skip-errors"))  # fmt: skip
    assert not out.exists() and not leftovers(tmp_path)
    succeeds("import", folder, "-o", out, "--mpp", "0.5", "--workers", "0", "--skip-errors")
    report = json.loads(out.with_name("t.h5.report.json").read_text())
    assert [s["image"] for s in report["skipped"]] == ["tumour/fake.png"]
    with TileStore(out) as imported:
        assert sum(imported.num_tiles(s) for s in imported.slides) == 6


def test_import_corrupt_jpeg(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "patches", ("normal", "tumour"))
    victim = folder / "tumour" / "tumour_0.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    out = tmp_path / "t.h5"
    fails("import", folder, "-o", out, "--mpp", "0.5", "--workers", "0",
          mentions=("tumour_0.jpg", "--skip-errors"))  # fmt: skip
    assert not out.exists() and not leftovers(tmp_path)


# --- checkpoints --------------------------------------------------------------------------
def test_checkpoint_from_another_model_config(cohort: Path, store: Path, tmp_path: Path) -> None:
    other = write_checkpoint(tmp_path / "other.pt", CLASSES, embed_dim=64)
    fails("predict", "-m", other, cohort / "slide0.svs", "-o", tmp_path / "p", *PREDICT,
          mentions=("other.pt", "do not fit the stored model config"))  # fmt: skip
    assert not (tmp_path / "p").exists()
    fails("evaluate", store, "-m", other, "--device", "cpu",
          mentions=("other.pt", "do not fit"))  # fmt: skip
    # A model for other classes than the store's labels.
    four = write_checkpoint(tmp_path / "four.pt", list(DEFAULT_CLASSES))
    fails("evaluate", store, "-m", four, "--device", "cpu", mentions=("tiles.h5", "differ"))


def test_malicious_pickle_checkpoint(cohort: Path, store: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "histoduo-checkpoint", "meta": _Payload(marker)}, evil)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(evil, run / "last.pt")
    commands = [
        ["predict", "-m", evil, cohort / "slide0.svs", "-o", tmp_path / "p", *PREDICT],
        ["evaluate", store, "-m", evil, "--device", "cpu"],
        ["model-info", "--model", evil, "--no-memory"],
        ["convert-checkpoint", evil, tmp_path / "converted.pt"],
        ["train", store, "-o", run, "--resume", *TINY_MODEL, *TINY_RUN],
        ["train", store, "-o", tmp_path / "run2", "--backbone-weights", evil,
         *TINY_MODEL, *TINY_RUN],
    ]  # fmt: skip
    for command in commands:
        result = cli(*command)
        assert not marker.exists(), f"the pickle ran code: {command[0]}"
        named = "last.pt" if "--resume" in command else "evil.pt"
        failed_cleanly(result, mentions=(named, "pickle", "--trust-checkpoint"))
    assert not (tmp_path / "p").exists() and not (tmp_path / "converted.pt").exists()


def test_old_checkpoint_loads_with_trust_and_a_warning(tmp_path: Path) -> None:
    classes = ["normal", "tumour"]
    meta = _meta(classes)
    state = build_model(tiny(num_classes=2)).state_dict()
    old = tmp_path / "old.pt"
    torch.save({"format": "histoduo-checkpoint", "format_version": 1, "meta": meta.to_dict(),
                "model_state": state}, old)  # fmt: skip
    fails("model-info", "--model", old, "--no-memory",
          mentions=("old.pt", "--trust-checkpoint"))  # fmt: skip
    text = succeeds("model-info", "--model", old, "--no-memory", "--trust-checkpoint")
    assert "old.pt is a pickle" in text and "runs any code" in text
    succeeds("convert-checkpoint", old, tmp_path / "new.pt", "--trust-checkpoint")
    assert "warning" not in succeeds("model-info", "--model", tmp_path / "new.pt",
                                     "--no-memory")  # fmt: skip


# --- outputs outside --out ----------------------------------------------------------------
def test_path_traversal_slide_name(cohort: Path, checkpoint: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dots = work / "...svs"  # the slide name is '..': OUT/<name> would be OUT's parent
    shutil.copy(cohort / "slide0.svs", dots)
    before = sorted(tmp_path.rglob("*"))
    fails("predict", "-m", checkpoint, dots, "-o", work / "out", *PREDICT,
          mentions=("...svs", "'..'", "outside"))  # fmt: skip
    fails("tile", dots, "-o", work / "t.h5", *TILE, mentions=("...svs", "'..'"))
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing cleared


def test_path_traversal_csv_path(cohort: Path, tmp_path: Path) -> None:
    # A CSV may point anywhere to *read* a slide; outputs still land inside --out.
    (tmp_path / "lists").mkdir()
    table = tmp_path / "lists" / "slides.csv"
    relative = os.path.relpath(cohort / "slide0.svs", table.parent)
    table.write_text(f"path,mpp\n{relative},\n")
    succeeds("tissue", cohort / "slide0.svs", "-o", tmp_path / "masks")
    succeeds("tile", table, "-o", tmp_path / "out" / "t.h5", "--dry-run", *TILE)
    assert TileStore(tmp_path / "out" / "t.h5").slides == ["slide0"]
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"lists", "masks", "out"}


def test_path_traversal_store_slide_name(store: Path, checkpoint: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from histoduo.store import copy_store, read_index, write_index

    crafted = copy_store(store, tmp_path / "crafted.h5")
    entries, class_names = read_index(crafted)
    # As an index written for that slide name would be: the hostile name in the index and in
    # the slide file's record.
    slide0 = entries.pop("slide0")
    hostile = replace(
        slide0, name="../../escaped", record=replace(slide0.record, name="../../escaped")
    )
    with h5py.File(slide0.file, "r+") as f:
        f.attrs["name"] = "../../escaped"
    write_index(crafted, [*entries.values(), hostile], class_names)
    out = tmp_path / "a" / "b" / "out"
    fails("predict", "-m", checkpoint, "--tiles", crafted, "-o", out, *PREDICT,
          mentions=("'../../escaped'", "outside"))  # fmt: skip
    assert not (tmp_path / "a" / "escaped").exists() and not out.exists()


def test_path_traversal_import_slide_id(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "patches", ("normal", "tumour"), count=1)
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label,slide\nnormal/normal_0.jpg,normal,../../escaped\n"
                      "tumour/tumour_0.jpg,tumour,ok\n")  # fmt: skip
    fails("import", folder, "-o", tmp_path / "t.h5", "--labels", labels, "--mpp", "0.5",
          "--workers", "0", mentions=("labels.csv (line 2)", "'../../escaped'"))  # fmt: skip
    assert not (tmp_path / "t.h5").exists()


def test_path_traversal_class_name_in_outputs(cohort: Path, tmp_path: Path) -> None:
    # Class names (from GeoJSON, via the checkpoint) name heatmap files: they stay inside.
    hostile = write_checkpoint(tmp_path / "hostile.pt", ["normal", "../../../escaped"])
    out = tmp_path / "deep" / "er" / "out"
    succeeds("predict", "-m", hostile, cohort / "slide0.svs", "-o", out, "--heatmap",
             "--min-tissue", "0.05", *PREDICT)  # fmt: skip
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert outside == [hostile]
    assert any(p.name.startswith("prob_") for p in (out / "slide0").iterdir())


def test_written_geometry_within_slide_bounds(checkpoint: Path, tmp_path: Path) -> None:
    import tifffile

    # 508 x 380 px: not a multiple of the 128 px level-0 tile, and 63.5 x 47.5 pixels of the
    # 8 px tissue mask round up (512 x 384 px at the nominal scale). Tissue reaches the
    # right and bottom edges.
    rgb = np.full((380, 508, 3), (243, 241, 246), np.uint8)
    rgb[:, 150:] = (170, 90, 150)
    tifffile.imwrite(tmp_path / "odd.tiff", rgb, tile=(256, 256), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    out = tmp_path / "out"
    succeeds("predict", "-m", checkpoint, tmp_path / "odd.tiff", "-o", out, "--min-tissue",
             "0.05", *PREDICT)  # fmt: skip
    biggest = 0.0
    for name in ("tiles.geojson", "tissue.geojson"):
        features = json.loads((out / "odd" / name).read_text())["features"]
        assert features, name
        for feature in features:
            geometry = feature["geometry"]
            polygons = (
                [geometry["coordinates"]]
                if geometry["type"] == "Polygon"
                else geometry["coordinates"]
            )
            xy = np.array([p for polygon in polygons for ring in polygon for p in ring])
            assert xy.min() >= 0, name
            assert xy[:, 0].max() <= 508 and xy[:, 1].max() <= 380, name
            biggest = max(biggest, float(xy[:, 0].max()))
    assert biggest == 508  # the outline does reach the edge
