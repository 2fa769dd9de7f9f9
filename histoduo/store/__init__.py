"""The HDF5 tile store, format 2: one file per slide, and an index that users pass around.

Layout (the public interface, documented exactly in docs/tile-store.md)::

    tiles.h5                       the index: attrs format, format_version = 2, class_names;
                                   /slides/<slide> = external link to the slide file's root
    tiles.h5.d/clam/patches/<slide>.h5
                                   one slide (CLAM's layout): attrs name, complete, params, ...
        coords                     int64 (N, 2) level-0 (x, y) top-left; CLAM attrs
        tissue_fraction            float32 (N,)
        qc_pen, qc_blur, qc_fold   float32 (N,) artefact shares, qc_flags uint8 (optional)
        jpeg | imgs                one JPEG per tile (vlen uint8) | uint8 (N, H, W, 3)
        labels                     int16 (N,), -1 = unlabelled (optional)
        thumbnail, tissue_mask     overview and mask, attr downsample
    tiles.h5.d/trident/patches/<slide>_patches.h5
                                   coords only, with TRIDENT's attrs

Format 1 (one file, a group per slide) still reads; ``upgrade_store`` rewrites it.

Writers never modify a file in place: a slide file is written under a temporary name and
renamed when complete, and the index is rewritten whole and renamed. A killed run therefore
leaves every finished slide and the previous index intact, and a rerun touches only the
slides it adds plus the index.
"""

from histoduo.runtime.codec import decode_jpeg, encode_jpeg
from histoduo.store.combine import copy_store, merge_stores, upgrade_store
from histoduo.store.layout import (
    IndexEntry,
    clam_dir,
    orphan_slides,
    read_index,
    read_slide_record,
    remove_temporary,
    remove_unlisted,
    slide_file_path,
    store_folder,
    store_lock,
    trident_dir,
    trident_file_path,
    write_index,
)
from histoduo.store.read import (
    TileStore,
    complete_slides,
    is_store,
    require_pixels,
    store_class_names,
)
from histoduo.store.record import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QC_DATASETS,
    SLIDE_FILE_FORMAT,
    SLIDES_GROUP,
    UNLABELLED,
    SlideRecord,
    StoreError,
    StoreUpgradeNeeded,
    check_header,
    group_key,
    store_version,
    upgrade_hint,
    write_store_header,
)
from histoduo.store.write import (
    SlideGroupData,
    SlidePartWriter,
    assemble_store,
    convert_v1_slide,
    install_slide_file,
    write_trident_coords,
    write_trident_file,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "QC_DATASETS",
    "SLIDES_GROUP",
    "SLIDE_FILE_FORMAT",
    "UNLABELLED",
    "IndexEntry",
    "SlideGroupData",
    "SlidePartWriter",
    "SlideRecord",
    "StoreError",
    "StoreUpgradeNeeded",
    "TileStore",
    "assemble_store",
    "check_header",
    "clam_dir",
    "complete_slides",
    "convert_v1_slide",
    "copy_store",
    "decode_jpeg",
    "encode_jpeg",
    "group_key",
    "install_slide_file",
    "is_store",
    "merge_stores",
    "orphan_slides",
    "read_index",
    "read_slide_record",
    "remove_temporary",
    "remove_unlisted",
    "require_pixels",
    "slide_file_path",
    "store_class_names",
    "store_folder",
    "store_lock",
    "store_version",
    "trident_dir",
    "trident_file_path",
    "upgrade_hint",
    "upgrade_store",
    "write_index",
    "write_store_header",
    "write_trident_coords",
    "write_trident_file",
]
