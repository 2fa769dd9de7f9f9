"""The one error shape every stage raises for bad input: the file and what is wrong with it."""

from __future__ import annotations

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
