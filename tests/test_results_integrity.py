"""Issue 18: a results folder is credited to the model that made it, one writer at a time,
new results before old ones go, and a user's files in it are never deleted."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
from test_predict import make_checkpoint

from histoduo.predict import PredictParams, predict_run
from histoduo.results.layout import ResultsConflictError, SlideSummary
from histoduo.runtime.locks import LockedError
from histoduo.slide import SlideError
from histoduo.slide.sources import SlideSource

PARAMS = PredictParams(workers=0, thumbnail_max_px=128, heatmap=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ckpts")
    return make_checkpoint(folder / "a.pt", target_mpp=2.0), make_checkpoint(
        folder / "b.pt", target_mpp=2.0, seed=1
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _predict(checkpoint: Path, out: Path, slides: list, **kwargs) -> list[str]:  # noqa: ANN003
    report = predict_run(
        checkpoint, out, PARAMS, sources=[SlideSource(s.path) for s in slides], **kwargs
    )
    return [o.status for o in report.outcomes]


def test_summary_records_the_checkpoint(checkpoints, svs_slide, tmp_path: Path) -> None:  # noqa: ANN001
    a, _ = checkpoints
    assert _predict(a, tmp_path, [svs_slide]) == ["done"]
    summary = SlideSummary.read(tmp_path / "svs_a")
    assert summary.checkpoint == str(a.resolve())
    assert summary.checkpoint_sha256 == _sha(a)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == _sha(a)


def test_other_checkpoints_results_are_refused_or_redone(
    checkpoints,  # noqa: ANN001
    svs_slide,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """Old code skipped the slide and wrote a manifest naming the new checkpoint over the
    old checkpoint's results."""
    a, b = checkpoints
    _predict(a, tmp_path, [svs_slide])
    with pytest.raises(ResultsConflictError) as err:
        _predict(b, tmp_path, [svs_slide])
    assert str(a.resolve()) in str(err.value) and str(b.resolve()) in str(err.value)
    assert SlideSummary.read(tmp_path / "svs_a").checkpoint_sha256 == _sha(a)
    assert _predict(b, tmp_path, [svs_slide], overwrite=True) == ["done"]
    assert SlideSummary.read(tmp_path / "svs_a").checkpoint_sha256 == _sha(b)


def test_failed_overwrite_keeps_the_previous_result(
    checkpoints,  # noqa: ANN001
    svs_slide,  # noqa: ANN001
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Old code deleted the slide's folder before the new result existed: a failure left
    nothing. Now the new result is staged and the old one stays until it is complete."""
    a, _ = checkpoints
    _predict(a, tmp_path, [svs_slide])
    before = (tmp_path / "svs_a" / "scores.npz").read_bytes()

    def broken(slide_dir: Path, scores, *args) -> None:  # noqa: ANN001, ANN002
        scores.save(slide_dir / "scores.npz")  # half the outputs, then the disk fails
        raise SlideError(slide_dir, "simulated failure while writing results")

    monkeypatch.setattr("histoduo.predict.run.write_slide_outputs", broken)
    assert _predict(a, tmp_path, [svs_slide], overwrite=True, skip_errors=True) == ["error"]
    assert (tmp_path / "svs_a" / "done").exists()
    assert (tmp_path / "svs_a" / "scores.npz").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".svs_a")]  # no staging
    with (tmp_path / "slides.csv").open() as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["done"]


def test_user_files_in_a_slide_folder_are_kept(checkpoints, svs_slide, tmp_path: Path) -> None:  # noqa: ANN001
    """Old code removed an unfinished OUT/<slide>/ whole, the user's files included."""
    a, _ = checkpoints
    folder = tmp_path / "svs_a"
    folder.mkdir()
    (folder / "pathologist_notes.txt").write_text("check the margin")
    (folder / "tiles.csv").write_text("slide,x\n")  # an interrupted run's file: ours
    assert _predict(a, tmp_path, [svs_slide]) == ["done"]
    assert (folder / "pathologist_notes.txt").read_text() == "check the margin"
    assert len((folder / "tiles.csv").read_text().splitlines()) > 2
    assert _predict(a, tmp_path, [svs_slide], overwrite=True) == ["done"]
    assert (folder / "pathologist_notes.txt").exists()


def test_manifest_lists_every_slide_in_the_folder(
    checkpoints,  # noqa: ANN001
    svs_slide,  # noqa: ANN001
    svs_slide_b,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """Old code: a second run into the same --out left a manifest with its slides only."""
    a, _ = checkpoints
    _predict(a, tmp_path, [svs_slide])
    _predict(a, tmp_path, [svs_slide_b])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    listed = {row["slide"]: row for row in manifest["slides"]}
    assert set(listed) == {"svs_a", "svs_b"}
    assert {row["checkpoint_sha256"] for row in listed.values()} == {_sha(a)}
    assert [row["slide"] for row in manifest["this_run"]] == ["svs_b"]


def test_second_writer_of_a_results_folder_is_refused(
    checkpoints,  # noqa: ANN001
    svs_slide,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    a, _ = checkpoints
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started_unix": 0.0}
    (tmp_path / ".histoduo.lock").write_text(json.dumps(holder))  # a live process holds it
    with pytest.raises(LockedError, match=f"pid {os.getppid()}"):
        _predict(a, tmp_path, [svs_slide])
    assert not (tmp_path / "svs_a").exists()
