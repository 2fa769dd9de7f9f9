"""Issue 18: a tile store survives concurrent writers and damage, and never loses data.

Two ``tile`` runs into one store (real processes, the first held deterministically by the
lock's test hook), swapped / truncated slide files, a damaged index, ``--overwrite`` and
``-o`` pointed at an input slide.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import pytest

from histoduo.runtime.locks import HOLD_ENV
from histoduo.slide.sources import SlideSource
from histoduo.store import (
    StoreError,
    TileStore,
    read_index,
    slide_file_path,
    upgrade_store,
    write_index,
)
from histoduo.tiling import TilingParams, tile_slides

PARAMS = TilingParams(target_mpp=2.0, tile_size_px=64)  # a few dozen tiles per test slide
TILE_ARGS = ["--mpp", "2", "--tile-size", "64", "--workers", "0", "--quiet"]


def _tile(slides: list, out: Path, **kwargs) -> dict[str, str]:  # noqa: ANN003
    report = tile_slides(
        [SlideSource(s.path) for s in slides], out, PARAMS, workers=0, progress=False, **kwargs
    )
    return {r.slide: r.status for r in report.results}


def _cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen(
        [sys.executable, "-m", "histoduo", *args],
        env={**os.environ, **(env or {})},
        text=True,
        **kwargs,
    )


def _wait_for(check, what: str, timeout_s: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_concurrent_tile_runs_keep_every_slide(
    svs_slide,  # noqa: ANN001
    svs_slide_b,  # noqa: ANN001
    tiff_slide,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """Old code: the second run deleted the first's temporary file and the index ended with
    one run's slides. Now the second is refused naming the holder, and a waiting one adds
    its slide after the first finishes."""
    out = tmp_path / "c.h5"
    held = tmp_path / "held"
    first = _cli(
        "tile", str(svs_slide.path), str(svs_slide_b.path), "-o", str(out), *TILE_ARGS,
        env={HOLD_ENV: str(held)},
    )  # fmt: skip
    try:
        _wait_for(held.exists, "the first run to take the lock")
        refused = _cli(
            "tile", str(tiff_slide.path), "-o", str(out), *TILE_ARGS,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = refused.communicate(timeout=120)
        assert refused.returncode == 1
        assert f"pid {first.pid} on {socket.gethostname()}" in err
        assert "--clear-dead-locks" in err and "Traceback" not in err
        log = tmp_path / "waiter.log"
        with log.open("w") as handle:
            waiter = _cli(
                "tile", str(tiff_slide.path), "-o", str(out), *TILE_ARGS, "--wait-lock", "300",
                stdout=handle, stderr=subprocess.STDOUT,
            )  # fmt: skip
            _wait_for(lambda: "waiting up to 300 s" in log.read_text(), "the waiter to wait")
            Path(str(held) + ".release").touch()
            assert first.wait(300) == 0
            assert waiter.wait(300) == 0, log.read_text()
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
    with TileStore(out) as store:
        assert store.slides == ["svs_a", "svs_b", "tiff_a"]
        for slide in store.slides:
            assert store.read_tiles(slide, [0]).shape == (1, 64, 64, 3)
    assert not out.with_name("c.h5.lock").exists()


def test_lock_of_a_killed_tile_run_is_cleared(svs_slide, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "c.h5"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = {"host": socket.gethostname(), "pid": gone.pid, "started_unix": 0.0}
    out.with_name("c.h5.lock").write_text(json.dumps(lock))
    messages: list[str] = []
    assert _tile([svs_slide], out, log=messages.append) == {"svs_a": "done"}
    assert any("cleared the dead writer lock" in m for m in messages)


@pytest.fixture
def two_slide_store(svs_slide, svs_slide_b, tmp_path: Path) -> Path:  # noqa: ANN001
    out = tmp_path / "s.h5"
    assert _tile([svs_slide, svs_slide_b], out) == {"svs_a": "done", "svs_b": "done"}
    return out


def test_swapped_slide_file_is_an_error_and_is_redone(
    two_slide_store: Path,
    svs_slide,  # noqa: ANN001
    svs_slide_b,  # noqa: ANN001
) -> None:
    """Old code graded slide A with slide B's tiles and `tile` said "already done"."""
    out = two_slide_store
    file_a = slide_file_path(out, "svs_a")
    shutil.copyfile(slide_file_path(out, "svs_b"), file_a)
    with pytest.raises(StoreError) as err, TileStore(out) as store:
        store.coords("svs_a")
    assert str(file_a) in str(err.value)
    assert _tile([svs_slide, svs_slide_b], out) == {"svs_a": "done", "svs_b": "skipped"}
    with TileStore(out) as store:
        assert store.record("svs_a").name == "svs_a" and len(store.coords("svs_a"))


def test_same_size_file_from_another_run_is_told_apart_by_its_id(
    two_slide_store: Path,
    svs_slide,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    other = tmp_path / "other.h5"
    _tile([svs_slide], other)
    file_a = slide_file_path(two_slide_store, "svs_a")
    replacement = slide_file_path(other, "svs_a")
    assert replacement.stat().st_size == file_a.stat().st_size  # only the id differs
    shutil.copyfile(replacement, file_a)
    with pytest.raises(StoreError, match="replaced by another file") as err:
        with TileStore(two_slide_store) as store:
            store.read_tiles("svs_a", [0])
    assert str(file_a) in str(err.value)


def test_truncated_slide_file_is_an_error_and_is_redone(
    two_slide_store: Path,
    svs_slide,  # noqa: ANN001
) -> None:
    """Old code: a truncated slide file was "already done" and stayed unreadable."""
    file_a = slide_file_path(two_slide_store, "svs_a")
    with file_a.open("r+b") as handle:
        handle.truncate(file_a.stat().st_size // 2)
    with pytest.raises(StoreError, match="truncated") as err:
        TileStore(two_slide_store)
    assert str(file_a) in str(err.value)
    assert _tile([svs_slide], two_slide_store) == {"svs_a": "done"}
    with TileStore(two_slide_store) as store:
        assert store.slides == ["svs_a", "svs_b"]
        assert store.read_tiles("svs_a", [0]).shape == (1, 64, 64, 3)


def test_store_without_identities_still_reads_and_resumes(
    two_slide_store: Path,
    svs_slide,  # noqa: ANN001
) -> None:
    """A format-2 store written before identities: read by name and completion marker;
    its first rerun records the sizes."""
    entries, classes = read_index(two_slide_store)
    legacy = [
        replace(e, file_size=None, record=replace(e.record, file_id="")) for e in entries.values()
    ]
    write_index(two_slide_store, legacy, classes or None)
    for entry in legacy:
        with h5py.File(entry.file, "r+") as f:
            del f.attrs["file_id"]
    with TileStore(two_slide_store) as store:
        assert len(store.coords("svs_a")) > 0
    assert _tile([svs_slide], two_slide_store) == {"svs_a": "skipped"}
    assert all(e.file_size for e in read_index(two_slide_store)[0].values())


def test_damaged_index_is_rebuilt_from_the_slide_files(
    two_slide_store: Path,
    tiff_slide,  # noqa: ANN001
) -> None:
    """Old code: "not a histoduo tile store; pass --overwrite", which then deleted every
    intact slide file not on the command line."""
    two_slide_store.write_bytes(b"\x89HDF\r\n garbage")
    messages: list[str] = []
    assert _tile([tiff_slide], two_slide_store, log=messages.append) == {"tiff_a": "done"}
    assert any("rebuilt the index" in m for m in messages)
    with TileStore(two_slide_store) as store:
        assert store.slides == ["svs_a", "svs_b", "tiff_a"]


def test_upgrade_store_rebuilds_a_lost_index(two_slide_store: Path) -> None:
    two_slide_store.unlink()
    assert upgrade_store(two_slide_store) == ["svs_a", "svs_b"]
    with TileStore(two_slide_store) as store:
        assert store.slides == ["svs_a", "svs_b"]


def test_overwrite_redoes_only_the_slides_given(
    two_slide_store: Path,
    svs_slide,  # noqa: ANN001
) -> None:
    """Old code: --overwrite with one slide deleted every other slide of the store."""
    file_b = slide_file_path(two_slide_store, "svs_b")
    before_b = file_b.stat().st_ino
    assert _tile([svs_slide], two_slide_store, overwrite=True) == {"svs_a": "done"}
    with TileStore(two_slide_store) as store:
        assert store.slides == ["svs_a", "svs_b"]
    assert file_b.stat().st_ino == before_b  # untouched


def test_no_message_advises_a_destructive_overwrite(svs_slide, tmp_path: Path) -> None:  # noqa: ANN001
    notes = tmp_path / "notes.h5"
    notes.write_text("my notes")
    with pytest.raises(StoreError) as err:
        _tile([svs_slide], notes)
    assert "--overwrite" not in str(err.value) and notes.read_text() == "my notes"


def test_out_pointed_at_an_input_slide_is_refused(svs_slide, tmp_path: Path) -> None:  # noqa: ANN001
    slide = tmp_path / "a.svs"
    shutil.copyfile(svs_slide.path, slide)
    before = slide.read_bytes()
    proc = _cli(
        "tile", str(slide), "-o", str(slide), "--overwrite", *TILE_ARGS,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "one of the input slides" in err
    assert slide.read_bytes() == before


def test_merge_and_upgrade_take_the_stores_lock(two_slide_store: Path, tmp_path: Path) -> None:
    from histoduo.runtime.locks import LockedError
    from histoduo.store import merge_stores

    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started_unix": 0.0}
    lock = two_slide_store.with_name(two_slide_store.name + ".lock")
    lock.write_text(json.dumps(holder))  # a live process is writing the store
    with pytest.raises(LockedError, match=f"pid {os.getppid()}"):
        merge_stores([two_slide_store, tmp_path / "missing.h5"], two_slide_store)
    with pytest.raises(LockedError, match=f"pid {os.getppid()}"):
        upgrade_store(two_slide_store)
    lock.unlink()
    merged = tmp_path / "merged.h5"
    assert merge_stores([two_slide_store], merged) == ["svs_a", "svs_b"]
    assert not merged.with_name("merged.h5.lock").exists()


def test_index_draft_of_a_killed_run_is_removed(two_slide_store: Path, svs_slide) -> None:  # noqa: ANN001
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    draft = two_slide_store.with_name(f".s.h5.{socket.gethostname()}-{gone.pid}.0123abcd.tmp")
    draft.write_bytes(b"half an index")
    assert _tile([svs_slide], two_slide_store) == {"svs_a": "skipped"}
    assert not draft.exists()
