"""A time limit on every test phase (set-up, call, tear-down): a hang fails fast and says where.

When a phase overruns its limit, the test fails with a dump of every thread and of every asyncio
task with the chain of awaits it is stuck in, and the task pytest-asyncio runs is cancelled: the
fixtures tear down and the run goes on. If the event loop does not take that cancel within the
grace time (a blocking call on the loop thread, or a hang outside asyncio), the dump goes to the
terminal and the run ends there, failed: a hung run must never eat the CI budget.

    --time-limit SECONDS           per phase (default: the ini option time_limit, else 120)
    @pytest.mark.time_limit(S)     a test that needs longer
    time_limit.allow(S, why)       a fixture doing slow work (building an image) asks for more
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Generator
from types import FrameType
from typing import Any

import pytest

DEFAULT_LIMIT_S = 120.0
DEFAULT_GRACE_S = 15.0
STACK_LIMIT = 30  # innermost frames per thread: below pytest's own


class Watchdog:
    """One thread that watches the phase under way."""

    def __init__(self, limit: float, grace: float, capture: Any) -> None:
        self.limit = limit
        self.grace = grace
        self._capture = capture  # pytest's capture manager: the hard stop writes past it
        self._changed = threading.Condition()
        self._phase: tuple[str, str] | None = None  # (test id, set-up / call / tear-down)
        self._deadline = 0.0
        self._armed = 0.0  # when the phase began
        self.loop: asyncio.AbstractEventLoop | None = None
        self.root: asyncio.Task[Any] | None = None  # what pytest-asyncio runs now
        self.overruns: dict[tuple[str, str], str] = {}
        threading.Thread(target=self._watch, daemon=True, name="time-limit").start()

    def arm(self, nodeid: str, when: str, seconds: float) -> None:
        with self._changed:
            self._phase = (nodeid, when)
            self._armed = time.monotonic()
            self._deadline = self._armed + seconds
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._phase = None
            self._changed.notify()

    def allow(self, seconds: float) -> None:
        """The phase under way may take `seconds` more from now."""
        with self._changed:
            if self._phase is not None:
                self._deadline = max(self._deadline, time.monotonic() + seconds)
                self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._phase is None:
                    self._changed.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                phase, allowed = self._phase, round(self._deadline - self._armed)
                self._changed.release()
                try:
                    self._overrun(phase, allowed)
                finally:
                    self._changed.acquire()

    def _overrun(self, phase: tuple[str, str], allowed: float) -> None:
        """Cancel the test on its loop; if that does not end the phase, end the run."""
        header = f"{phase[0]}: {phase[1]} took over {allowed:g} s (the time limit)"
        taken = threading.Event()
        loop = self.loop
        if loop is not None and loop.is_running():
            def on_loop() -> None:
                taken.set()
                if self._phase != phase:
                    return  # it ended meanwhile: the cancel would hit the next one's task
                self.overruns[phase] = f"{header}\n\n{dump(loop)}"
                root = self.root
                if root is not None and not root.done():
                    root.cancel(f"time limit: over {allowed:g} s")

            try:
                loop.call_soon_threadsafe(on_loop)
            except RuntimeError:  # closed meanwhile
                pass
        if taken.wait(self.grace):
            with self._changed:
                if self._changed.wait_for(lambda: self._phase != phase, self.grace):
                    return
        # The loop did not take the cancel, or the phase goes on regardless: the tasks as the
        # loop last saw them, every thread as it is now, and the run ends.
        if self._capture is not None:
            self._capture.suspend_global_capture(in_=True)
        tasks = self.overruns.get(phase, header).partition("Tasks:")[2]
        sys.stderr.write(f"\n{header}; the run stops here\n\n{dump(None)}\n"
                         + (f"Tasks, as the loop took the cancel:{tasks}\n" if tasks else ""))
        sys.stderr.flush()
        os._exit(1)


def dump(loop: asyncio.AbstractEventLoop | None) -> str:
    """Every thread's stack, and (on the loop's thread) every task's chain of awaits."""
    parts = ["Threads:"]
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        if frame is None or thread.name == "time-limit":
            continue
        stack = "".join(traceback.format_stack(frame, limit=STACK_LIMIT))
        parts.append(f"--- thread {thread.name}\n{stack}")
    if loop is not None:
        parts.append("Tasks:")
        for task in sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name()):
            parts.append(f"--- {task!r}"[:300] + "\n" + "".join(awaiting(task.get_coro())))
    return "\n".join(parts)


def awaiting(coroutine: Any) -> list[str]:
    """Where a coroutine stands, and what it awaits, down to the innermost."""
    lines = []
    while coroutine is not None:
        frame: FrameType | None = (getattr(coroutine, "cr_frame", None)
                                   or getattr(coroutine, "gi_frame", None)
                                   or getattr(coroutine, "ag_frame", None))
        if frame is not None:
            lines.append("".join(traceback.format_stack(frame, limit=1)))
        coroutine = (getattr(coroutine, "cr_await", None)
                     or getattr(coroutine, "gi_yieldfrom", None)
                     or getattr(coroutine, "ag_await", None))
    return lines


_watchdog: Watchdog | None = None


def allow(seconds: float, why: str) -> None:
    """Lets the phase under way take `seconds` more (say why: it shows in the log)."""
    print(f"time limit: {seconds:g} s more for {why}", file=sys.stderr)
    if _watchdog is not None:
        _watchdog.allow(seconds)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--time-limit", type=float, default=None, metavar="SECONDS",
                     help="fail a test phase that takes longer, with a dump of threads and tasks")
    parser.addini("time_limit", f"seconds per test phase (default {DEFAULT_LIMIT_S:g})",
                  default=str(DEFAULT_LIMIT_S))
    parser.addini("time_limit_grace", "seconds the event loop has to take a cancel before the "
                  f"run stops (default {DEFAULT_GRACE_S:g})", default=str(DEFAULT_GRACE_S))


def pytest_configure(config: pytest.Config) -> None:
    global _watchdog
    config.addinivalue_line("markers", "time_limit(seconds): this test's limit per phase")
    option = config.getoption("--time-limit")
    limit = float(config.getini("time_limit")) if option is None else option
    _watchdog = Watchdog(limit, float(config.getini("time_limit_grace")),
                         config.pluginmanager.getplugin("capturemanager"))


@pytest.fixture(scope="session", autouse=True)
async def _time_limit_loop() -> AsyncIterator[None]:
    """Notes which task pytest-asyncio runs (one made while the loop is not running)."""
    watchdog, loop = _watchdog, asyncio.get_running_loop()
    assert watchdog is not None
    watchdog.loop = loop
    factory = loop.get_task_factory()

    def make_task(loop: asyncio.AbstractEventLoop, coroutine: Any, **kwargs: Any) -> Any:
        task = (factory(loop, coroutine, **kwargs) if factory is not None
                else asyncio.Task(coroutine, loop=loop, **kwargs))
        if not loop.is_running():
            watchdog.root = task
        return task

    loop.set_task_factory(make_task)
    yield
    loop.set_task_factory(factory)


def _limit(item: pytest.Item) -> float:
    assert _watchdog is not None
    marker = item.get_closest_marker("time_limit")
    return float(marker.args[0]) if marker is not None else _watchdog.limit


def _phase(item: pytest.Item, when: str) -> Generator[None, None, None]:
    assert _watchdog is not None
    _watchdog.arm(item.nodeid, when, _limit(item))
    try:
        yield
    finally:
        _watchdog.disarm()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _phase(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _phase(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _phase(item, "teardown"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    assert _watchdog is not None
    overrun = _watchdog.overruns.pop((item.nodeid, call.when), None)
    if overrun is not None:
        report.outcome = "failed"
        report.longrepr = overrun
    return report
