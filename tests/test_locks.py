"""Writer locks (histoduo.runtime.locks): one writer at a time, dead holders cleared."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from histoduo.runtime.locks import (
    HOLD_ENV,
    LockedError,
    LockParams,
    WriterLock,
    lock_path_for,
)


def _write_lock(path: Path, **fields: object) -> None:
    data = {"host": socket.gethostname(), "pid": os.getpid(), "started_unix": 0.0}
    data.update(fields)
    path.write_text(json.dumps(data))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_names_holder_and_is_released(tmp_path: Path) -> None:
    path = lock_path_for(tmp_path / "tiles.h5")
    assert path.name == "tiles.h5.lock"
    with WriterLock(path, what="tile store tiles.h5"):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from histoduo.runtime.locks import WriterLock\n"
                f"WriterLock({str(path)!r}, what='tile store tiles.h5').acquire()",
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0
        assert "LockedError" in other.stderr
        assert f"pid {os.getpid()} on {socket.gethostname()}" in other.stderr
        assert "--clear-dead-locks" in other.stderr and "--wait-lock" in other.stderr
    assert not path.exists()


def test_lock_of_a_dead_process_on_this_host_is_cleared(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    _write_lock(path, pid=_dead_pid())
    messages: list[str] = []
    with WriterLock(path, what="store", log=messages.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert messages and "dead writer lock" in messages[0]


def test_reused_pid_is_told_apart_by_its_start_time(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    # A live pid (our parent) whose recorded start time is not its own: the holder is gone.
    _write_lock(path, pid=os.getppid(), pid_start="1")
    with WriterLock(path, what="store"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_live_holder_on_this_host_is_never_cleared(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    _write_lock(path, pid=os.getppid())  # alive, no start time recorded
    with pytest.raises(LockedError, match=f"pid {os.getppid()}"):
        WriterLock(path, what="store", clear_dead=True).acquire()
    assert json.loads(path.read_text())["pid"] == os.getppid()


def test_other_hosts_lock_needs_clear_dead_locks(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    _write_lock(path, host="node-that-died", pid=12345)
    with pytest.raises(LockedError, match="node-that-died"):
        WriterLock(path, what="store").acquire()
    with WriterLock(path, what="store", clear_dead=True):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert not path.exists()


def test_second_writer_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    signal = tmp_path / "held"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from histoduo.runtime.locks import WriterLock\n"
            f"with WriterLock({str(path)!r}, what='store'): pass",
        ],
        env={**os.environ, HOLD_ENV: str(signal)},
    )
    try:
        deadline = time.monotonic() + 60
        while not signal.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal.exists()
        with pytest.raises(LockedError):
            WriterLock(path, what="store").acquire()  # default: fail at once
        got: list[int] = []
        waiter = threading.Thread(
            target=lambda: got.append(_take(path, wait_s=60)), name="waiter", daemon=True
        )
        waiter.start()
        Path(str(signal) + ".release").touch()
        waiter.join(60)
        assert got == [os.getpid()]
    finally:
        holder.wait(60)
    assert holder.returncode == 0


def _take(path: Path, wait_s: float) -> int:
    with WriterLock(path, what="store", wait_s=wait_s):
        return json.loads(path.read_text())["pid"]


def test_lock_params_refuse_bad_waits() -> None:
    with pytest.raises(ValueError, match="--wait-lock"):
        LockParams(wait_s=-1)
    with pytest.raises(ValueError, match="--wait-lock"):
        LockParams(wait_s=float("nan"))


def test_draft_of_a_writer_killed_while_locking_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    draft = tmp_path / f".x.lock.{socket.gethostname()}-{_dead_pid()}.0123abcd.tmp"
    draft.write_text("{")
    live = tmp_path / f".x.lock.{socket.gethostname()}-{os.getppid()}.0123abcd.tmp"
    live.write_text("{")
    with WriterLock(path, what="store"):
        pass
    assert not draft.exists() and live.exists()
