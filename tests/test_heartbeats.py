"""Dead-peer detection: a silent broker is noticed within about one heartbeat
interval, and a blocked event loop is never taken for a silent broker.

The client declares the broker dead after 1.5 heartbeat intervals without a
byte from it, but first looks into the socket: bytes waiting there unread mean
that the broker spoke and this process did not listen (a handler blocked the
loop), so the connection is kept.  The broker here is the suite's fake AMQP
server (``fakeamqp``), whose thread goes on sending heartbeats while the
client's event loop is blocked; one test repeats it against RabbitMQ.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import trio
from pamqp import commands, constants
from pamqp import frame as pframe
from pamqp.heartbeat import Heartbeat

from asyncworker import ConnectionClosed
from asyncworker._transports import ConnectionParams
from asyncworker._transports.amqp.connection import connect

from .conftest import BROKER_URL
from .fakeamqp import FakeAMQPServer, Peer


def heartbeating(every: float | None, *, beats: list[int] | None = None) -> Callable[[Peer], None]:
    """A fake broker's script: the handshake, then a heartbeat every ``every``
    seconds (never if None), in its own thread whatever the client's loop does;
    it answers ``connection.close`` and nothing else.  Each heartbeat the client
    sends after the handshake appends to ``beats``, if given."""

    def script(peer: Peer) -> None:
        peer.open_connection(heartbeat=5)
        peer.sock.settimeout(every)
        while True:
            try:
                read = peer.read_frame()
            except TimeoutError:
                peer.send(Heartbeat().marshal())
                continue
            if read is None:
                return
            if read[0] == constants.FRAME_HEARTBEAT and beats is not None:
                beats.append(len(beats) + 1)
            if isinstance(pframe.unmarshal(read[2])[2], commands.Connection.Close):
                peer.send_method(0, commands.Connection.CloseOk())
                return

    return script


async def test_a_loop_blocked_past_the_timeout_while_heartbeats_arrive_keeps_the_connection() -> (
    None
):
    with FakeAMQPServer(heartbeating(every=0.2)) as server, trio.fail_after(30):
        async with connect(fake(server)) as conn:
            assert conn.heartbeat == 1
            for _ in range(3):
                # Blocked past 1.5 and 2 intervals (this code's rule, and the
                # rule before it), while the server's heartbeats pile up.
                time.sleep(2.2)  # blocking the loop is the point
                # The heartbeater and the reader both wake now, in either order.
                await trio.sleep(0.3)
                assert conn.is_open, conn.close_reason
    assert not server.errors


async def test_a_broker_silent_after_the_handshake_is_declared_dead_after_one_and_a_half_intervals() -> (  # noqa: E501
    None
):
    beats: list[int] = []
    with FakeAMQPServer(heartbeating(every=None, beats=beats)) as server, trio.fail_after(30):
        async with connect(fake(server)) as conn:
            await conn.wait_closed()
    reason = conn.close_reason
    assert isinstance(reason, ConnectionClosed)
    assert "missed heartbeats: nothing received from the broker for 1.5 s" in str(reason)
    # How long it waited, counted in its own heartbeats (one every half interval,
    # whatever the machine's load) rather than timed: it sent some into the
    # silence, so it did not give up at once, and gave up after 1.5 intervals,
    # 3 ticks (4 if one falls on the edge).
    assert 1 <= len(beats) <= 4, beats


def fake(server: FakeAMQPServer) -> ConnectionParams:
    return ConnectionParams.from_url(server.url, heartbeat=1, connect_timeout=5)


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
