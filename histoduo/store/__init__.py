"""The HDF5 tile store: many slides in one file, one group per slide.

Layout (the public interface, documented exactly in docs/tile-store.md)::

    /                      attrs: format, format_version, histoduo_version, class_names
    /slides/<slide>/       attrs: name, source_path, complete (written last), params, ...
        coords             int64 (N, 2) level-0 (x, y) top-left; CLAM + TRIDENT attrs
        tissue_fraction    float32 (N,)
        jpeg               vlen uint8 (N,): one JPEG per tile      (tile_encoding = "jpeg")
        imgs               uint8 (N, H, W, 3), one tile per chunk   (tile_encoding = "raw")
        labels             int16 (N,), -1 = unlabelled              (optional)
        thumbnail          uint8 (h, w, 3) with attr downsample
        tissue_mask        uint8 (h, w) with attr downsample

Writers never modify a store in place: each slide is written to its own part file which is
renamed into place when complete, and stores are assembled into a temporary file that replaces
the old one atomically. A killed run therefore leaves the previous store intact.
"""

from histoduo.store.read import TileStore, complete_slides, is_store, store_class_names
from histoduo.store.record import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SLIDES_GROUP,
    UNLABELLED,
    SlideRecord,
    StoreError,
    group_key,
)
from histoduo.store.write import SlideGroupData, SlidePartWriter, assemble_store, merge_stores
from histoduo.tileio import decode_jpeg, encode_jpeg

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SLIDES_GROUP",
    "UNLABELLED",
    "SlideGroupData",
    "SlidePartWriter",
    "SlideRecord",
    "StoreError",
    "TileStore",
    "assemble_store",
    "complete_slides",
    "decode_jpeg",
    "encode_jpeg",
    "group_key",
    "is_store",
    "merge_stores",
    "store_class_names",
]
