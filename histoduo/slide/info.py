"""What a slide is before any pixel: names, formats, mpp and magnification from metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histoduo.runtime.errors import HistoduoError

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
