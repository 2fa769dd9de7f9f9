"""The backends: OpenSlide, tiffslide and plain images behind :class:`Slide`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.slide.base import Slide, _rgba_to_rgb
from histoduo.slide.info import SUPPORTED_FORMATS, SlideError
from histoduo.slide.tiled import TiledLevel


class _LibrarySlide(Slide):
    """A slide held by a reader library object (``self._slide``) with OpenSlide's API."""

    _slide: Any

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._slide.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._slide.level_downsamples]


class OpenSlideSlide(_LibrarySlide):
    backend = "openslide"

    def __init__(self, path: Path, mpp_override: float | None = None) -> None:
        super().__init__(path, mpp_override)
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(
                path,
                f"unsupported or unrecognised slide format; histoduo reads {SUPPORTED_FORMATS}",
            ) from exc
        except openslide.OpenSlideError as exc:
            dicom = dicom_problem(path) if path.suffix.lower() == ".dcm" else None
            if dicom is not None:
                raise SlideError(path, dicom) from exc
            raise SlideError(path, f"corrupt or unreadable slide ({exc})") from exc

    @property
    def properties(self) -> Mapping[str, str]:
        return self._slide.properties

    @property
    def associated_image_names(self) -> list[str]:
        return sorted(self._slide.associated_images.keys())

    def _read_raw(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            image = self._slide.read_region((x, y), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"corrupt or truncated slide data ({exc})") from exc
        return _rgba_to_rgb(np.asarray(image))

    def close(self) -> None:
        self._slide.close()


class TiffSlideSlide(_LibrarySlide):
    backend = "tiffslide"

    def __init__(self, path: Path, mpp_override: float | None = None) -> None:
        super().__init__(path, mpp_override)
        import tiffslide

        try:
            self._slide = tiffslide.TiffSlide(str(path))
        except Exception as exc:  # tifffile raises many types for bad files
            raise SlideError(path, f"cannot open with tiffslide ({exc})") from exc
        _check_rgb_pages(path, self._slide)
        self._tiled: dict[int, TiledLevel | None] = {}

    @property
    def properties(self) -> Mapping[str, str]:
        return {k: str(v) for k, v in self._slide.properties.items() if v is not None}

    @property
    def vendor(self) -> str:
        return str(self._slide.properties.get("tiffslide.vendor") or "unknown")

    @property
    def associated_image_names(self) -> list[str]:
        return sorted(self._slide.associated_images.keys())

    def _tiled_level(self, level: int) -> TiledLevel | None:
        """The direct reader of ``level`` where the file allows it (slide/tiled.py)."""
        if level not in self._tiled:
            props = self._slide.properties
            plain = props.get("tiffslide.series-axes") == "YXS" and not props.get(
                "tiffslide.series-composition"
            )
            series = int(props.get("tiffslide.series-index") or 0)
            self._tiled[level] = (
                TiledLevel.for_level(self._slide.ts_tifffile, series, level) if plain else None
            )
        return self._tiled[level]

    def _read_raw(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            tiled = self._tiled_level(level)
            if tiled is not None:
                # tiffslide's own level-0 -> level mapping, so both paths read the same pixels
                downsample = self._slide.level_downsamples[level]
                return tiled.read(int(x / downsample), int(y / downsample), width, height)
            array = self._slide.read_region((x, y), level, (width, height), as_array=True)
        except Exception as exc:
            raise SlideError(self.path, f"corrupt or truncated slide data ({exc})") from exc
        if array.ndim == 3 and array.shape[2] == 4:
            return _rgba_to_rgb(array)
        return np.ascontiguousarray(array[..., :3])

    def close(self) -> None:
        self._slide.close()


def _check_rgb_pages(path: Path, slide: Any) -> None:
    """Reject multichannel (fluorescence) images: histoduo works on brightfield RGB."""
    try:
        page = slide.ts_tifffile.series[0].levels[0].keyframe
    except Exception:  # noqa: BLE001 - best effort only; reading will fail later if broken
        return
    samples = int(getattr(page, "samplesperpixel", 3))
    shape = tuple(slide.ts_tifffile.series[0].levels[0].shape)
    if samples not in (3, 4) or (
        len(shape) == 3 and shape[0] not in (3, 4) and shape[-1] not in (3, 4)
    ):
        raise SlideError(
            path,
            f"not a brightfield RGB slide (image shape {shape}, {samples} samples per pixel); "
            "multichannel fluorescence is not supported",
        )


class PlainImageSlide(Slide):
    """A PNG, JPEG or non-pyramidal TIFF held in memory as one level."""

    backend = "image"

    def __init__(self, path: Path, mpp_override: float | None = None) -> None:
        super().__init__(path, mpp_override)
        self._properties: dict[str, str] = {}
        self._image = self._load(path)

    def _load(self, path: Path) -> np.ndarray:
        suffix = path.suffix.lower()
        try:
            if suffix in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    array = page.asarray()
                    tags = page.tags
                    if "XResolution" in tags and "ResolutionUnit" in tags:
                        x_res = tags["XResolution"].value
                        self._properties["tiff.XResolution"] = str(x_res[0] / x_res[1])
                        unit = tags["ResolutionUnit"].value
                        self._properties["tiff.ResolutionUnit"] = str(int(unit))
            else:
                from PIL import Image

                with Image.open(path) as pil:
                    pil.load()
                    if pil.mode not in ("RGB", "RGBA"):
                        raise SlideError(
                            path, f"not an RGB image (mode {pil.mode}); histoduo needs RGB"
                        )
                    array = np.asarray(pil.convert("RGB"))
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(path, f"cannot read image ({exc})") from exc
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise SlideError(
                path,
                f"not an RGB image (shape {tuple(array.shape)}); multichannel or grayscale "
                "images are not supported",
            )
        if array.dtype != np.uint8:
            raise SlideError(path, f"not an 8-bit image (dtype {array.dtype})")
        return np.ascontiguousarray(array[..., :3])

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(self._image.shape[1], self._image.shape[0])]

    @property
    def level_downsamples(self) -> list[float]:
        return [1.0]

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties

    @property
    def vendor(self) -> str:
        return "image"

    def _read_raw(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return self._image[y : y + height, x : x + width]


# Attributes a DICOM VL Whole Slide Microscopy image needs for a reader to place its frames;
# OpenSlide and wsidicom both use ImageType to tell a pyramid level from a label or overview.
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_WSI_REQUIRED = (
    "ImageType",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "Rows",
    "Columns",
    "NumberOfFrames",
)


def dicom_problem(path: Path) -> str | None:
    """What a DICOM file lacks to be read as a whole-slide image, in words; None when
    nothing is visibly missing (or pydicom, an optional package, is not installed)."""
    try:
        import pydicom
    except ImportError:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad files
        return f"not a readable DICOM file ({str(exc)[:120]})"
    sop = str(getattr(ds, "SOPClassUID", ""))
    if sop and sop != _WSI_SOP_CLASS:
        return (
            f"a DICOM file of SOP class {sop}, not a VL Whole Slide Microscopy image "
            f"({_WSI_SOP_CLASS}); histoduo reads whole-slide DICOM only"
        )
    missing = [name for name in _WSI_REQUIRED if name not in ds]
    if not missing:
        return None
    return (
        f"a DICOM whole-slide image without the required attribute(s) {', '.join(missing)}: "
        "readers (OpenSlide, wsidicom) need ImageType (e.g. ORIGINAL\\PRIMARY\\VOLUME\\NONE) "
        "to tell a pyramid level from a label or overview; have the exporting software write "
        "it, or add it with a DICOM tool (e.g. pydicom)"
    )
