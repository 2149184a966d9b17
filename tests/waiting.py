"""Waiting on conditions, never for a fixed time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

POLL_S = 0.02


async def until(condition: Callable[[], bool | Awaitable[bool]], seconds: float,
                what: str = "condition") -> None:
    """Until condition() is true; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {seconds:g} s")
        await asyncio.sleep(POLL_S)


def until_sync(condition: Callable[[], bool], seconds: float, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {seconds:g} s")
        time.sleep(POLL_S)


async def next_message(ws: aiohttp.ClientWebSocketResponse,
                       accept: Callable[[dict[str, Any]], bool],
                       seconds: float = 15) -> dict[str, Any]:
    """The next event-stream message that `accept` takes."""
    async with asyncio.timeout(seconds):
        while True:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            data = json.loads(message.data)
            if accept(data):
                return data


async def next_sse(response: aiohttp.ClientResponse, seconds: float = 5) -> dict[str, Any]:
    """The next Server-Sent Events message: its JSON, checked to carry its id: line."""
    async with asyncio.timeout(seconds):
        while True:
            fields: dict[str, str] = {}
            while (line := (await response.content.readline()).decode()) not in ("\n", ""):
                name, _, value = line.rstrip("\n").partition(": ")
                fields[name] = value
            if not line:
                raise EOFError("the stream ended")
            if "data" in fields:
                message: dict[str, Any] = json.loads(fields["data"])
                assert fields["id"] == message["id"]
                return message


def sse_messages(body: str) -> list[dict[str, Any]]:
    """Every message in a whole Server-Sent Events body."""
    return [json.loads(line[len("data: "):]) for line in body.splitlines()
            if line.startswith("data: ")]
