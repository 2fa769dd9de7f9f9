"""Worker processes: how many, and how they start.

Workers start from a clean process (forkserver, spawn where that does not exist), never a fork
of a parent that holds open slide or HDF5 handles; the fork server imports the worker modules
once, so each worker starts without paying for those imports again.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


WORKER_KINDS = ("pool", "pixels", "bytes", "training")


def default_workers(kind: str = "pool", cores: int | None = None) -> int:
    """Worker processes when the user gives none: the one policy of every command.

    - ``pool`` (tiling, import: the parent only writes): one per core.
    - ``pixels`` (workers decode or resample tiles beside a model in the parent): leave one
      core to the model; on 2 cores one decoder beside it measured best
      (benchmarks/bench_predict.py).
    - ``bytes`` (workers only read JPEG bytes for the GPU to decode): a few keep up, 1-4.
    - ``training`` (DataLoader workers decoding and augmenting): up to 4, none on one core.
    """
    cores = available_cores() if cores is None else cores
    if kind == "pool":
        return cores
    if kind == "pixels":
        return 1 if cores <= 2 else cores - 1
    if kind == "bytes":
        return max(1, min(4, cores - 1))
    if kind == "training":
        return max(0, min(4, cores - 1))
    raise ValueError(f"worker kind must be one of {WORKER_KINDS}, got {kind!r}")


def pool_context(preload: Sequence[str] = ()) -> mp.context.BaseContext:
    """forkserver preloading ``preload`` (modules), or spawn where forkserver is missing."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        if preload:
            ctx.set_forkserver_preload(list(preload))
        return ctx
    return mp.get_context("spawn")


class WorkerPool:
    """Clean worker processes behind ``imap`` (ordered results) and ``submit`` (a future).

    Built on ``concurrent.futures.ProcessPoolExecutor``, not ``multiprocessing.Pool``: the
    latter's worker-handler thread wakes whenever results wait in its pipe, so while the
    parent is busy (tissue detection, writing) it spins; measured on a 2-core tiling run of
    8 slides, 2.1-3.3 s of the parent's CPU, against 0.16 s for the executor's one thread,
    which reads the results itself. A worker that dies fails the run (BrokenProcessPool)
    instead of leaving it waiting for ever.
    """

    def __init__(self, workers: int, preload: Sequence[str] = (), initializer: Any = None) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self._executor = ProcessPoolExecutor(
            workers, mp_context=pool_context(preload), initializer=initializer
        )

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``fn(item)`` for each item in the workers, results in order (all queued at once)."""
        return self._executor.map(fn, items)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._executor.submit(fn, *args)

    def close(self, *, cancel: bool = False) -> None:
        """Wait for the workers to exit; ``cancel`` first drops work not yet started (an
        aborted run does not wait for its queue, only for the chunks already running)."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)


@contextmanager
def worker_pool(
    workers: int, preload: Sequence[str] = (), initializer: Any = None
) -> Iterator[WorkerPool]:
    """A :class:`WorkerPool`, closed on exit (queued work dropped if the block failed)."""
    pool = WorkerPool(workers, preload, initializer)
    failed = True
    try:
        yield pool
        failed = False
    finally:
        pool.close(cancel=failed)


class LazyPool:
    """A worker pool started only when a slide first needs one (resumed runs need none)."""

    def __init__(self, workers: int, preload: Sequence[str] = (), initializer: Any = None) -> None:
        self.workers = workers
        self.preload = tuple(preload)
        self.initializer = initializer
        self._pool: WorkerPool | None = None

    def get(self) -> WorkerPool | None:
        """The pool, or None when ``workers`` is 0 (work runs in this process)."""
        if self._pool is None and self.workers > 0:
            self._pool = WorkerPool(self.workers, self.preload, self.initializer)
        return self._pool

    def __enter__(self) -> LazyPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._pool is not None:
            self._pool.close(cancel=exc_type is not None)
            self._pool = None
