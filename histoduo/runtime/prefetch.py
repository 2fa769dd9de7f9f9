"""Work on the next item in a background thread while the current one runs.

``predict`` uses it to open the next slide, find its tissue and plan its tiles while the model
grades the current slide, so a GPU does not sit idle between slides. One thread is enough:
slide readers and numpy release the GIL, and the model's process-side work is short.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Prefetcher(Generic[K, V]):
    """``get(key)`` returns ``fn(key)``, computed ahead for the ``depth`` keys that follow.

    Keys are expected in the order given; a key out of order (or not listed) is computed on
    the spot. An exception raised by ``fn`` is raised by ``get`` for that key, not earlier, so
    a failing slide fails when its turn comes. ``depth=0`` computes everything on the spot.
    """

    def __init__(self, fn: Callable[[K], V], keys: Sequence[K], depth: int = 1) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._fn = fn
        self._keys = list(keys)
        self._position = {key: i for i, key in enumerate(self._keys)}
        self._depth = depth
        self._futures: dict[K, Future[V]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if depth else None

    def _submit_after(self, index: int) -> None:
        if self._pool is None:
            return
        for key in self._keys[index + 1 : index + 1 + self._depth]:
            if key not in self._futures:
                self._futures[key] = self._pool.submit(self._fn, key)

    def get(self, key: K) -> V:
        index = self._position.get(key)
        future = self._futures.pop(key, None)
        if index is not None:
            self._submit_after(index)  # start the next one before waiting on this one
        if future is None:
            return self._fn(key)
        return future.result()

    def close(self) -> None:
        """Drop work not started; wait for the one running (it holds a slide open)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
