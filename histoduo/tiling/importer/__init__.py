"""Existing patch datasets (folders of labelled images) -> a tile store.

Public patch datasets come as class-per-subfolder image folders, ``FOLDER/<class>/*.png``
(``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``), sometimes with a CSV that names each image's class,
slide or patient, and resolution. ``import_images`` writes them in the tile-store layout of
docs/tile-store.md, so ``train``, ``evaluate`` and ``predict`` treat them like tiled slides.

Choices, and why:

- **Groups.** One slide group per slide id (or patient id, when the CSV has only that): splits
  are made over groups, so images of one slide never straddle train and validation. Without
  ids every image is its own group and splits are per image (tile-level in effect) - fine for
  datasets that were split that way, optimistic otherwise; a warning says so.
- **Tile size.** Each image is centre-cropped to a square (its shorter side) and resized to
  ``tile_size_px``: cropping keeps the pixels isotropic, which matters more for histology
  than the lost border. The default keeps the images' own size when they are all square and
  the same size; otherwise ``tile_size_px`` must be given.
- **Resolution.** ``target_mpp`` is the resolution of the stored tiles: the images' own mpp
  (``--mpp`` or a CSV ``mpp`` column) scaled by source side / tile size, so it stays true when
  images are resized. Images of different sizes cannot all land on one resolution; the store
  then records the median and the run warns with the spread. Prediction needs ``target_mpp``
  to tile slides at the training resolution, so an unknown mpp is an error.
- **Coordinates.** Images have no position on a slide, so each group is laid out as a
  synthetic mosaic: image ``i`` of a group sits at grid cell ``(i % cols, i // cols)`` with
  ``cols = ceil(sqrt(n))``, i.e. ``x = (i % cols) * tile_size_px``; level 0 is the tile grid
  (``slide_mpp`` = ``target_mpp``). The group's thumbnail is that mosaic, shrunk, and its
  tissue mask is 1 wherever an image sits, so prediction heatmaps draw over the mosaic.
  ``tissue_fraction`` is 1.0 for every image.
- **Encoding.** JPEG (quality 90) by default; JPEG inputs that need no resize are stored
  byte for byte (no second lossy pass). ``raw`` stores exact pixels.

Bad inputs fail with the file named: unknown class names (a CSV label that is not a class
folder or in ``class_names``), images that do not decode, an empty folder. With
``skip_errors`` unreadable images are left out and listed in ``<out>.report.json``.
The store is written atomically (part files, then ``assemble_store``).
"""

from histoduo.tiling.importer.load import square_tile
from histoduo.tiling.importer.mosaic import choose_tile_size, grid_columns, mosaic_coords, tile_mpp
from histoduo.tiling.importer.run import ImportReport, import_images
from histoduo.tiling.importer.scan import (
    ENCODINGS,
    IMAGE_SUFFIXES,
    ImageEntry,
    ImageImportError,
    ImportParams,
    read_labels_csv,
    scan_folder,
)

__all__ = [
    "ENCODINGS",
    "IMAGE_SUFFIXES",
    "ImageEntry",
    "ImageImportError",
    "ImportParams",
    "ImportReport",
    "choose_tile_size",
    "grid_columns",
    "import_images",
    "mosaic_coords",
    "read_labels_csv",
    "scan_folder",
    "square_tile",
    "tile_mpp",
]
