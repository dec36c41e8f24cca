"""Dead-peer detection: a silent broker is noticed within about one heartbeat
interval, and a blocked event loop is never taken for a silent broker.

The client declares the broker dead after 1.5 heartbeat intervals without a
byte from it, but first looks into the socket: bytes waiting there unread mean
that the broker spoke and this process did not listen (a handler blocked the
loop), so the connection is kept.  The broker here is a small AMQP server in a
thread of its own, which goes on sending heartbeats while the client's event
loop is blocked; one test repeats it against RabbitMQ.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import trio
from pamqp import commands
from pamqp import frame as pframe
from pamqp.base import Frame
from pamqp.heartbeat import Heartbeat

from asyncworker import ConnectionClosed
from asyncworker._transports import ConnectionParams
from asyncworker._transports.amqp.connection import connect

from .conftest import BROKER_URL


class HeartbeatServer:
    """An AMQP 0-9-1 server in a thread: the handshake, then a heartbeat every
    ``every`` seconds (none if ``every`` is None), whatever the client does.

    It answers ``connection.close`` and nothing else; enough for a connection
    that opens, idles and closes.
    """

    def __init__(self, heartbeat: int, every: float | None) -> None:
        self.heartbeat = heartbeat
        self.every = every
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._listener.settimeout(10)
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        with sock:
            frames = _Frames(sock)
            sock.settimeout(10)
            frames.read(8)  # the protocol header
            sock.sendall(_method(commands.Connection.Start(mechanisms="PLAIN", locales="en_US")))
            frames.next()  # start-ok
            sock.sendall(
                _method(commands.Connection.Tune(channel_max=16, frame_max=131072, heartbeat=5))
            )
            frames.next()  # tune-ok
            frames.next()  # open
            sock.sendall(_method(commands.Connection.OpenOk()))
            sock.settimeout(self.every or 0.1)
            while not self._stop.is_set():
                try:
                    frame = frames.next()
                except TimeoutError:
                    if self.every is not None:
                        sock.sendall(Heartbeat().marshal())
                    continue
                except OSError:
                    return
                if isinstance(frame, commands.Connection.Close):
                    sock.sendall(_method(commands.Connection.CloseOk()))
                    return

    @contextmanager
    def running(self) -> Iterator[ConnectionParams]:
        self._thread.start()
        try:
            yield ConnectionParams(port=self.port, heartbeat=self.heartbeat, connect_timeout=5)
        finally:
            self._stop.set()
            self._listener.close()
            self._thread.join(10)


def _method(method: Frame) -> bytes:
    return pframe.marshal(method, 0)


class _Frames:
    """Reads frames off a blocking socket; a timeout between reads loses nothing."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the client closed the socket")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def next(self) -> object:
        while len(self._buffer) < 7:
            self._fill()
        (size,) = struct.unpack(">I", self._buffer[3:7])
        while len(self._buffer) < 8 + size:
            self._fill()
        return pframe.unmarshal(self.read(8 + size))[2]

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the client closed the socket")
        self._buffer += chunk


async def test_a_loop_blocked_past_the_timeout_while_heartbeats_arrive_keeps_the_connection() -> (
    None
):
    server = HeartbeatServer(heartbeat=1, every=0.2)
    with server.running() as params, trio.fail_after(30):
        async with connect(params) as conn:
            assert conn.heartbeat == 1
            for _ in range(3):
                # Blocked past 1.5 and 2 intervals (this code's rule, and the
                # rule before it), while the server's heartbeats pile up.
                time.sleep(2.2)  # blocking the loop is the point
                # The heartbeater and the reader both wake now, in either order.
                await trio.sleep(0.3)
                assert conn.is_open, conn.close_reason


async def test_a_broker_silent_after_the_handshake_is_declared_dead_after_one_and_a_half_intervals() -> (  # noqa: E501
    None
):
    server = HeartbeatServer(heartbeat=1, every=None)
    with server.running() as params, trio.fail_after(30):
        async with connect(params) as conn:
            opened = trio.current_time()
            await conn.wait_closed()
            waited = trio.current_time() - opened
    reason = conn.close_reason
    assert isinstance(reason, ConnectionClosed)
    assert "missed heartbeats: nothing received from the broker for 1.5 s" in str(reason)
    assert waited >= 1.4  # never before the rule says (a busy loop can only make it later)


@pytest.mark.rabbitmq
async def test_rabbitmq_heartbeats_unread_during_a_blocked_loop_keep_the_connection() -> None:
    params = replace(ConnectionParams.from_url(BROKER_URL), heartbeat=2)
    with trio.fail_after(30):
        async with connect(params) as conn:
            assert conn.heartbeat == 2
            channel = await conn.channel()
            # Past 1.5 intervals (3 s) of silence from the broker, short of the
            # 2 intervals (4 s) after which RabbitMQ drops a silent client:
            # right after a round trip, so that this client had just spoken.
            await channel.qos(1)
            time.sleep(3.3)  # blocking the loop is the point
            await trio.sleep(0.3)
            assert conn.is_open, conn.close_reason
            await channel.qos(2)  # and it still works
