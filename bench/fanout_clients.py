"""Event fan-out clients: N WebSockets in one process, each timing every lifecycle event from
the server's publish time (the libvirt callback) to its own receipt. Prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

import aiohttp


async def client(session: aiohttp.ClientSession, url: str, expected: int,
                 ready: asyncio.Event, counter: list[int], delays: list[float]) -> int:
    received = 0
    async with session.ws_connect(url, max_msg_size=0) as ws:
        await ws.receive()  # the snapshot
        counter[0] += 1
        if counter[0] == counter[1]:
            ready.set()
        async for message in ws:
            now = time.time()
            event = json.loads(message.data)
            if event["type"] == "lifecycle":
                delays.append(now - event["time"])
                received += 1
                if received == expected:
                    break
    return received


async def main(url: str, clients: int, expected: int, seconds: float) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ready = asyncio.Event()
    counter = [0, clients]
    delays: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(client(session, url, expected, ready, counter, delays))
                 for _ in range(clients)]
        await ready.wait()
        print(json.dumps({"ready": clients}), flush=True)  # the coordinator may start now
        done, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            task.cancel()
    complete = sum(1 for t in done if not t.cancelled() and t.exception() is None
                   and t.result() == expected)
    print(json.dumps({"complete_clients": complete, "delays": delays}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
