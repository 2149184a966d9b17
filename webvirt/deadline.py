"""A request's time: every wait a request makes takes what is left of it, and says what it
waited for when it runs out; a request still waiting past its time and a margin is ended.

A request may wait for several things in turn (libvirt twice, then the rule store); each is
bounded, but their sum would not be. The budget binds the request's own task only: work it
sets going in other tasks (a re-read, a USB pass) keeps its own bounds, whatever request
happened to start it. An explicit wait (`?wait`) adds its own time to the budget.

The last resort is a sweep, not a timer per request: a timer (asyncio.timeout) for each of
thousands of requests a second cost a quarter of the cheapest request's time.
"""

from __future__ import annotations

import asyncio
import contextvars
from contextvars import ContextVar

# A wait that would get nearly all of its own bound gets all of it: the request's first wait
# does, whose bound is the request's time (--call-timeout), so that a libvirt call that
# waited that long is taken for stuck (its connection is retired), not for out of time.
SLACK_S = 0.5
# Past its time, what a request's named waits need to answer (504 naming what they waited
# for); a request still going after this waits for something that has no bound (a bug). The
# sweep looks this often, so such a request ends within MARGIN_S + SWEEP_S of its time.
MARGIN_S = 1.5
SWEEP_S = 0.5


class Budget:
    __slots__ = ("began", "ends", "overdue", "owner", "seconds", "token")

    def __init__(self, seconds: float, began: float, owner: asyncio.Task[object] | None):
        self.seconds = seconds  # in all, as the request began (for messages)
        self.began = began  # on the loop's clock
        self.ends = began + seconds  # and later, with what an explicit wait adds
        self.owner = owner
        self.overdue = False  # cancelled by the sweep
        self.token: contextvars.Token[Budget | None] | None = None


_budget: ContextVar[Budget | None] = ContextVar("webvirt_request_budget", default=None)


class Budgets:
    """The requests under way, each with its time."""

    __slots__ = ("_loop", "_open", "seconds")

    def __init__(self, seconds: float):
        self.seconds = seconds  # --call-timeout
        self._open: set[Budget] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def begin(self) -> Budget:
        """The current task's request has its time from now."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        budget = Budget(self.seconds, loop.time(), asyncio.current_task(loop))
        budget.token = _budget.set(budget)
        self._open.add(budget)
        return budget

    def end(self, budget: Budget) -> None:
        self._open.discard(budget)
        if budget.token is not None:
            _budget.reset(budget.token)
        # Tasks the request started keep a copy of its context, this budget in it: not the
        # request's task (and its response) with it.
        budget.owner = None

    def sweep(self) -> None:
        """Cancels each request that is still waiting MARGIN_S past its time."""
        late = asyncio.get_running_loop().time() - MARGIN_S
        for budget in self._open:
            if budget.ends < late and not budget.overdue and budget.owner is not None:
                budget.overdue = True
                budget.owner.cancel()

    async def sweeping(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.sweep()


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
    if budget is not None:
        budget.ends += seconds
