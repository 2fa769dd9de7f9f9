"""The one error shape every stage raises for bad input: the file and what is wrong with it."""

from __future__ import annotations

import errno
from pathlib import Path


class HistoduoError(Exception):
    """A user's file cannot be used; ``str()`` is ``"<path>: <reason>"``.

    ``status`` is what a per-slide run records for a slide that fails with this error; a
    subclass that means something else (e.g. no tissue) overrides it, so run loops map typed
    errors to statuses instead of reading the message.
    """

    status = "error"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in worker processes and re-raised in the parent: pickle (path, reason).
        return (type(self), (self.path, self.reason))


class OutputError(HistoduoError):
    """An output could not be written: the disk is full, read-only or not ours to write.

    Unlike a bad input it concerns every slide after it, so a run stops at the first one
    (even with --skip-errors) after keeping what is complete.
    """

    status = "write-failed"


# errno -> what to tell the user. h5py reports C-library errors as OSError text with the
# errno inside ("errno = 28, error message = 'No space left on device'"), so the text is
# matched too.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere (--out)",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere (--out)",
    errno.EROFS: "the file system is read-only; write elsewhere (--out)",
    errno.EACCES: "permission denied; write to a folder you own (--out)",
    errno.EPERM: "operation not permitted; write to a folder you own (--out)",
}
_DISK_TEXT = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


def output_error(exc: BaseException, path: str | Path | None = None) -> OutputError | None:
    """The OutputError an OSError from writing means (full, read-only, no permission), naming
    the file (the exception's own, else ``path``); None for any other error."""
    if isinstance(exc, OutputError):
        return exc
    if not isinstance(exc, OSError):
        return None
    code = exc.errno if exc.errno in _DISK_ERRNOS else None
    if code is None:
        text = str(exc)
        code = next((c for words, c in _DISK_TEXT.items() if words in text), None)
    if code is None:
        return None
    where = exc.filename or path or "output"
    if path is not None and Path(str(where)).name.endswith(".tmp"):
        where = path  # the hidden temporary file means nothing to the user; name the output
    return OutputError(where, f"cannot write: {_DISK_ERRNOS[code]}")
