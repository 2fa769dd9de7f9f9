"""Atomic output files whose permissions follow the user's umask.

Every output histoduo writes goes through here: data lands in a hidden temporary file in the
destination folder and is renamed into place, so readers never see half a file and a killed
run leaves the previous file intact. The temporary file is created with ``os.open(..., 0o666)``
so the umask decides its mode, as for any file a user's program creates (``tempfile.mkstemp``
would leave 0600, unreadable to a QuPath user on another account).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

# .<name>.<host>-<pid>.<token>.tmp: the writer's host and pid tell a killed writer's leftovers
# from a live one's (another shard writing into the same folder).
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[^/]+)-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def temporary_path(path: str | Path) -> Path:
    """A unique hidden sibling of ``path``; renaming it onto ``path`` is atomic."""
    path = Path(path)
    writer = f"{socket.gethostname()}-{os.getpid()}"
    return path.with_name(f".{path.name}.{writer}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, of: str | None = None) -> int:
    """Delete the temporary files that killed writers on this host left in ``folder``
    (only those of the file named ``of``, when given).

    Files of live processes, and of other hosts (a shard on a shared file system), stay.
    Returns how many were removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host, removed = socket.gethostname(), 0
    for path in folder.iterdir():
        if of is not None and not path.name.startswith(f".{of}."):
            continue
        match = _TEMPORARY.match(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            if path.is_dir() and not path.is_symlink():  # a killed run's staging folder
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


# Room kept free beyond what a write needs: HDF5 flushes its chunk cache (1 MiB per dataset)
# and metadata when a file closes, and a close that fails for want of space leaves HDF5 in a
# state that crashes the interpreter on exit. So writers stop *before* the disk is full.
DISK_RESERVE_BYTES = 4 * 1024 * 1024


def require_free_space(path: str | Path, needed_bytes: int) -> None:
    """OSError(ENOSPC) naming ``path`` unless its file system has ``needed_bytes`` plus
    :data:`DISK_RESERVE_BYTES` free; a file system that cannot say is trusted."""
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed_bytes + DISK_RESERVE_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device (need {needed_bytes + DISK_RESERVE_BYTES:,} bytes, "
            f"{free:,} free)",
            str(path),
        )


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's content, read in blocks (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_path(tmp: str | Path, path: str | Path, *, fsync: bool = True) -> Path:
    """Rename a finished temporary file onto ``path`` (after syncing it to disk)."""
    if fsync:
        fsync_path(tmp)
    os.replace(tmp, path)
    return Path(path)


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path to hand to a library writer (h5py, torch.save, savefig, PIL).

    Renamed onto ``path`` when the block ends normally, removed when it raises. Libraries
    create the file with ``open``, so its mode follows the umask too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        commit_path(tmp, path, fsync=fsync)
    except BaseException:
        # On a read-only file system the unlink fails too (and the file never existed):
        # the error worth reporting is the one that stopped the write.
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open ``path`` for writing atomically (``"w"`` text, ``"wb"`` bytes).

    The file appears complete under its name when the block ends, or not at all.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes new files only ('w' or 'wb'), got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)
