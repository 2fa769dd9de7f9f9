"""The run layer's temporary files: a killed writer's leftovers are swept, a live one's stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from histoduo.runtime.files import atomic_write, remove_stale_temporaries, temporary_path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.send_signal(signal.SIGKILL)
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    ours = temporary_path(tmp_path / "last.pt")  # this (live) process's
    ours.write_bytes(b"half")
    dead = tmp_path / ours.name.replace(f"-{os.getpid()}.", f"-{_dead_pid()}.")
    dead.write_bytes(b"half")
    elsewhere = tmp_path / ".metrics.csv.other-host-1.0badc0de.tmp"  # a shard on another host
    elsewhere.write_bytes(b"half")
    kept = tmp_path / "notes.tmp"  # not ours at all
    kept.write_bytes(b"user file")

    assert remove_stale_temporaries(tmp_path) == 1
    assert not dead.exists()
    assert ours.exists() and elsewhere.exists() and kept.exists()


def test_atomic_write_leaves_nothing_when_the_block_raises(tmp_path: Path) -> None:
    target = tmp_path / "slides.csv"
    with pytest.raises(RuntimeError, match="writer died"), atomic_write(target) as handle:
        handle.write("half a table")
        raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []
