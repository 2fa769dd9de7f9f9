"""QuPath-style GeoJSON: read annotations, write feature collections, rasterise, vectorise.

Coordinates are always level-0 pixels, origin at the top-left of the full-resolution image,
x first (the QuPath and CLAM/TRIDENT convention). A polygon is
``(exterior (K, 2) float, [hole (K, 2) float, ...])``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoduo.runtime.files import atomic_write_text  # noqa: F401 - re-exported

Polygon = tuple[np.ndarray, list[np.ndarray]]

# Default class colours (RGB), QuPath-like: tissue green, grades from cool to hot.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Tissue": (0, 160, 0),
    "normal": (60, 160, 220),
    "low_grade": (250, 200, 40),
    "high_grade": (220, 40, 40),
    "necrosis": (120, 60, 160),
}


def class_color(name: str) -> tuple[int, int, int]:
    """A class's colour: the default one, else a stable colour derived from the name."""
    if name in CLASS_COLORS:
        return CLASS_COLORS[name]
    # A hash (not Python's salted hash()) so the colour is the same in every run.
    digest = hashlib.md5(name.encode("utf-8")).digest()
    # Keep channels in 40-219 so the colour is visible on both white and dark backgrounds.
    return (40 + digest[0] % 180, 40 + digest[1] % 180, 40 + digest[2] % 180)


@dataclass
class Annotation:
    """One GeoJSON feature as histoduo uses it."""

    geometry: list[Polygon]
    class_name: str | None = None
    color: tuple[int, int, int] | None = None
    object_type: str = "annotation"
    properties: dict[str, Any] = field(default_factory=dict)


# --- reading --------------------------------------------------------------------------------
# Level-0 coordinates beyond this are no slide's (the largest are ~2 x 10^5 px): a unit error.
MAX_COORDINATE_PX = 1e8
# Nesting of GeometryCollections and of JSON itself; QuPath writes 2-4 levels.
_MAX_GEOMETRY_DEPTH = 32
_AREALESS = ("Point", "MultiPoint", "LineString", "MultiLineString")


def _ring(coords: Any, path: Path) -> np.ndarray:
    """One linear ring as a (K, 2) float array; the closing duplicate point is dropped."""
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid polygon coordinates ({exc})") from exc
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3:
        raise ValueError(f"{path}: a polygon ring needs at least 3 (x, y) points")
    ring = ring[:, :2]
    if not np.all(np.isfinite(ring)):
        raise ValueError(f"{path}: polygon coordinates must be finite numbers")
    if np.abs(ring).max() > MAX_COORDINATE_PX:
        raise ValueError(
            f"{path}: polygon coordinates up to {np.abs(ring).max():.3g} are no level-0 pixel "
            f"positions (slides are at most ~10^6 px across; the limit is "
            f"{MAX_COORDINATE_PX:.0e}); were they written in another unit?"
        )
    if len(ring) > 3 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


def _polygons_from_geometry(geometry: Any, path: Path, depth: int = 0) -> list[Polygon]:
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise ValueError(f"{path}: feature without a valid 'geometry' object")
    if depth > _MAX_GEOMETRY_DEPTH:
        raise ValueError(
            f"{path}: geometry collections nested more than {_MAX_GEOMETRY_DEPTH} deep"
        )
    kind = geometry["type"]
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        rings_list = [coords]
    elif kind == "MultiPolygon":
        rings_list = coords
    elif kind == "GeometryCollection":
        out: list[Polygon] = []
        subs = geometry.get("geometries", [])
        if not isinstance(subs, list):
            raise ValueError(f"{path}: GeometryCollection without a 'geometries' list")
        for sub in subs:
            out.extend(_polygons_from_geometry(sub, path, depth + 1))
        return out
    elif kind in _AREALESS:
        return []  # QuPath points/lines carry no area; counted and warned about by the reader
    else:
        raise ValueError(f"{path}: unsupported geometry type {kind!r}")
    if not isinstance(rings_list, list):
        raise ValueError(f"{path}: {kind} geometry without a coordinates list")
    polygons: list[Polygon] = []
    for rings in rings_list:
        if not isinstance(rings, list) or not rings:
            raise ValueError(f"{path}: empty or malformed {kind} coordinates")
        polygons.append((_ring(rings[0], path), [_ring(r, path) for r in rings[1:]]))
    return polygons


def _parse_color(value: Any) -> tuple[int, int, int] | None:
    """QuPath writes [r, g, b]; older exports use a packed signed int (ARGB)."""
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        return (int(value[0]), int(value[1]), int(value[2]))
    if isinstance(value, int):
        packed = value & 0xFFFFFF
        return ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return None


def _annotation_from_feature(feature: Any, path: Path) -> Annotation:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise ValueError(f"{path}: expected a GeoJSON Feature, got {type(feature).__name__}")
    properties = feature.get("properties") or {}
    if not isinstance(properties, dict):
        raise ValueError(f"{path}: feature 'properties' must be an object")
    classification = properties.get("classification") or {}
    class_name: str | None = None
    color: tuple[int, int, int] | None = None
    if isinstance(classification, dict):
        class_name = classification.get("name")
        try:
            color = _parse_color(classification.get("color", classification.get("colorRGB")))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{path}: a classification colour is not [r, g, b]") from None
    elif isinstance(classification, str):
        class_name = classification
    else:
        class_name = classification  # checked below
    if isinstance(class_name, int) and not isinstance(class_name, bool):
        class_name = str(class_name)  # a grade written as a number: the class "3"
    if class_name is not None and not isinstance(class_name, str):
        raise ValueError(
            f'{path}: a classification name must be a string (e.g. "tumour"), got '
            f"{json.dumps(class_name)[:60]}"
        )
    return Annotation(
        geometry=_polygons_from_geometry(feature.get("geometry"), path),
        class_name=class_name,
        color=color,
        object_type=str(properties.get("objectType", "annotation")),
        properties=properties,
    )


def read_annotations(
    path: str | Path, *, warn: bool | Callable[[str], None] = True
) -> list[Annotation]:
    """Annotations from a GeoJSON file (QuPath export or any FeatureCollection).

    Accepts a FeatureCollection, a single Feature, a bare list of features (QuPath exports
    both), or a bare Polygon/MultiPolygon geometry. Raises ValueError naming the file.
    Points and lines carry no area and are left out, with a warning: on stderr (``warn``
    True), to a callable, or none (False: a caller that read the file before and warned).
    """
    path = Path(path)
    try:
        # utf-8-sig: some Windows tools start their exports with a byte-order mark.
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: file not found") from exc
    except IsADirectoryError as exc:
        raise ValueError(f"{path}: is a folder, not a GeoJSON file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to be GeoJSON") from None
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise ValueError(f"{path}: FeatureCollection without a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in (
        "Polygon",
        "MultiPolygon",
        "GeometryCollection",
    ):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise ValueError(f"{path}: not a GeoJSON Feature, FeatureCollection or feature list")
    annotations = [_annotation_from_feature(f, path) for f in features]
    arealess = sum(
        isinstance(f, dict)
        and isinstance(f.get("geometry"), dict)
        and f["geometry"].get("type") in _AREALESS
        for f in features
    )
    if arealess and warn:
        # Straight to stderr by default: a label silently missing is what this prevents.
        message = (
            f"warning: {path}: ignored {arealess} point/line annotation(s); only polygons "
            "carry labels and regions"
        )
        if callable(warn):
            warn(message)
        else:
            print(message, file=sys.stderr)
    return annotations


# --- checking annotations against a slide ----------------------------------------------------
# Rings with more vertices than this are not searched for self-crossings (O(n^2) pairs).
_MAX_CHECKED_RING_POINTS = 20_000


def _self_crossing(ring: np.ndarray) -> tuple[float, float] | None:
    """A point where two non-adjacent edges of ``ring`` properly cross, or None."""
    n = len(ring)
    if n < 4 or n > _MAX_CHECKED_RING_POINTS:
        return None
    a, b = ring, np.roll(ring, -1, axis=0)

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (
            r[..., 0] - p[..., 0]
        )

    for start in range(0, n, 512):
        p, q = a[start : start + 512, None], b[start : start + 512, None]
        # Strict signs: edges that only touch or share an end point (neighbours) pass.
        cross = (orient(p, q, a[None]) * orient(p, q, b[None]) < 0) & (
            orient(a[None], b[None], p) * orient(a[None], b[None], q) < 0
        )
        hits = np.argwhere(cross)
        if len(hits):
            i, j = int(hits[0][0]) + start, int(hits[0][1])
            d1, d2 = orient(a[j], b[j], a[i]), orient(a[j], b[j], b[i])
            x, y = a[i] + (b[i] - a[i]) * (d1 / (d1 - d2))
            return float(x), float(y)
    return None


def check_annotations(
    annotations: list[Annotation], path: str | Path, level0_size: tuple[int, int]
) -> None:
    """ValueError naming ``path`` for annotations no label or region can be taken from: a
    self-crossing polygon (which side is inside is undefined) or a feature lying wholly
    outside the slide's level-0 bounds (coordinates in another unit, or another slide's)."""
    width0, height0 = level0_size
    for number, annotation in enumerate(annotations, start=1):
        what = f"feature {number}" + (
            f" ({annotation.class_name!r})" if annotation.class_name else ""
        )
        points = [ring for ext, holes in annotation.geometry for ring in [ext, *holes]]
        for ring in points:
            crossing = _self_crossing(ring)
            if crossing is not None:
                raise ValueError(
                    f"{path}: {what} is a self-intersecting polygon (its edges cross near "
                    f"x={crossing[0]:.0f}, y={crossing[1]:.0f}); redraw or repair it"
                )
        if points:
            xy = np.concatenate(points)
            lo, hi = xy.min(axis=0), xy.max(axis=0)
            if hi[0] <= 0 or hi[1] <= 0 or lo[0] >= width0 or lo[1] >= height0:
                raise ValueError(
                    f"{path}: {what} lies entirely outside the slide (x {lo[0]:.0f}-{hi[0]:.0f}, "
                    f"y {lo[1]:.0f}-{hi[1]:.0f}; the slide is {width0} x {height0} level-0 px); "
                    "coordinates must be level-0 pixels of this slide"
                )


# --- writing --------------------------------------------------------------------------------
def _closed_ring(ring: np.ndarray) -> list[list[float]]:
    """GeoJSON rings repeat their first point at the end."""
    points = [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(ring)[:, :2]]
    if points and points[0] != points[-1]:
        points.append(list(points[0]))
    return points


def polygon_feature(
    polygons: list[Polygon],
    class_name: str | None = None,
    color: tuple[int, int, int] | None = None,
    object_type: str = "annotation",
    measurements: dict[str, float] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """A QuPath-style Feature: Polygon for one polygon, MultiPolygon for several."""
    rings = [[_closed_ring(ext)] + [_closed_ring(h) for h in holes] for ext, holes in polygons]
    if len(rings) == 1:
        geometry: dict[str, Any] = {"type": "Polygon", "coordinates": rings[0]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": rings}
    properties: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if class_name is not None:
        rgb = color if color is not None else class_color(class_name)
        properties["classification"] = {"name": class_name, "color": [int(c) for c in rgb]}
    if measurements:
        properties["measurements"] = {k: float(v) for k, v in measurements.items()}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def write_feature_collection(path: str | Path, features: list[dict[str, Any]]) -> None:
    """Write features as a GeoJSON FeatureCollection, atomically."""
    atomic_write_text(path, json.dumps({"type": "FeatureCollection", "features": features}))


# --- raster <-> vector ----------------------------------------------------------------------
def _paint_ring(out: np.ndarray, ring: np.ndarray, downsample: float, value: int) -> None:
    from skimage.draw import polygon as draw_polygon

    # Level-0 coordinates of pixel corners -> mask pixel centres: shift by half a pixel.
    cols = ring[:, 0] / downsample - 0.5
    rows = ring[:, 1] / downsample - 0.5
    rr, cc = draw_polygon(rows, cols, shape=out.shape)
    out[rr, cc] = value


def rasterize(
    annotations: list[Annotation] | list[Polygon],
    shape_hw: tuple[int, int],
    downsample: float,
    class_to_value: dict[str, int] | None = None,
) -> np.ndarray:
    """Paint polygons into an int32 (h, w) array at ``downsample`` level-0 px per pixel.

    Without ``class_to_value`` every polygon paints 1; with it, each annotation paints its
    class's value and annotations of unlisted classes are skipped. Holes paint back 0. Later
    annotations overwrite earlier ones where they overlap.
    """
    out = np.zeros(tuple(shape_hw), dtype=np.int32)
    for item in annotations:
        if isinstance(item, Annotation):
            polygons, name = item.geometry, item.class_name
        else:
            polygons, name = [item], None
        if class_to_value is None:
            value = 1
        elif name in class_to_value:
            value = int(class_to_value[name])
        else:
            continue
        for exterior, holes in polygons:
            layer = np.zeros(out.shape, dtype=bool)
            _paint_ring(layer.view(np.uint8), exterior, downsample, 1)
            for hole in holes:
                _paint_ring(layer.view(np.uint8), hole, downsample, 0)
            out[layer] = value
    return out


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area (positive for counter-clockwise in x-right, y-up axes)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def mask_to_polygons(
    mask: np.ndarray,
    downsample: float,
    min_area_px: float = 4.0,
    level0_size: tuple[int, int] | None = None,
) -> list[Polygon]:
    """Outlines of a boolean mask as polygons (holes attached) in level-0 pixels.

    ``level0_size`` (width, height) is the extent the mask covers: a mask read as
    round(width / downsample) px is not exactly ``downsample`` per px, so with it the mask is
    scaled onto the slide exactly and every point lies within [0, width] x [0, height].

    Contours come from skimage.measure.find_contours on a zero-padded mask, so objects that
    touch the border still close. Rings whose area is below ``min_area_px`` mask pixels are
    dropped. Outer rings and holes are told apart by nesting depth, so a hole's island becomes
    its own polygon again.
    """
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, dtype=np.float32), 1)
    rings: list[np.ndarray] = []
    for contour in find_contours(padded, 0.5):
        # (row, col) in padded mask px -> (x, y) at pixel-corner level-0 coordinates.
        xy = np.stack([contour[:, 1] - 1 + 0.5, contour[:, 0] - 1 + 0.5], axis=1)
        if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
            xy = xy[:-1]
        if len(xy) >= 3 and abs(ring_area(xy)) >= min_area_px:
            rings.append(xy)
    from matplotlib.path import Path as MplPath

    rings.sort(key=lambda r: -abs(ring_area(r)))
    paths = [MplPath(r) for r in rings]
    boxes = [(r.min(axis=0), r.max(axis=0)) for r in rings]
    # Depth of each ring = how many larger rings contain it: even = exterior, odd = hole.
    parents: list[int | None] = []
    depths: list[int] = []
    for i, ring in enumerate(rings):
        parent: int | None = None
        depth = 0
        point = ring[0]
        # Smallest larger ring first, so the first hit is the direct parent.
        for j in range(i - 1, -1, -1):
            lo, hi = boxes[j]
            inside_box = bool(np.all(point >= lo) and np.all(point <= hi))
            if inside_box and paths[j].contains_point((float(point[0]), float(point[1]))):
                parent, depth = j, depths[j] + 1
                break
        parents.append(parent)
        depths.append(depth)
    if level0_size is None:
        scale = np.array([downsample, downsample])
        upper = None
    else:
        upper = np.array(level0_size, dtype=np.float64)
        scale = upper / np.array([mask.shape[1], mask.shape[0]], dtype=np.float64)

    def to_level0(ring: np.ndarray) -> np.ndarray:
        # Rings lie within [0, mask w] x [0, mask h]; the clip only absorbs float rounding.
        xy = ring * scale
        return xy if upper is None else np.clip(xy, 0.0, upper)

    polygons: dict[int, Polygon] = {}
    for i, ring in enumerate(rings):
        if depths[i] % 2 == 0:
            polygons[i] = (to_level0(ring), [])
        else:
            parent = parents[i]
            if parent is not None and parent in polygons:
                polygons[parent][1].append(to_level0(ring))
    return list(polygons.values())
