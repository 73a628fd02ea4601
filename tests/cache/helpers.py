"""Small helpers of the cache tests: a look into a store, a gc running beside a test."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Self

from runflow_worker.cache.blobs import BlobStore


def partial_files(store: BlobStore) -> list[str]:
    """Names of the temporary files in the store's tmp directory."""
    return sorted(os.listdir(store.partials.directory))


class RepeatedGc:
    """Another worker's gc, run over and over on a thread while a test works beside it.

    ``collect()`` is one gc round; what it returns is gathered in ``results``. ``wait_rounds``
    lets whole rounds run (events, not sleeps); ``stop`` ends the thread and raises what it
    raised.
    """

    def __init__(self, collect: Callable[[], Iterable[str]]) -> None:
        self.results: list[str] = []
        self._collect = collect
        self._errors: list[BaseException] = []
        self._stop = threading.Event()
        self._rounds = threading.Condition()
        self._done = 0
        self._thread = threading.Thread(target=self._loop)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._errors:
            raise self._errors[0]

    def wait_rounds(self, count: int = 2, timeout_s: float = 30) -> None:
        """Return once ``count`` more rounds have run (raise if the gc failed or stalled)."""
        with self._rounds:
            target = self._done + count
            if not self._rounds.wait_for(lambda: self._done >= target or self._errors,
                                         timeout=timeout_s):
                raise AssertionError(f"the gc did not run {count} rounds in {timeout_s} s")
        if self._errors:
            raise self._errors[0]

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                found = list(self._collect())
                with self._rounds:
                    self.results.extend(found)
                    self._done += 1
                    self._rounds.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread
            with self._rounds:
                self._errors.append(exc)
                self._rounds.notify_all()
