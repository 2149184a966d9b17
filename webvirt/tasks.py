"""Ending tasks one way, so that ending one never swallows a cancel of the caller."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def arrives(future: asyncio.Future[None], seconds: float) -> bool:
    """Whether the future completes within `seconds` (it is cancelled if not)."""
    try:
        async with asyncio.timeout(seconds):
            await future
        return True
    except TimeoutError:
        return False


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancels the tasks and waits until each has ended. An error one ends with instead is
    logged, not raised: the caller asked for it to stop, not for its outcome.

    `with suppress(CancelledError): await task` also swallowed a cancel of the caller that
    came meanwhile: the MQTT bridge's reconnect loop, cancelled while it wound up a lost
    connection, went on for ever, and an asyncio.timeout around a shutdown never fired."""
    ending = [task for task in tasks if task is not None]
    for task in ending:
        task.cancel()
    if ending:
        await asyncio.wait(ending)  # a cancel of the caller is raised here, as it should be
    for task in ending:
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with an error as it was stopped", task.get_name(),
                        exc_info=task.exception())
