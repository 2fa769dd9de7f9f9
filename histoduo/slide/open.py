"""Opening a slide with the right backend, checking its file first, and finding slides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from histoduo.slide.base import Slide
from histoduo.slide.info import (
    _JPEG2000_COMPRESSIONS,
    _TIFF_SUFFIXES,
    BACKENDS,
    PLAIN_IMAGE_EXTENSIONS,
    SLIDE_EXTENSIONS,
    SUPPORTED_FORMATS,
    SlideError,
)
from histoduo.slide.readers import OpenSlideSlide, PlainImageSlide, TiffSlideSlide


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


_TIFF_MAGIC = {b"II*\x00": ("<", False), b"MM\x00*": (">", False),
               b"II+\x00": ("<", True), b"MM\x00+": (">", True)}  # fmt: skip


def _tiff_header_problem(path: Path, size: int) -> str | None:
    """Why a file that starts like a TIFF cannot be one (cut short before its first image
    directory, as an interrupted copy of an Aperio file is: Aperio writes that directory at
    the end); None when the header is sound or the file is no TIFF (the reader then says)."""
    import struct

    with open(path, "rb") as handle:
        head = handle.read(16)
    kind = _TIFF_MAGIC.get(head[:4])
    if kind is None:
        return None
    order, big = kind
    if big:
        if len(head) < 16:
            return f"truncated: only {size} bytes, less than a BigTIFF header"
        (first_ifd,) = struct.unpack(order + "Q", head[8:16])
    else:
        if len(head) < 8:
            return f"truncated: only {size} bytes, less than a TIFF header"
        (first_ifd,) = struct.unpack(order + "I", head[4:8])
    if first_ifd >= size:
        return (
            f"truncated: its first image directory is at byte {first_ifd:,} but the file has "
            f"only {size:,} bytes (an incomplete copy or download?)"
        )
    return None


def _missing_chunks(page: Any) -> str | None:
    """Why a TIFF page's header cannot be true: it claims more pixels than it has tiles or
    strips for (a file that says 200,000 x 200,000 px and holds one tile would otherwise be
    read as hours of blank glass); None when the counts agree."""
    tags = getattr(page, "tags", None)
    if tags is None:
        return None
    width, height = int(page.imagewidth), int(page.imagelength)
    separate = int(getattr(page, "planarconfig", 1)) == 2
    planes = int(page.samplesperpixel) if separate else 1
    if page.is_tiled:
        tag = tags.get(324)  # TileOffsets
        tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
        expected = -(-width // tile_w) * -(-height // tile_h) * planes * int(page.imagedepth or 1)
    else:
        tag = tags.get(273)  # StripOffsets
        rows = min(int(page.rowsperstrip or height), height) or 1
        expected = -(-height // rows) * planes
    if tag is None or tag.count >= expected:
        return None
    return (
        f"corrupt: its header claims {width:,} x {height:,} px, which needs {expected:,} "
        f"{'tiles' if page.is_tiled else 'strips'}, but it holds only {tag.count:,}"
    )


def check_tiff_file(path: Path) -> None:
    """Reject TIFF-based slides that are cut short or are not brightfield RGB, before a read.

    Readers report neither well: a truncated file opens and reads missing tiles as blank
    glass, and a fluorescence QPTIFF opens as its first grey channel.
    """
    import logging

    import tifffile

    size = os.path.getsize(path)
    reason = _tiff_header_problem(path, size)
    if reason is not None:
        raise SlideError(path, reason)
    # tifffile logs every bad offset it meets; the SlideError below says it once.
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.ERROR + 1)
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
            short = next(filter(None, (_missing_chunks(p) for p in pages)), None)
    except Exception:  # noqa: BLE001 - not parseable by tifffile: the slide reader says why
        return
    finally:
        tiff_log.setLevel(level)
    if short is not None:
        raise SlideError(path, short)
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
        try:
            key = p.resolve(strict=False)
        except (OSError, RuntimeError):  # RuntimeError: Python < 3.13's symlink loop
            raise ValueError(
                f"{p}: symlink loop (the link points, through other links, back to itself); "
                "fix or remove the link"
            ) from None
        unique.setdefault(str(key), p)
    return list(unique.values())
