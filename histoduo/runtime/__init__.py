"""The run layer: what every stage (tile, import, tissue, predict, train) shares.

- :mod:`~histoduo.runtime.errors`: :class:`HistoduoError`, the one ``(path, reason)`` error.
- :mod:`~histoduo.runtime.files`: :func:`atomic_write` and friends (umask-following modes).
- :mod:`~histoduo.runtime.pool`: worker count policy and clean worker pools.
- :mod:`~histoduo.runtime.progress`: progress bars.
- :mod:`~histoduo.runtime.slides`: the per-slide resume / skip-errors loop.
"""

from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.files import (
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    commit_path,
    fsync_path,
    remove_stale_temporaries,
    temporary_path,
)
from histoduo.runtime.pool import (
    LazyPool,
    WorkerPool,
    available_cores,
    default_workers,
    pool_context,
    worker_pool,
)
from histoduo.runtime.progress import EpochProgress, SlideProgress
from histoduo.runtime.slides import STATUSES, run_slides, status_of

__all__ = [
    "STATUSES",
    "EpochProgress",
    "HistoduoError",
    "LazyPool",
    "SlideProgress",
    "WorkerPool",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "available_cores",
    "commit_path",
    "default_workers",
    "fsync_path",
    "pool_context",
    "run_slides",
    "status_of",
    "remove_stale_temporaries",
    "temporary_path",
    "worker_pool",
]
