"""The run layer: what every stage (tile, import, tissue, predict, train) shares.

- :mod:`~histoduo.run.errors`: :class:`HistoduoError`, the one ``(path, reason)`` error.
- :mod:`~histoduo.run.files`: :func:`atomic_write` and friends (umask-following modes).
- :mod:`~histoduo.run.pool`: worker count policy and clean worker pools.
- :mod:`~histoduo.run.progress`: progress bars.
- :mod:`~histoduo.run.slides`: the per-slide resume / skip-errors loop.
"""

from histoduo.run.errors import HistoduoError
from histoduo.run.files import (
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    commit_path,
    fsync_path,
    remove_stale_temporaries,
    temporary_path,
)
from histoduo.run.pool import LazyPool, available_cores, default_workers, pool_context, worker_pool
from histoduo.run.progress import EpochProgress, SlideProgress
from histoduo.run.slides import STATUSES, run_slides, status_of

__all__ = [
    "STATUSES",
    "EpochProgress",
    "HistoduoError",
    "LazyPool",
    "SlideProgress",
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
