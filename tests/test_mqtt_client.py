"""webvirt's MQTT client (webvirt/mqtt_client.py) on a real mosquitto: a socket watch that
aiomqtt asked for as its socket closed never lands on another file that took the number."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from tests.mosquitto import Broker
from webvirt.mqtt_client import Client


async def test_a_watch_asked_for_as_the_broker_goes_never_lands_on_another_file(
        tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    loop = asyncio.get_running_loop()
    client = Client("127.0.0.1", broker.port)
    await client.__aenter__()
    paho = client._client  # aiomqtt's paho client: what the loop's callbacks drive
    sock = paho.socket()
    assert sock is not None
    number = sock.fileno()
    # Made first, so that none of them takes the number itself.
    other, peer = socket.socketpair()
    reader, writer = socket.socketpair()
    try:
        broker.stop()  # its end is closed; the loop has not read that yet
        # In one turn of the loop, as the bridge does it: a publish asks for a write watch
        # (aiomqtt adds it later), then the read finds the end (paho closes the socket).
        paho.publish("webvirt/test", b"x")
        paho.loop_read()
        assert paho.socket() is None
        # Another file takes the number, and the loop runs the calls aiomqtt asked for.
        os.dup2(other.fileno(), number)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # Its owner closes it, knowing nothing of asyncio; the next socket on the number must
        # be one the loop can watch and read.
        os.close(number)
        os.dup2(reader.fileno(), number)
        readable = asyncio.Event()
        loop.add_reader(number, readable.set)  # FileNotFoundError: a watch outlived its file
        try:
            writer.send(b"!")
            async with asyncio.timeout(5):
                await readable.wait()
        finally:
            loop.remove_reader(number)
        os.close(number)
    finally:
        for end in (other, peer, reader, writer):
            end.close()
        await client.__aexit__(None, None, None)
