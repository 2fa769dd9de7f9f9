"""One reader interface over OpenSlide, tiffslide and plain images.

Every reader returns RGB uint8 numpy arrays and takes level-0 coordinates, whatever the backend
(OpenSlide gives RGBA, tiffslide RGB). Areas outside the image read as white, like empty glass.
Resolution is resolved once, in microns per pixel, following the order of conventions.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.run.errors import HistoduoError

BACKENDS = ("auto", "openslide", "tiffslide")

# Extensions a folder scan picks up as slides.
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".bif",
    ".svslide",
    ".dcm",
    ".qptiff",
)
PLAIN_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Files whose pixel data tifffile can locate, so truncation is caught before any read.
_TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff")
SUPPORTED_FORMATS = (
    "Aperio .svs, generic tiled .tif/.tiff, Hamamatsu .ndpi/.vms/.vmu, Leica .scn, MIRAX "
    ".mrxs, Ventana .bif, Sakura .svslide, Philips TIFF, DICOM WSI .dcm (all brightfield "
    "RGB, read by OpenSlide or tiffslide) and .png/.jpg images"
)

# Above this many pixels a level is read in strips rather than whole.
_MAX_WHOLE_READ_PX = 32 * 1024 * 1024
_JPEG2000_COMPRESSIONS = {33003, 33005, 34712}


class SlideError(HistoduoError):
    """A slide cannot be used; the message names the file and says what is wrong."""


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is, as `histoduo info` shows it and stores record it."""

    path: str
    name: str
    backend: str
    vendor: str
    level0_width: int
    level0_height: int
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    mpp_source: str
    magnification: float | None
    associated_images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def slide_name(path: str | Path) -> str:
    """The slide's name: file name without its extension (and without .ome for OME-TIFF)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def unsafe_name_reason(name: str) -> str | None:
    """Why a slide name cannot key an output folder (``OUT/<name>/``), or None if it can.

    Names with '/' (image-import groups) nest inside OUT; empty, absolute, '.' or '..'
    names would write into OUT itself or outside it (and a rerun clears a slide's folder).
    """
    if not name.strip():
        return "is empty"
    if "\x00" in name:
        return "contains a NUL character"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in unified.split("/")):
        return "has an empty, '.' or '..' path part"
    return None


def mpp_from_properties(properties: Mapping[str, str]) -> tuple[float | None, str]:
    """Microns per pixel from slide properties, in the order the field trusts them.

    Returns (mpp, the property it came from); (None, "") when nothing usable is there.
    """

    def number(key: str) -> float | None:
        try:
            value = float(properties[key])
        except (KeyError, TypeError, ValueError):
            return None
        return value if math.isfinite(value) and value > 0 else None

    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP", "openslide.mirax.MPP"):
        value = number(key)
        if value is not None:
            return value, key
    # Hamamatsu and TIFF resolutions are pixels per unit length, not microns per pixel.
    value = number("hamamatsu.XResolution")
    if value is not None:
        return 1e4 / value, "hamamatsu.XResolution"
    for prefix in ("tiff", "tiffslide"):
        value = number(f"{prefix}.XResolution")
        unit = str(properties.get(f"{prefix}.ResolutionUnit", "")).lower()
        if value is not None and unit in ("centimeter", "centimetre", "cm", "3"):
            return 1e4 / value, f"{prefix}.XResolution"
        if value is not None and unit in ("inch", "2"):
            return 25400 / value, f"{prefix}.XResolution"
    return None, ""


def magnification_from_properties(properties: Mapping[str, str]) -> float | None:
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        try:
            value = float(properties[key])
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def mpp_to_magnification(mpp: float) -> float:
    """The field's shorthand: 10x ~ 1.0 um/px, 20x ~ 0.5, 40x ~ 0.25."""
    return 10.0 / mpp


def magnification_to_mpp(magnification: float) -> float:
    return 10.0 / magnification


class Slide:
    """A whole-slide image: level-0 coordinates in, RGB uint8 arrays out.

    Open with :func:`open_slide`. Use as a context manager, or call :meth:`close`.
    """

    backend: str = ""

    def __init__(self, path: Path, mpp_override: float | None = None) -> None:
        self.path = path
        self.name = slide_name(path)
        self._mpp_override = mpp_override

    # --- what each backend provides ---------------------------------------------------------
    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    @property
    def level_downsamples(self) -> list[float]:
        raise NotImplementedError

    @property
    def properties(self) -> Mapping[str, str]:
        return {}

    @property
    def associated_image_names(self) -> list[str]:
        return []

    @property
    def vendor(self) -> str:
        return str(self.properties.get("openslide.vendor", "")) or "unknown"

    def _read_raw(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB (height, width, 3) uint8 of an in-bounds area; x, y at level 0."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    # --- shared behaviour -------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        if self._mpp_override is not None:
            return self._mpp_override
        return mpp_from_properties(self.properties)[0]

    @property
    def mpp_source(self) -> str:
        if self._mpp_override is not None:
            return "override"
        return mpp_from_properties(self.properties)[1]

    @property
    def magnification(self) -> float | None:
        found = magnification_from_properties(self.properties)
        if found is not None:
            return found
        mpp = self.mpp
        return mpp_to_magnification(mpp) if mpp else None

    def require_mpp(self) -> float:
        """The slide's mpp, or a SlideError that says how to supply it."""
        mpp = self.mpp
        if mpp is None:
            raise SlideError(
                self.path,
                "no resolution (microns per pixel) in the slide's metadata; pass --slide-mpp "
                "or give an 'mpp' column in a slide CSV",
            )
        return mpp

    def info(self) -> SlideInfo:
        width, height = self.dimensions
        return SlideInfo(
            path=str(self.path),
            name=self.name,
            backend=self.backend,
            vendor=self.vendor,
            level0_width=width,
            level0_height=height,
            level_dimensions=[tuple(d) for d in self.level_dimensions],
            level_downsamples=[float(d) for d in self.level_downsamples],
            mpp=self.mpp,
            mpp_source=self.mpp_source,
            magnification=self.magnification,
            associated_images=list(self.associated_image_names),
        )

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample``."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB (h, w, 3) uint8 at ``level``, top-left ``location`` in level-0 pixels.

        Parts outside the image are white, so edge tiles look like glass, not black.
        """
        x0, y0 = int(location[0]), int(location[1])
        width, height = int(size[0]), int(size[1])
        level_w, level_h = self.level_dimensions[level]
        level_ds = self.level_downsamples[level]
        # Work in level pixels to clip, then convert the clipped origin back to level 0.
        lx0, ly0 = math.floor(x0 / level_ds), math.floor(y0 / level_ds)
        cx0, cy0 = max(lx0, 0), max(ly0, 0)
        cx1, cy1 = min(lx0 + width, level_w), min(ly0 + height, level_h)
        if cx0 == lx0 and cy0 == ly0 and cx1 - cx0 == width and cy1 - cy0 == height:
            return self._read_raw(x0, y0, level, width, height)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            # Shift by whole level pixels so the read stays on the same level-pixel grid.
            rx = x0 + round((cx0 - lx0) * level_ds)
            ry = y0 + round((cy0 - ly0) * level_ds)
            patch = self._read_raw(rx, ry, level, cx1 - cx0, cy1 - cy0)
            out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = patch
        return out

    def read_resized(
        self,
        location: tuple[int, int],
        size_level0: tuple[int, int],
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """The level-0 area ``size_level0`` at ``location``, resampled to ``out_size`` (w, h).

        Reads the level just finer than the needed downsample, then resizes, so the result
        never depends on non-integer level downsamples being rounded.
        """
        downsample = min(size_level0[0] / out_size[0], size_level0[1] / out_size[1])
        level = self.best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        read_w = max(1, round(size_level0[0] / level_ds))
        read_h = max(1, round(size_level0[1] / level_ds))
        region = self.read_region(location, level, (read_w, read_h))
        return resize_rgb(region, out_size)

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` x level 0, never loading a large level whole."""
        width0, height0 = self.dimensions
        out_w = max(1, round(width0 / downsample))
        out_h = max(1, round(height0 / downsample))
        level = self.best_level_for_downsample(downsample)
        level_w, level_h = self.level_dimensions[level]
        level_ds = self.level_downsamples[level]
        if level_w * level_h <= _MAX_WHOLE_READ_PX:
            return resize_rgb(self.read_region((0, 0), level, (level_w, level_h)), (out_w, out_h))
        # Strips of whole output rows, each read at the level and shrunk on its own.
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        rows_per_strip = max(1, _MAX_WHOLE_READ_PX // 4 // max(level_w, 1))
        out_rows = max(1, int(rows_per_strip * level_ds / downsample))
        for oy in range(0, out_h, out_rows):
            oh = min(out_rows, out_h - oy)
            y0 = round(oy * downsample)
            y1 = min(height0, round((oy + oh) * downsample))
            strip_h = max(1, round((y1 - y0) / level_ds))
            strip = self.read_region((0, y0), level, (level_w, strip_h))
            out[oy : oy + oh] = resize_rgb(strip, (out_w, oh))
        return out

    def thumbnail(self, max_size_px: int = 1024) -> tuple[np.ndarray, float]:
        """(RGB thumbnail whose long side is at most ``max_size_px``, its downsample)."""
        width0, height0 = self.dimensions
        downsample = max(width0, height0) / max_size_px
        downsample = max(downsample, 1.0)
        return self.read_downsampled(downsample), downsample


def resize_rgb(image: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB array to (width, height) with area-averaging when shrinking."""
    from PIL import Image

    out_w, out_h = int(out_size[0]), int(out_size[1])
    if image.shape[1] == out_w and image.shape[0] == out_h:
        return image
    pil = Image.fromarray(image)
    factor_x, factor_y = image.shape[1] / out_w, image.shape[0] / out_h
    if factor_x == factor_y and factor_x == int(factor_x) and factor_x > 1:
        # Integer shrink: an exact box filter, several times faster than a generic resize.
        return np.asarray(pil.reduce(int(factor_x)))
    resample = Image.Resampling.BOX if min(factor_x, factor_y) >= 1 else Image.Resampling.BILINEAR
    return np.asarray(pil.resize((out_w, out_h), resample=resample))


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA to RGB over white (transparent = outside the scanned area)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


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

    @property
    def properties(self) -> Mapping[str, str]:
        return {k: str(v) for k, v in self._slide.properties.items() if v is not None}

    @property
    def vendor(self) -> str:
        return str(self._slide.properties.get("tiffslide.vendor") or "unknown")

    @property
    def associated_image_names(self) -> list[str]:
        return sorted(self._slide.associated_images.keys())

    def _read_raw(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
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


def _prefers_tiffslide(path: Path) -> bool:
    """tiffslide decodes JPEG SVS 2-3x faster than OpenSlide; OpenSlide wins elsewhere."""
    if path.suffix.lower() != ".svs":
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return int(tif.pages[0].compression) not in _JPEG2000_COMPRESSIONS
    except Exception:  # noqa: BLE001 - let the chosen backend report the real problem
        return False


def open_slide(path: str | Path, backend: str = "auto", mpp_override: float | None = None) -> Slide:
    """Open a slide with the requested backend; ``auto`` picks the best one for the file.

    Raises SlideError (naming the file) for missing, unsupported, corrupt or non-RGB files.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir() and path.suffix.lower() not in (".mrxs",):
        raise SlideError(path, "is a folder, not a slide file")
    if os.path.getsize(path) == 0:
        raise SlideError(path, "empty file")
    if mpp_override is not None and not (mpp_override > 0):
        raise SlideError(path, f"slide mpp override must be positive, got {mpp_override}")
    suffix = path.suffix.lower()
    if suffix in PLAIN_IMAGE_EXTENSIONS:
        return PlainImageSlide(path, mpp_override)
    if suffix in _TIFF_SUFFIXES:
        check_tiff_file(path)
    if backend == "tiffslide" or (backend == "auto" and _prefers_tiffslide(path)):
        return TiffSlideSlide(path, mpp_override)
    try:
        slide: Slide = OpenSlideSlide(path, mpp_override)
    except SlideError:
        if backend == "openslide" or suffix not in (".tif", ".tiff"):
            raise
        # A TIFF OpenSlide does not take (stripped, non-pyramidal) may still be a plain image.
        return PlainImageSlide(path, mpp_override)
    return slide


def check_tiff_file(path: Path) -> None:
    """Reject TIFF-based slides that are cut short or are not brightfield RGB, before a read.

    Readers report neither well: a truncated file opens and reads missing tiles as blank
    glass, and a fluorescence QPTIFF opens as its first grey channel.
    """
    import tifffile

    size = os.path.getsize(path)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            first = pages[0]
            samples = int(first.samplesperpixel)
            description = str(getattr(first, "description", "") or "")
            ends = [
                max((int(o) + int(c) for o, c in zip(p.dataoffsets, p.databytecounts)), default=0)
                for p in pages
            ]
            channels = sum(
                1 for p in pages if p.shape == first.shape and int(p.samplesperpixel) == samples
            )
    except Exception:  # noqa: BLE001 - not parseable as TIFF: the slide reader says why
        return
    end = max(ends, default=0)
    if end > size:
        raise SlideError(
            path,
            f"truncated: its image data runs to byte {end} but the file has only {size} "
            "bytes (an incomplete copy or download?)",
        )
    if samples in (3, 4):
        return
    if "PerkinElmer-QPI" in description or path.suffix.lower() == ".qptiff":
        raise SlideError(
            path,
            f"a multichannel fluorescence QPTIFF ({channels} channels of {samples} sample); "
            f"histoduo needs brightfield RGB (H&E) slides: {SUPPORTED_FORMATS}",
        )
    raise SlideError(
        path,
        f"not a brightfield RGB slide ({samples} samples per pixel); histoduo needs RGB",
    )


def find_slides(inputs: list[str | Path]) -> list[Path]:
    """Slide files from files, folders (searched recursively) and glob patterns, sorted."""
    import glob

    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            found.extend(p for p in matches if p.is_file())
        elif path.is_dir() and path.suffix.lower() != ".mrxs":
            extensions = SLIDE_EXTENSIONS + PLAIN_IMAGE_EXTENSIONS
            found.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            )
        else:
            found.append(path)
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)
    return list(unique.values())
