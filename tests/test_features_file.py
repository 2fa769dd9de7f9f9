"""Feature files in TRIDENT's layout: written whole, read back exactly, refused when damaged."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from histoduo.store.features import (
    FeatureFileError,
    FeatureInfo,
    feature_dir,
    feature_file_path,
    feature_files,
    read_feature_bag,
    write_feature_file,
)


def _info(slide: str, dim: int = 8) -> FeatureInfo:
    return FeatureInfo(slide=slide, encoder="tiny", embedding_dim=dim, mpp=0.5, input_size_px=32)


def test_round_trip_with_awkward_slide_names(tmp_path):
    folder = feature_dir(tmp_path, "timm:tiny/vit")
    rng = np.random.default_rng(0)
    written = {}
    for name in ("a b", "lung/img 1.jpeg", "..", "plain"):
        feats = rng.normal(size=(5, 8)).astype(np.float32)
        coords = rng.integers(0, 1000, size=(5, 2))
        write_feature_file(
            feature_file_path(folder, name), _info(name), feats, coords, {"patch_size": 224}
        )
        written[name] = (feats, coords)
    files = feature_files(folder)
    assert set(files) == set(written)
    assert all(p.parent == folder for p in files.values())
    for name, path in files.items():
        bag = read_feature_bag(path)
        np.testing.assert_allclose(bag.features, written[name][0], atol=1e-2)  # float16 on disk
        np.testing.assert_array_equal(bag.coords, written[name][1])
        assert bag.info == _info(name)
        with h5py.File(path) as f:
            assert f["coords"].attrs["patch_size"] == 224


def test_incomplete_or_mismatched_files_are_refused(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(FeatureFileError, match="row for row"):
        write_feature_file(path, _info("s"), np.zeros((3, 8)), np.zeros((2, 2)))
    with pytest.raises(FeatureFileError, match="encoder says 8"):
        write_feature_file(path, _info("s"), np.zeros((3, 4)), np.zeros((3, 2)))
    assert not path.exists()
    write_feature_file(path, _info("s"), np.zeros((3, 8)), np.zeros((3, 2)))
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(FeatureFileError, match="rerun embed") as err:
        read_feature_bag(path)
    assert str(path) in str(err.value)
