"""One reader interface over OpenSlide, tiffslide and plain images.

Every reader returns RGB uint8 numpy arrays and takes level-0 coordinates, whatever the backend
(OpenSlide gives RGBA, tiffslide RGB). Areas outside the image read as white, like empty glass.
Resolution is resolved once, in microns per pixel, in the order the field uses
(``openslide.mpp-x``, ``aperio.MPP``, ..., TIFF resolution tags; the README lists it).

Modules: ``info`` (names, formats, mpp from metadata), ``base`` (the :class:`Slide` interface),
``readers`` (OpenSlide, tiffslide, plain images), ``open`` (choosing a backend, finding slides).
"""

from histoduo.slide.base import Slide, resize_rgb
from histoduo.slide.info import (
    BACKENDS,
    PLAIN_IMAGE_EXTENSIONS,
    SLIDE_EXTENSIONS,
    SUPPORTED_FORMATS,
    SlideError,
    SlideInfo,
    magnification_from_properties,
    magnification_to_mpp,
    mpp_from_properties,
    mpp_to_magnification,
    slide_name,
    unsafe_name_reason,
)
from histoduo.slide.open import check_tiff_file, find_slides, open_slide
from histoduo.slide.readers import OpenSlideSlide, PlainImageSlide, TiffSlideSlide

__all__ = [
    "BACKENDS",
    "PLAIN_IMAGE_EXTENSIONS",
    "SLIDE_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "OpenSlideSlide",
    "PlainImageSlide",
    "Slide",
    "SlideError",
    "SlideInfo",
    "TiffSlideSlide",
    "check_tiff_file",
    "find_slides",
    "magnification_from_properties",
    "magnification_to_mpp",
    "mpp_from_properties",
    "mpp_to_magnification",
    "open_slide",
    "resize_rgb",
    "slide_name",
    "unsafe_name_reason",
]
