"""The trio-native AMQP client (``asyncworker._transports.amqp``) against the real broker."""

from __future__ import annotations

import datetime
import decimal
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any, cast

import pytest
import trio
import trio.testing
from pamqp import commands, constants
from pamqp import frame as pframe
from pamqp.base import Frame as PamqpMethod

from asyncworker._exceptions import (
    AuthenticationError,
    ChannelClosed,
    ConnectError,
    ConnectionClosed,
    ExchangeNotFound,
    PublishNacked,
    QueueNotFound,
    Unroutable,
)
from asyncworker._transports import ConnectionParams, Delivery, Properties
from asyncworker._transports.amqp import AMQPChannel, AMQPConnection, connect
from asyncworker._transports.amqp.channel import ChannelStatistics

from .conftest import broker_connections, close_broker_connections

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

PARAMS = ConnectionParams(host="127.0.0.1", port=5672, user="guest", password="guest")


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


def qname(prefix: str = "amqp") -> str:
    return f"aw-test-{prefix}-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def open_channel(
    queue: str | None = None,
) -> AsyncIterator[tuple[AMQPConnection, AMQPChannel]]:
    """A connection and channel; ``queue`` is declared and deleted afterwards."""
    async with connect(PARAMS) as conn:
        ch = await conn.channel()
        if queue is not None:
            await ch.queue_declare(queue)
        try:
            yield conn, ch
        finally:
            if queue is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    cleanup = ch if ch.is_open else await conn.channel()
                    await cleanup.queue_delete(queue)


async def consume_acked(
    ch: AMQPChannel, queue: str, count: int = 1, **kwargs: Any
) -> list[Delivery]:
    """Consume ``count`` deliveries from ``queue``, acking each; cancel; return them."""
    got: list[Delivery] = []
    done = trio.Event()

    def on_delivery(delivery: Delivery) -> None:
        got.append(delivery)
        ch.ack(delivery.delivery_tag)
        if len(got) == count:
            done.set()

    tag = await ch.consume(queue, on_delivery, **kwargs)
    await done.wait()
    await ch.cancel(tag)
    return got


async def test_connect_and_negotiate() -> None:
    with trio.fail_after(10):
        async with connect(PARAMS) as conn:
            # (Tuples: ``assert conn.is_open`` would narrow is_open to True for
            # mypy, and the ``not conn.is_open`` below would read as unreachable.)
            assert (conn.is_open, conn.close_reason) == (True, None)
            assert conn.frame_max == 131072
            assert conn.heartbeat == 60  # RabbitMQ offers 60, we ask 60
            ch = await conn.channel()
            assert (ch.is_open, ch.channel_id) == (True, 1)
            ch2 = await conn.channel()
            assert ch2.channel_id == 2
            await ch.close()
            assert not ch.is_open
            assert isinstance(ch.close_reason, ChannelClosed)
            # Freed channel numbers are reused.
            ch3 = await conn.channel()
            assert ch3.channel_id == 1
        assert not conn.is_open
        assert isinstance(conn.close_reason, ConnectionClosed)
        assert isinstance(ch2.close_reason, ConnectionClosed)
        with pytest.raises(ConnectionClosed):
            await conn.channel()


async def test_bad_password_is_authentication_error() -> None:
    params = replace(PARAMS, password="s3cret-wrong-pw")
    with trio.fail_after(5):
        with pytest.raises(AuthenticationError) as info:
            async with connect(params):
                pytest.fail("connected with a wrong password")
    message = str(info.value)
    assert "s3cret-wrong-pw" not in message
    assert "guest@127.0.0.1:5672" in message


async def test_missing_vhost_is_connect_error() -> None:
    vhost = f"aw-test-missing-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(5):
        with pytest.raises(ConnectError) as info:
            async with connect(replace(PARAMS, vhost=vhost)):
                pytest.fail("connected to a missing vhost")
    assert not isinstance(info.value, AuthenticationError)
    assert vhost in str(info.value)


async def test_unreachable_port_is_connect_error() -> None:
    params = replace(PARAMS, port=1, connect_timeout=3)
    with trio.fail_after(5):
        with pytest.raises(ConnectError) as info:
            async with connect(params):
                pytest.fail("connected to port 1")
    assert str(info.value).startswith("cannot connect to amqp://guest@127.0.0.1:1 vhost '/': ")
    assert "guest" not in str(info.value).replace("guest@", "")


async def test_publish_get_round_trip_with_properties() -> None:
    queue = qname()
    props = Properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"x-int": 7, "x-str": "v", "x-bool": True, "x-nested": {"a": [1, 2]}},
        delivery_mode=2,
        priority=3,
        correlation_id="corr",
        reply_to="replies",
        expiration="60000",
        message_id="mid-1",
        timestamp=datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        type="event.kind",
        user_id="guest",
        app_id="tests",
    )
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            await ch.publish(b'{"a": 1}', routing_key=queue, properties=props)
            await ch.publish(b"", routing_key=queue)  # an empty body has no body frame
            got = await ch.get(queue)
            assert got is not None
            assert got.body == b'{"a": 1}'
            assert got.routing_key == queue and got.exchange == ""
            assert got.redelivered is False
            assert got.message_count == 1
            assert got.properties == props
            ch.ack(got.delivery_tag)
            empty = await ch.get(queue, no_ack=True)
            assert empty is not None and empty.body == b""
            assert empty.properties == Properties()
            assert await ch.get(queue) is None


async def test_consume_and_ack_empties_queue() -> None:
    queue = qname()
    count = 500
    with trio.fail_after(20):
        async with open_channel(queue) as (conn, ch):
            await ch.confirm_select()

            async def publish(i: int) -> None:
                await ch.publish(str(i).encode(), routing_key=queue)

            # Concurrent confirmed publishes on one channel.
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(publish, i)
            received: list[bytes] = []
            done = trio.Event()

            def on_delivery(delivery: Delivery) -> None:
                received.append(delivery.body)
                ch.ack(delivery.delivery_tag)
                if len(received) == count:
                    done.set()

            await ch.qos(50)
            tag = await ch.consume(queue, on_delivery)
            assert tag
            await done.wait()
            await ch.cancel(tag)
            assert sorted(received, key=int) == [str(i).encode() for i in range(count)]
            # The broker handles a channel's frames in order: the acks were
            # processed before this declare.
            info = await ch.queue_declare(queue, passive=True)
            assert info.message_count == 0
            ch2 = await conn.channel()
            assert await ch2.get(queue) is None


async def test_reject_requeue_redelivers() -> None:
    queue = qname()
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            await ch.publish(b"again", routing_key=queue)
            deliveries: list[Delivery] = []
            second = trio.Event()

            def on_delivery(delivery: Delivery) -> None:
                deliveries.append(delivery)
                if len(deliveries) == 1:
                    ch.reject(delivery.delivery_tag, requeue=True)
                else:
                    ch.ack(delivery.delivery_tag)
                    second.set()

            await ch.consume(queue, on_delivery)
            await second.wait()
            assert [d.redelivered for d in deliveries] == [False, True]
            assert deliveries[1].body == b"again"


async def test_nack_without_requeue_drops() -> None:
    queue = qname()
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            await ch.publish(b"x", routing_key=queue)
            got = await ch.get(queue)
            assert got is not None
            ch.nack(got.delivery_tag, requeue=False)
            await ch.qos(1)  # a round trip: the nack was processed before it
            assert await ch.get(queue) is None


async def test_publish_with_confirms() -> None:
    queue = qname()
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            await ch.confirm_select()
            for i in range(20):
                await ch.publish(b"m%d" % i, routing_key=queue, mandatory=True)
            info = await ch.queue_declare(queue, passive=True)
            assert info.message_count == 20
            assert await ch.queue_purge(queue) == 20


async def test_mandatory_unroutable_raises() -> None:
    with trio.fail_after(10):
        async with open_channel() as (_, ch):
            await ch.confirm_select()
            with pytest.raises(Unroutable) as info:
                await ch.publish(b"lost", routing_key=qname("nowhere"), mandatory=True)
            assert info.value.reply_code == 312
            # Without mandatory, the same publish is confirmed (and dropped).
            await ch.publish(b"lost", routing_key=qname("nowhere"))
            assert ch.is_open


async def test_a_return_goes_to_the_publish_it_belongs_to() -> None:
    """Two mandatory publishes alike but for their headers, to a headers exchange.

    Only the first is routed.  Destination and body cannot tell them apart:
    the return must reach the second publish (the one the ack after it names),
    the first must be confirmed.  Many rounds: the old matching (oldest
    unconfirmed publish with the same exchange, key and body) got it wrong in
    most of them.
    """
    exchange, queue = qname("headers-x"), qname()
    with trio.fail_after(30):
        async with open_channel(queue) as (_, ch):
            await ch.exchange_declare(exchange, "headers", durable=False, auto_delete=True)
            await ch.queue_bind(queue, exchange, "", {"x-match": "all", "route": "yes"})
            await ch.confirm_select()
            rounds = 30
            for _ in range(rounds):
                outcome: dict[str, BaseException | None] = {}

                async def publish(route: str, outcome: dict[str, BaseException | None]) -> None:
                    try:
                        await ch.publish(
                            b"same body",
                            exchange=exchange,
                            routing_key="same key",
                            # Persistent, to a durable queue: the routed one is
                            # confirmed once on disk, after the other's return.
                            properties=Properties(delivery_mode=2, headers={"route": route}),
                            mandatory=True,
                        )
                        outcome[route] = None
                    except Unroutable as exc:
                        outcome[route] = exc

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish, "yes", outcome)
                    await trio.testing.wait_all_tasks_blocked()  # "yes" goes out first
                    nursery.start_soon(publish, "no", outcome)
                assert outcome["yes"] is None
                assert isinstance(outcome["no"], Unroutable)
            assert await ch.queue_purge(queue) == rounds


async def test_publish_to_missing_exchange_closes_channel() -> None:
    with trio.fail_after(10):
        async with open_channel() as (conn, ch):
            await ch.confirm_select()
            with pytest.raises(ExchangeNotFound) as info:
                await ch.publish(b"x", exchange=qname("no-exchange"), routing_key="k")
            assert info.value.reply_code == 404
            assert not ch.is_open
            assert isinstance(ch.close_reason, ExchangeNotFound)
            await ch.wait_closed()
            with pytest.raises(ChannelClosed):
                ch.ack(1)
            # The connection survives a channel error.
            assert conn.is_open
            other = await conn.channel()
            await other.queue_declare(qname(), exclusive=True, durable=False)

            # Without confirms, publish returns; the next RPC sees the close.
            ch2 = await conn.channel()
            await ch2.publish(b"x", exchange=qname("no-exchange"), routing_key="k")
            # The broker names basic.publish as the method that failed, even
            # when the close arrives during the queue.declare that follows.
            with pytest.raises(ExchangeNotFound):
                await ch2.queue_declare(qname(), exclusive=True, durable=False)


async def test_consume_missing_queue_raises_queue_not_found() -> None:
    with trio.fail_after(10):
        async with open_channel() as (_, ch):
            with pytest.raises(QueueNotFound):
                await ch.consume(qname("missing"), lambda d: None)
            assert not ch.is_open
            with pytest.raises(QueueNotFound):
                await ch.qos(1)


async def test_large_body_round_trip() -> None:
    queue = qname()
    body = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    with trio.fail_after(30):
        async with open_channel(queue) as (conn, ch):
            await ch.confirm_select()
            await ch.publish(body, routing_key=queue)
            got = await consume_acked(ch, queue)
            assert len(got[0].body) == len(body)
            assert got[0].body == body
            # The same through basic.get.
            await ch.publish(body[:300_000], routing_key=queue)
            ch2 = await conn.channel()
            fetched = await ch2.get(queue, no_ack=True)
            assert fetched is not None and fetched.body == body[:300_000]


async def test_broker_closes_connection() -> None:
    name = f"aw-test-close-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        async with connect(replace(PARAMS, client_name=name)) as conn:
            ch = await conn.channel()
            await trio.to_thread.run_sync(close_broker_connections, name)
            await conn.wait_closed()
            await ch.wait_closed()
            assert not conn.is_open
            reason = conn.close_reason
            assert isinstance(reason, ConnectionClosed)
            assert reason.reply_code == 320
            assert "closed by test" in reason.reply_text
            assert isinstance(ch.close_reason, ConnectionClosed)
            with pytest.raises(ConnectionClosed):
                await ch.queue_declare(qname())
            with pytest.raises(ConnectionClosed):
                ch.ack(1)


async def test_server_side_queue_delete_cancels_consumer() -> None:
    queue = qname()
    with trio.fail_after(10):
        async with open_channel(queue) as (conn, ch):
            cancelled: list[str] = []
            done = trio.Event()

            def on_cancel(tag: str) -> None:
                cancelled.append(tag)
                done.set()

            tag = await ch.consume(queue, lambda d: None, on_cancel)
            other = await conn.channel()
            await other.queue_delete(queue)
            await done.wait()
            assert cancelled == [tag]
            assert ch.is_open
            await ch.queue_declare(queue)  # the channel still works


async def test_caller_exception_is_not_wrapped() -> None:
    with trio.fail_after(10):
        with pytest.raises(KeyError):
            async with connect(PARAMS) as conn:
                await conn.channel()
                raise KeyError("boom")


async def test_heartbeats_keep_an_idle_connection_alive() -> None:
    with trio.fail_after(15):
        async with connect(replace(PARAMS, heartbeat=1)) as conn:
            assert conn.heartbeat == 1
            ch = await conn.channel()
            # Idle for longer than the broker tolerates without heartbeats
            # (two missed intervals): the point of the test is this silence.
            await trio.sleep(3.5)
            assert conn.is_open
            await ch.queue_declare(qname(), exclusive=True, durable=False)


async def test_missed_heartbeats_close_the_connection() -> None:
    """A proxy that stops forwarding the broker's bytes: the client must give
    up after 1.5 heartbeat intervals of silence, and leaving the context must
    not hang.

    How long it waited is counted in its own heartbeats, not timed: the proxy
    sees every heartbeat the client sends after the last byte it passed on to
    it.  The client, the proxy and the test share one trio thread, so a busy
    machine delays them all alike and cannot change that count."""
    stall = trio.Event()
    # What the proxy passed on, in order: "broker" for bytes to the client,
    # "heartbeat" for each heartbeat frame from the client.
    seen: list[str] = []

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, to_client: bool) -> None:
        frames = bytearray()
        try:
            while True:
                if to_client and stall.is_set():
                    await trio.sleep_forever()
                data = await src.receive_some(65536)
                if not data:
                    return
                if to_client:
                    seen.append("broker")
                else:
                    frames += data
                    seen.extend(client_frames(frames))
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(20):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def serve_one() -> None:
            client = await listeners[0].accept()
            upstream = await trio.open_tcp_stream("127.0.0.1", 5672)
            async with client, upstream, trio.open_nursery() as n:
                n.start_soon(pump, client, upstream, False)
                n.start_soon(pump, upstream, client, True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            params = replace(PARAMS, port=port, heartbeat=1)
            async with connect(params) as conn:
                ch = await conn.channel()
                stall.set()
                await conn.wait_closed()
                reason = conn.close_reason
                assert isinstance(reason, ConnectionClosed)
                assert "nothing received from the broker for 1.5 s" in str(reason)
                assert isinstance(ch.close_reason, ConnectionClosed)
            nursery.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
    silence = seen[len(seen) - seen[::-1].index("broker") :]
    # The client sends a heartbeat every half interval and gives up after 1.5
    # intervals of silence: it kept sending into the silence (it waited), and
    # gave up within those 3 ticks (4 if one falls on the edge of the silence).
    assert 1 <= silence.count("heartbeat") <= 4, seen


def client_frames(buffer: bytearray) -> list[str]:
    """Take the complete frames off ``buffer`` (what a client sent): "heartbeat"
    for each heartbeat frame, "other" for anything else (the protocol header first)."""
    found: list[str] = []
    while True:
        if buffer.startswith(b"AMQP"):
            if len(buffer) < 8:
                return found
            del buffer[:8]
            found.append("other")
            continue
        if len(buffer) < 7:
            return found
        end = 7 + int.from_bytes(buffer[3:7], "big") + 1
        if len(buffer) < end:
            return found
        found.append("heartbeat" if buffer[0] == constants.FRAME_HEARTBEAT else "other")
        del buffer[:end]


async def test_bodies_split_at_frame_max_boundaries() -> None:
    queue = qname()
    with trio.fail_after(20):
        async with open_channel(queue) as (conn, ch):
            await ch.confirm_select()
            payload = conn.frame_max - 8  # the most a body frame carries
            for size in (payload - 1, payload, payload + 1, 2 * payload, 2 * payload + 1):
                body = bytes(i % 251 for i in range(size))
                await ch.publish(body, routing_key=queue)
                got = await ch.get(queue, no_ack=True)
                assert got is not None and got.body == body, size
            assert conn.is_open


async def test_properties_larger_than_a_frame_raise_and_the_connection_survives() -> None:
    queue = qname()
    with trio.fail_after(10):
        async with open_channel(queue) as (conn, ch):
            await ch.confirm_select()
            big = Properties(headers={"trace": "x" * conn.frame_max})
            with pytest.raises(ValueError, match="frame_max"):
                await ch.publish(b"x", routing_key=queue, properties=big)
            # Neither the connection nor the confirm sequence suffered.
            await ch.publish(b"next", routing_key=queue)
            got = await ch.get(queue, no_ack=True)
            assert got is not None and got.body == b"next"
            assert conn.is_open


async def test_header_values_of_every_type_survive_the_broker() -> None:
    queue = qname()
    headers = {
        "neg-decimal": decimal.Decimal("-12.345"),
        "tiny-decimal": decimal.Decimal("1E-7"),
        "neg-small": -1,
        "big": -(2**40),
        "double": 0.1,
        "bytes": b"\x00\xff",
        "none": None,
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "nested": {"list": [1, "a", {"deep": [True, decimal.Decimal("-0.5")]}]},
    }
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            await ch.confirm_select()
            await ch.publish(b"x", routing_key=queue, properties=Properties(headers=headers))
            got = await ch.get(queue, no_ack=True)
            assert got is not None
            assert got.properties.headers == headers


# -- arguments of consume / queue.declare / queue.bind / exchange.declare


class _Recorder:
    """Stands in for an AMQPConnection: records the frames a channel sends."""

    frame_max = 131072

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def check_open(self) -> None:
        pass

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)


async def _sent_frames(call: Callable[[AMQPChannel], Awaitable[object]]) -> list[bytes]:
    """The frames ``call`` sends on a channel (no broker: its reply never comes)."""
    recorder = _Recorder()
    ch = AMQPChannel(cast(AMQPConnection, recorder), 3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, ch)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return recorder.frames


# Values that pamqp encodes exactly as we do (pamqp packs small ints and
# floats differently, but the broker reads both), and keys in sorted order
# (pamqp sorts them; we keep the caller's order).
_PLAIN_ARGS: dict[str, Any] = {"big": 2**40, "flag": True, "nested": {"a": "b"}, "x-kind": "k"}


def _noop(delivery: Delivery) -> None:
    pass


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda ch: ch.queue_declare("q1", durable=True, exclusive=True, arguments=_PLAIN_ARGS),
            commands.Queue.Declare(queue="q1", durable=True, exclusive=True, arguments=_PLAIN_ARGS),
        ),
        (
            lambda ch: ch.queue_declare("q2", passive=True, durable=False, auto_delete=True),
            commands.Queue.Declare(queue="q2", passive=True, auto_delete=True),
        ),
        (
            lambda ch: ch.consume(
                "q1", _noop, consumer_tag="t1", exclusive=True, arguments=_PLAIN_ARGS
            ),
            commands.Basic.Consume(
                queue="q1", consumer_tag="t1", exclusive=True, arguments=_PLAIN_ARGS
            ),
        ),
        (
            lambda ch: ch.queue_bind("q1", "ex", "rk", _PLAIN_ARGS),
            commands.Queue.Bind(queue="q1", exchange="ex", routing_key="rk", arguments=_PLAIN_ARGS),
        ),
        (
            lambda ch: ch.exchange_declare(
                "ex", "headers", durable=True, auto_delete=True, arguments=_PLAIN_ARGS
            ),
            commands.Exchange.Declare(
                exchange="ex",
                exchange_type="headers",
                durable=True,
                auto_delete=True,
                arguments=_PLAIN_ARGS,
            ),
        ),
        (
            lambda ch: ch.exchange_declare("ex", passive=True, durable=False),
            commands.Exchange.Declare(exchange="ex", passive=True),
        ),
    ],
    ids=[
        "queue.declare",
        "queue.declare-flags",
        "consume",
        "queue.bind",
        "exchange.declare",
        "exchange.declare-passive",
    ],
)
async def test_argument_methods_are_encoded_as_pamqp_does(
    call: Callable[[AMQPChannel], Awaitable[object]], expected: PamqpMethod
) -> None:
    with trio.fail_after(5):
        assert await _sent_frames(call) == [pframe.marshal(expected, 3)]


async def test_argument_tables_decode_to_what_was_given() -> None:
    # The values pamqp 3.3 cannot encode: pamqp's decoder reads ours back.
    arguments = {"x-priority": -1, "small": -128, "ratio": 0.1, "raw": b"\x00\xff"}
    with trio.fail_after(5):
        (frame,) = await _sent_frames(
            lambda ch: ch.consume("q1", _noop, consumer_tag="t1", arguments=arguments)
        )
    size, channel_id, method = pframe.unmarshal(frame)
    assert size == len(frame) and channel_id == 3
    assert isinstance(method, commands.Basic.Consume)
    assert (method.queue, method.consumer_tag, method.exclusive) == ("q1", "t1", False)
    assert method.arguments == arguments


async def test_bad_arguments_raise_before_anything_is_sent() -> None:
    recorder = _Recorder()
    ch = AMQPChannel(cast(AMQPConnection, recorder), 3)
    bad: dict[str, Any] = {"fine": 1, "bad-key": object()}
    with trio.fail_after(5):
        with pytest.raises(TypeError, match="'bad-key'"):
            await ch.queue_declare("q", arguments=bad)
        with pytest.raises(TypeError, match="'bad-key'"):
            await ch.consume("q", _noop, consumer_tag="t1", arguments=bad)
        with pytest.raises(TypeError, match="'bad-key'"):
            await ch.queue_bind("q", "ex", arguments=bad)
        with pytest.raises(TypeError, match="'bad-key'"):
            await ch.exchange_declare("ex", arguments=bad)
        with pytest.raises(ValueError, match="frame_max"):
            await ch.queue_declare("q", arguments={"huge": "x" * recorder.frame_max})
    assert recorder.frames == []
    assert ch.is_open
    assert ch.statistics() == ChannelStatistics(consumers=0, requests_waiting=0, unconfirmed=0)


async def test_consume_with_a_negative_priority() -> None:
    queue = qname("prio")
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            await ch.confirm_select()
            await ch.publish(b"hello", routing_key=queue)
            got = await consume_acked(ch, queue, arguments={"x-priority": -1})
            assert [d.body for d in got] == [b"hello"]


async def test_queue_declare_arguments_are_applied_and_checked() -> None:
    queue = qname("args")
    arguments = {"x-max-priority": 10, "x-message-ttl": 60000}
    with trio.fail_after(10):
        async with open_channel() as (conn, ch):
            try:
                await ch.queue_declare(queue, arguments=arguments)
                # The same arguments again: accepted.
                info = await ch.queue_declare(queue, arguments=dict(arguments))
                assert info.name == queue
                # x-max-priority took effect: the higher priority comes first.
                await ch.confirm_select()
                await ch.publish(b"low", routing_key=queue, properties=Properties(priority=1))
                await ch.publish(b"high", routing_key=queue, properties=Properties(priority=9))
                first = await ch.get(queue, no_ack=True)
                assert first is not None and first.body == b"high"
                # A different value: the broker refuses it and closes the channel.
                with pytest.raises(ChannelClosed) as info_406:
                    await ch.queue_declare(
                        queue, arguments={"x-max-priority": 10, "x-message-ttl": 30000}
                    )
                assert info_406.value.reply_code == 406
                assert "x-message-ttl" in info_406.value.reply_text
                assert not ch.is_open and conn.is_open
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    cleanup = await conn.channel()
                    await cleanup.queue_delete(queue)


async def test_headers_exchange_binding_arguments_route() -> None:
    queue, exchange = qname("hdr-q"), qname("hdr-x")
    # -5 and 0.1 are what pamqp 3.3 could not send (struct.error, 32-bit float):
    # the broker compares them with the message's headers.
    binding = {"x-match": "all", "n": -5, "f": 1.5, "r": 0.1}
    with trio.fail_after(10):
        async with open_channel(queue) as (conn, ch):
            try:
                exchange_args = {"x-note": -2, "x-ratio": 0.25}
                await ch.exchange_declare(
                    exchange, "headers", durable=False, arguments=exchange_args
                )
                await ch.exchange_declare(
                    exchange, "headers", durable=False, arguments=exchange_args
                )
                await ch.queue_bind(queue, exchange, arguments=binding)
                await ch.confirm_select()
                headers: dict[str, Any] = {"n": -5, "f": 1.5, "r": 0.1, "other": "x"}
                await ch.publish(
                    b"match",
                    exchange=exchange,
                    properties=Properties(headers=headers),
                    mandatory=True,
                )
                with pytest.raises(Unroutable):
                    await ch.publish(
                        b"no-match",
                        exchange=exchange,
                        properties=Properties(headers={**headers, "n": -4}),
                        mandatory=True,
                    )
                got = await ch.get(queue, no_ack=True)
                assert got is not None and got.body == b"match"
                assert await ch.get(queue) is None
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    cleanup = ch if ch.is_open else await conn.channel()
                    await cleanup.exchange_delete(exchange)


async def test_a_bad_argument_raises_type_error_and_the_channel_survives() -> None:
    queue = qname("bad-arg")
    bad: dict[str, Any] = {"x-ok": 1, "x-bad": object()}
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            with pytest.raises(TypeError, match="'x-bad'"):
                await ch.queue_declare(queue, arguments=bad)
            with pytest.raises(TypeError, match="'x-bad'"):
                await ch.consume(queue, _noop, arguments=bad)
            with pytest.raises(TypeError, match="'x-bad'"):
                await ch.queue_bind(queue, "amq.headers", arguments=bad)
            with pytest.raises(TypeError, match="'x-bad'"):
                await ch.exchange_declare(qname("bad-x"), arguments=bad)
            assert ch.is_open
            # The channel still works, consume included.
            await ch.confirm_select()
            await ch.publish(b"after", routing_key=queue)
            got = await consume_acked(ch, queue, arguments={"x-priority": 0})
            assert [d.body for d in got] == [b"after"]
            info = await ch.queue_declare(queue, passive=True)
            assert info.message_count == 0


async def test_confirms_stay_matched_after_nacks() -> None:
    queue = qname()
    with trio.fail_after(10):
        async with open_channel() as (_, ch):
            await ch.queue_declare(
                queue,
                durable=False,
                exclusive=True,
                arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
            )
            await ch.confirm_select()
            outcomes = []
            for i in range(4):
                try:
                    await ch.publish(b"m%d" % i, routing_key=queue)
                    outcomes.append("ack")
                except PublishNacked:
                    outcomes.append("nack")
            assert await ch.queue_purge(queue) == 1
            await ch.publish(b"after", routing_key=queue)
            outcomes.append("ack")
            assert outcomes == ["ack", "nack", "nack", "nack", "ack"]
            got = await ch.get(queue, no_ack=True)
            assert got is not None and got.body == b"after"


async def test_reply_to_a_cancelled_request_does_not_reach_the_next_one() -> None:
    queue, other = qname(), qname()
    with trio.fail_after(10):
        async with open_channel(queue) as (_, ch):
            await ch.queue_declare(other, durable=False, exclusive=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(ch.queue_declare, other, passive=True))
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()  # its declare-ok is still on the way
            info = await ch.queue_declare(queue, passive=True)
            assert info.name == queue
            assert await ch.queue_purge(queue) == 0


async def test_unencodable_password_never_appears_in_the_error() -> None:
    # os.environ yields such strings (surrogate escapes) for non-UTF-8 bytes.
    params = replace(PARAMS, password="s3cret\udcff-pw")
    with trio.fail_after(5):
        with pytest.raises(AuthenticationError) as info:
            async with connect(params):
                pytest.fail("connected with an unencodable password")
    text = "".join(traceback.format_exception(info.value))
    assert "s3cret" not in text
    assert "not valid UTF-8" in str(info.value)


@pytest.mark.parametrize("direct_fd", [True, False], ids=["socket-fd", "trio-stream"])
async def test_both_io_paths_consume_and_ack(
    direct_fd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Plain TCP reads and writes the socket's fd directly; TLS goes through the
    # trio stream.  No TLS broker here, so force the stream path on TCP.
    if not direct_fd:
        original = AMQPConnection.__init__

        def stream_only(self: AMQPConnection, *args: object, **kwargs: object) -> None:
            original(self, *args, **kwargs)  # type: ignore[arg-type]
            self.fd = -1

        monkeypatch.setattr(AMQPConnection, "__init__", stream_only)
    queue = qname("io-path")
    big = bytes(range(256)) * 4096  # 1 MiB: many frames, many reads
    with trio.fail_after(30):
        async with open_channel(queue) as (conn, ch):
            assert (conn.fd >= 0) is direct_fd
            await ch.confirm_select()
            for i in range(50):
                await ch.publish(b"%d" % i, routing_key=queue)
            await ch.publish(big, routing_key=queue)
            received: list[bytes] = []
            done = trio.Event()

            def on_delivery(delivery: Delivery) -> None:
                received.append(delivery.body)
                ch.ack(delivery.delivery_tag)  # inline or through the writer
                if len(received) == 51:
                    done.set()

            await ch.qos(10)
            await ch.consume(queue, on_delivery)
            await done.wait()
            assert received[:50] == [b"%d" % i for i in range(50)] and received[50] == big
            info = await ch.queue_declare(queue, passive=True)
            assert info.message_count == 0


# -- a channel.open given up half-way


async def broker_channel_count(name: str) -> int:
    """How many channels the broker has open on the connection named ``name``."""
    listing = await trio.to_thread.run_sync(broker_connections, "channels")
    counts = [int(channels) for named, (channels,) in listing if named == name]
    assert len(counts) == 1, listing
    return counts[0]


async def test_a_channel_open_cancelled_before_open_ok_leaves_nothing_open() -> None:
    name = qname("abandon")
    async with connect(replace(PARAMS, client_name=name)) as conn:
        kept = await conn.channel()
        cancelled_in_flight = 0
        for _ in range(20):
            opened: list[AMQPChannel] = []
            entered: list[bool] = []
            async with trio.open_nursery() as nursery:

                async def open_one() -> None:
                    # channel() sends channel.open before its first wait: in
                    # the same step as this append.
                    entered.append(True)  # noqa: B023
                    opened.append(await conn.channel())  # noqa: B023

                nursery.start_soon(open_one)
                # Cancel as soon as channel.open is written: the broker's open-ok
                # is a round trip away.  (Waiting for every task to block let
                # the open-ok win the race all 20 times in about one run in five.)
                while not entered or conn.out:
                    await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
            if opened:
                await opened[0].close()  # open-ok won the race: try again
            else:
                cancelled_in_flight += 1
        assert cancelled_in_flight, "open-ok always arrived before the cancellation"
        # Each abandoned channel is closed as soon as the broker opened it,
        # and its number is free again.
        await wait_for_condition(lambda: conn.statistics().channels == (kept.channel_id,))
        assert await broker_channel_count(name) == 1
        again = await conn.channel()
        assert again.channel_id == kept.channel_id + 1
        assert kept.is_open and again.is_open


async def wait_for_condition(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
