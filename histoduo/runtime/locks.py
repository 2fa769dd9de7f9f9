"""Writer locks: one writer at a time on a tile store or a results folder.

A lock is a small JSON file (host, pid, the process's start time, the time taken, the
command) created with ``O_CREAT | O_EXCL``, which is atomic on local file systems and on
NFS v3+: of two writers exactly one creates it. The holder removes it when it is done
(:class:`WriterLock` is a context manager). Readers never look at it.

A second writer fails at once with a message that names the holder (default), or waits up to
``wait_s`` seconds (``--wait-lock``). A lock whose holder is gone is cleared:

- automatically when the holder ran on this host and its pid no longer runs (or runs a
  different process: the start time recorded in the lock tells a reused pid apart);
- with ``--clear-dead-locks`` when the holder ran on another host, which this host cannot
  check (a killed cluster job); the user asserts the holder is dead. A holder alive on this
  host is never cleared.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.files import _alive, remove_stale_temporaries, temporary_path

# Test hook: a holder writes this file once it holds the lock and keeps the lock until
# "<file>.release" exists, so tests can hold a lock deterministically (no sleep races).
HOLD_ENV = "HISTODUO_TEST_HOLD_LOCK"
_POLL_S = 0.2


class LockedError(HistoduoError):
    """Another writer holds the lock; the message names it and how to clear a dead one."""

    status = "locked"


def lock_path_for(target: str | Path) -> Path:
    """The lock of a file target (a tile store index): ``<target>.lock`` beside it."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def folder_lock_path(folder: str | Path) -> Path:
    """The lock of a folder target (a results folder): a hidden file inside it."""
    return Path(folder) / ".histoduo.lock"


def _process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" where /proc is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclass(kw_only=True)
class LockHolder:
    """What a lock file says about the process holding it."""

    host: str
    pid: int
    pid_start: str = ""  # /proc start time of pid, to tell a reused pid apart
    started_unix: float = 0.0
    command: str = ""

    @classmethod
    def me(cls) -> LockHolder:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            pid_start=_process_start(pid),
            started_unix=time.time(),
            command=" ".join(sys.argv)[:500],
        )

    @classmethod
    def from_text(cls, text: str) -> LockHolder | None:
        try:
            data = json.loads(text)
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                pid_start=str(data.get("pid_start", "")),
                started_unix=float(data.get("started_unix", 0.0)),
                command=str(data.get("command", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_unix))
        return f"pid {self.pid} on {self.host} since {since} ({self.command or 'unknown command'})"

    def dead_here(self) -> bool:
        """True when this host can tell the holder is gone (same host, pid not running it)."""
        if self.host != socket.gethostname():
            return False
        if not _alive(self.pid):
            return True
        return bool(self.pid_start) and _process_start(self.pid) not in ("", self.pid_start)


def _create(path: Path, text: str) -> bool:
    """Create the lock with its content in one step; False when it exists already.

    The content goes to a temporary file first and is hard-linked to the lock's name
    (``link`` fails if the name exists), so no one ever reads a half-written lock.
    """
    tmp = temporary_path(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then write
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _read(path: Path) -> tuple[str, LockHolder | None] | None:
    """(raw text, holder) of a lock file; None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text, LockHolder.from_text(text)


def _break(path: Path, seen: str) -> None:
    """Remove the lock whose text was ``seen``, but never one a live writer made since.

    The lock is renamed aside first, so of several processes clearing it only one gets it;
    if what was renamed is not what we judged dead (a new holder took it in between), it is
    put back.
    """
    aside = path.with_name(f"{path.name}.clearing-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else cleared it
    if aside.read_text() == seen:
        aside.unlink(missing_ok=True)
        return
    try:
        os.link(aside, path)  # a live lock taken meanwhile: restore it
    except FileExistsError:
        pass  # a third writer holds the lock now; the one we moved keeps its own copy
    aside.unlink(missing_ok=True)


class WriterLock:
    """The one writer of ``target`` (a tile store index or a results folder).

    ``with WriterLock(path_of_lock, what=...)`` takes the lock or raises :class:`LockedError`
    naming the holder; the lock is removed when the block ends, however it ends.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        what: str,
        wait_s: float = 0.0,
        clear_dead: bool = False,
        log: Any = None,
    ) -> None:
        self.path = Path(path)
        self.what = what  # "tile store out.h5": named in messages
        self.wait_s = wait_s
        self.clear_dead = clear_dead
        self.log = log or (lambda message: None)
        self.holder: LockHolder | None = None

    def acquire(self) -> None:
        me = LockHolder.me()
        text = json.dumps(asdict(me), indent=1)
        deadline = time.monotonic() + max(0.0, self.wait_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waiting = False
        while True:
            try:
                created = _create(self.path, text)
            except OSError as exc:
                from histoduo.runtime.errors import output_error

                disk = output_error(exc, self.path)  # read-only or full: say it in words
                reason = disk.reason if disk is not None else str(exc)
                raise LockedError(self.path, f"cannot create the writer lock: {reason}") from exc
            if created:
                self.holder = me
                remove_stale_temporaries(self.path.parent, of=self.path.name)  # killed drafts
                self._hold_for_tests()
                return
            found = _read(self.path)
            if found is None:
                continue  # released between our two calls
            seen, holder = found
            if holder is not None and holder.host == me.host and holder.pid == me.pid:
                raise LockedError(self.path, f"{self.what} is already locked by this process")
            if holder is not None and holder.dead_here():
                self.log(f"cleared the dead writer lock {self.path} ({holder.describe()})")
                _break(self.path, seen)
                continue
            if self.clear_dead and (holder is None or holder.host != me.host):
                who = holder.describe() if holder is not None else "unreadable"
                self.log(f"cleared the writer lock {self.path} ({who}) as asked")
                _break(self.path, seen)
                continue
            if time.monotonic() >= deadline:
                raise LockedError(self.path, self._busy_message(holder))
            if not waiting:
                who = holder.describe() if holder is not None else "an unreadable lock"
                self.log(f"waiting up to {self.wait_s:g} s for {self.what}: locked by {who}")
                waiting = True
            time.sleep(_POLL_S)

    def _busy_message(self, holder: LockHolder | None) -> str:
        who = holder.describe() if holder is not None else "an unreadable lock file"
        waited = f" after waiting {self.wait_s:g} s" if self.wait_s > 0 else ""
        return (
            f"{self.what} is being written by another run: {who}{waited}. Wait for it "
            f"(--wait-lock SECONDS waits), or, if that run is dead (a killed job on another "
            f"host), rerun with --clear-dead-locks; a holder on this host whose process has "
            f"ended is cleared automatically"
        )

    def release(self) -> None:
        if self.holder is None:
            return
        found = _read(self.path)
        mine = found is not None and found[1] is not None
        if mine and found[1].pid == self.holder.pid and found[1].host == self.holder.host:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def _hold_for_tests(self) -> None:
        signal = os.environ.get(HOLD_ENV)
        if not signal:
            return
        Path(signal).write_text(str(os.getpid()))
        release = Path(signal + ".release")
        deadline = time.monotonic() + 300
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def writer_lock(
    path: str | Path,
    *,
    what: str,
    wait_s: float = 0.0,
    clear_dead: bool = False,
    log: Any = None,
) -> Iterator[WriterLock]:
    """``with writer_lock(lock_path_for(store), what=f"tile store {store}"):`` ..."""
    lock = WriterLock(path, what=what, wait_s=wait_s, clear_dead=clear_dead, log=log)
    with lock:
        yield lock


@dataclass(kw_only=True)
class LockParams:
    """How a writer meets another writer's lock (``--wait-lock``, ``--clear-dead-locks``)."""

    wait_s: float = 0.0  # 0: fail at once, naming the holder
    clear_dead: bool = False

    def __post_init__(self) -> None:
        if not self.wait_s >= 0 or self.wait_s == float("inf"):
            raise ValueError(
                f"--wait-lock must be a finite number of seconds >= 0, got {self.wait_s}"
            )
