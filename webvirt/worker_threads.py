"""A small pool of daemon threads for blocking libvirt calls.

Like concurrent.futures.ThreadPoolExecutor, except that its threads are daemon threads: the
standard pool joins its threads when the interpreter exits, so one call stuck on a frozen
libvirt daemon would keep webvirt from ever exiting on Ctrl-C.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
_Work = tuple[Future[Any], Callable[[], Any]]


class DaemonThreadPool:
    def __init__(self, max_workers: int, name_prefix: str):
        self._max_workers = max_workers
        self._name_prefix = name_prefix
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by each thread that waits for work
        self._threads: list[threading.Thread] = []
        self._shut_down = False

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        if self._shut_down:
            raise RuntimeError("the libvirt thread pool is shut down")
        future: Future[T] = Future()
        self._work.put((future, fn))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
            thread = threading.Thread(target=self._run, daemon=True,
                                      name=f"{self._name_prefix}-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()
        return future

    def shutdown(self) -> None:
        """Idle threads end; busy ones end when their call returns. Nothing waits for them."""
        self._shut_down = True
        for _ in self._threads:
            self._work.put(None)

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn = work
            del work  # hold no libvirt object longer than the call
            if future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:  # the caller gets it, whatever it is
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn
            self._idle.release()
