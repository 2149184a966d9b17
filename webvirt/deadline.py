"""A request's time: every wait a request makes takes what is left of it, and says what it
waited for when it runs out.

A request may wait for several things in turn (libvirt twice, then the rule store); each is
bounded, but their sum would not be. The budget binds the request's own task only: work it
sets going in other tasks (a re-read, a USB pass) keeps its own bounds, whatever request
happened to start it. An explicit wait (`?wait`) adds its own time to the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import cast


@dataclass(slots=True)
class Budget:
    seconds: float  # in all, as the request began (for messages)
    ends: float  # on the event loop's clock
    owner: asyncio.Task[object] | None
    timeout: asyncio.Timeout | None = None  # the request's last resort (middlewares.py)
    margin: float = 0.0


# A wait that would get nearly all of its own bound gets all of it: the request's first wait
# does, whose bound is the request's time (--call-timeout), so that a libvirt call that
# waited that long is taken for stuck (its connection is retired), not for out of time.
SLACK_S = 0.5

_budget: ContextVar[Budget | None] = ContextVar("webvirt_request_budget", default=None)


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[Budget]:
    """The current task's request may take `seconds` from now."""
    token = _budget.set(Budget(seconds, asyncio.get_running_loop().time() + seconds,
                               asyncio.current_task()))
    try:
        yield cast(Budget, _budget.get())
    finally:
        _budget.reset(token)


def _current() -> Budget | None:
    budget = _budget.get()
    if budget is None or budget.owner is not asyncio.current_task():
        return None
    return budget


def within(seconds: float | None) -> tuple[float | None, Budget | None]:
    """How long a wait of up to `seconds` (None: no bound of its own) may take in this
    request, and the request's budget when that is what bounds it."""
    budget = _current()
    if budget is None:
        return seconds, None
    left = max(0.0, budget.ends - asyncio.get_running_loop().time())
    if seconds is not None and left >= seconds - SLACK_S:
        return seconds, None
    return left, budget


def extend(seconds: float) -> None:
    """An explicit wait of `seconds` (shutdown?wait, reboot?wait) is added to the budget."""
    budget = _current()
    if budget is None:
        return
    budget.ends += seconds
    if budget.timeout is not None:
        budget.timeout.reschedule(budget.ends + budget.margin)
