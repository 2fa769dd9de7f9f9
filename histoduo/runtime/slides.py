"""The per-slide run loop every stage shares: resume, process, record failures, stop or go on.

A stage supplies three callbacks; the loop owns the policy. Typed errors decide a failed
slide's status (:attr:`HistoduoError.status`: ``error``, ``no_tissue``), never its message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from histoduo.runtime.errors import HistoduoError

T = TypeVar("T")

STATUSES = ("done", "skipped", "no_tissue", "error")
FAILED_STATUSES = ("no_tissue", "error")  # what reports list as failed slides
FINISHED_STATUSES = ("done", "skipped")


def status_of(exc: BaseException) -> str:
    """The status a slide failing with ``exc`` gets in reports."""
    return getattr(exc, "status", "error")


def run_slides(
    items: Iterable[T],
    *,
    process: Callable[[T], None],
    failed: Callable[[T, HistoduoError, str, float], None],
    resumed: Callable[[T], bool] = lambda item: False,
    skip_errors: bool = False,
    finished: Callable[[T], None] | None = None,
    errors: tuple[type[HistoduoError], ...] = (HistoduoError,),
) -> HistoduoError | None:
    """Run ``process`` on each item; returns the error that stopped the run, or None.

    ``resumed(item)`` returns True when the item is already done (it records the skip
    itself). ``failed(item, error, status, seconds)`` records a failure; without
    ``skip_errors`` the loop stops at the first one and returns it, so the caller can save
    what finished before raising. ``finished(item)`` runs after every item, whatever happened.
    Only ``errors`` are per-slide failures; anything else (a bug, Ctrl-C) ends the run.
    """
    for item in items:
        try:
            if resumed(item):
                continue
            started = time.perf_counter()
            try:
                process(item)
            except errors as exc:
                failed(item, exc, status_of(exc), time.perf_counter() - started)
                if not skip_errors:
                    return exc
        finally:
            if finished is not None:
                finished(item)
    return None
