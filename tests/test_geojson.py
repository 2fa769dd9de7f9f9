"""QuPath GeoJSON: reading exports, writing features, rasterising and vectorising masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histoduo.slide.geojson import (
    CLASS_COLORS,
    Annotation,
    class_color,
    mask_to_polygons,
    polygon_feature,
    rasterize,
    read_annotations,
    write_feature_collection,
)


def _donut_mask() -> np.ndarray:
    """A ring with an island in its hole, plus a separate square touching the border."""
    yy, xx = np.mgrid[0:80, 0:100]
    r = np.hypot(xx - 40, yy - 40)
    mask = (r <= 30) & (r >= 15)
    mask |= r <= 6  # island inside the hole
    mask[60:80, 85:100] = True  # touches the right and bottom borders
    return mask


def test_round_trip_mask_polygons_geojson(tmp_path: Path) -> None:
    mask = _donut_mask()
    downsample = 16.0
    polygons = mask_to_polygons(mask, downsample)
    assert len(polygons) == 3  # ring, island, border square
    ring = max(polygons, key=lambda p: np.ptp(p[0][:, 0]))
    assert len(ring[1]) == 1  # the hole is attached to the ring
    path = tmp_path / "tissue.geojson"
    write_feature_collection(path, [polygon_feature(polygons, class_name="Tissue")])
    assert [p.name for p in tmp_path.iterdir()] == ["tissue.geojson"]  # no tmp left behind
    annotations = read_annotations(path)
    assert len(annotations) == 1 and annotations[0].class_name == "Tissue"
    assert annotations[0].color == CLASS_COLORS["Tissue"]
    for exterior, holes in annotations[0].geometry:
        for ring_xy in [exterior, *holes]:
            assert ring_xy[:, 0].min() >= 0 and ring_xy[:, 0].max() <= 100 * downsample
            assert ring_xy[:, 1].min() >= 0 and ring_xy[:, 1].max() <= 80 * downsample
    redrawn = rasterize(annotations, mask.shape, downsample) > 0
    differing = np.count_nonzero(redrawn != mask)
    assert differing <= 0.03 * mask.sum(), differing
    assert redrawn[40, 40] and not redrawn[40, 48] and redrawn[40, 62]  # island, hole, ring
    # The same polygons rasterised at another scale land at the same place.
    coarse = rasterize(annotations, (40, 50), downsample * 2) > 0
    assert coarse[20, 20] and not coarse[20, 24]


def test_read_qupath_bare_list_with_multipolygon_and_holes(tmp_path: Path) -> None:
    square = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
    other = [[200, 0], [260, 0], [260, 60], [200, 60], [200, 0]]
    features = [
        {
            "type": "Feature",
            "id": "a1",
            "geometry": {"type": "MultiPolygon", "coordinates": [[square, hole], [other]]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "high_grade", "color": [200, 0, 0]},
                "isLocked": False,
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [other]},
            "properties": {"objectType": "annotation", "classification": {"name": "normal"}},
        },
        {  # QuPath point annotations have no area and are ignored for rasterising
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [5, 5]},
            "properties": {"objectType": "annotation"},
        },
    ]
    path = tmp_path / "export.geojson"
    path.write_text(json.dumps(features))
    annotations = read_annotations(path)
    assert [a.class_name for a in annotations] == ["high_grade", "normal", None]
    first = annotations[0]
    assert first.color == (200, 0, 0) and first.object_type == "annotation"
    assert len(first.geometry) == 2
    exterior, holes = first.geometry[0]
    assert exterior.shape == (4, 2) and len(holes) == 1
    assert annotations[2].geometry == []
    labels = rasterize(annotations, (10, 30), 10.0, class_to_value={"high_grade": 3, "normal": 1})
    assert labels[2, 2] == 3 and labels[5, 5] == 0  # hole respected
    assert labels[3, 22] == 1  # the later 'normal' annotation overwrites the overlap
    only_grade = rasterize(annotations, (10, 30), 10.0, class_to_value={"high_grade": 3})
    assert only_grade[3, 22] == 3


def test_read_feature_collection_single_feature_and_bare_geometry(tmp_path: Path) -> None:
    polygon = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}
    feature = {"type": "Feature", "geometry": polygon, "properties": None}
    for name, data in [
        ("fc.geojson", {"type": "FeatureCollection", "features": [feature]}),
        ("f.geojson", feature),
        ("g.json", polygon),
    ]:
        path = tmp_path / name
        path.write_text(json.dumps(data))
        annotations = read_annotations(path)
        assert len(annotations) == 1 and isinstance(annotations[0], Annotation)
        assert annotations[0].geometry[0][0].shape == (3, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "not a GeoJSON"),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0,0],[1,1]]]}}',
            "at least 3",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[["a", 0]]]}}',
            "invalid polygon",
        ),
        ('{"type": "Feature", "geometry": {"type": "Circle", "coordinates": []}}', "unsupported"),
        ('[{"type": "Feature"}]', "geometry"),
        ('{"type": "FeatureCollection"}', "features"),
    ],
)
def test_invalid_geojson_names_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "broken_regions.geojson"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_annotations(path)
    assert "broken_regions.geojson" in str(info.value)


def test_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.geojson.*not found"):
        read_annotations(tmp_path / "nope.geojson")


def test_polygon_feature_is_qupath_style() -> None:
    square = (np.array([[0, 0], [4, 0], [4, 4], [0, 4]], dtype=float), [])
    feature = polygon_feature(
        [square], class_name="necrosis", measurements={"prob_necrosis": 0.9}, name="t1"
    )
    assert feature["geometry"]["type"] == "Polygon"
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    props = feature["properties"]
    assert props["objectType"] == "annotation" and props["name"] == "t1"
    assert props["classification"] == {"name": "necrosis", "color": list(CLASS_COLORS["necrosis"])}
    assert props["measurements"] == {"prob_necrosis": 0.9}
    multi = polygon_feature([square, square], object_type="tile")
    assert multi["geometry"]["type"] == "MultiPolygon"
    assert multi["properties"] == {"objectType": "tile"}
    json.dumps(multi)  # plain JSON types only


def test_class_colors_are_stable() -> None:
    for name in ("Tissue", "normal", "low_grade", "high_grade", "necrosis"):
        assert class_color(name) == CLASS_COLORS[name]
    assert class_color("stroma") == class_color("stroma")
    assert class_color("stroma") != class_color("fat")
    assert all(0 <= c <= 255 for c in class_color("anything at all"))


def test_empty_mask_gives_no_polygons() -> None:
    assert mask_to_polygons(np.zeros((10, 10), bool), 4.0) == []
    full = mask_to_polygons(np.ones((10, 10), bool), 4.0)
    assert len(full) == 1
    exterior = full[0][0]
    assert exterior[:, 0].min() >= 0 and exterior[:, 0].max() <= 40


def test_points_and_lines_are_warned_about_each_read(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}
    point = {"type": "Point", "coordinates": [5, 5]}
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": g, "properties": {}} for g in (square, point)
    ]}))  # fmt: skip
    for _ in range(2):  # no per-process memory: each read of the file says it
        read_annotations(path)
        assert "ignored 1 point/line annotation(s)" in capsys.readouterr().err
    messages: list[str] = []
    read_annotations(path, warn=messages.append)
    assert len(messages) == 1 and "mixed.geojson" in messages[0]
    read_annotations(path, warn=False)
    assert capsys.readouterr().err == ""
