"""The AMQP client's frame parser and content codec, without a broker.

The byte streams here are built with pamqp's encoder (an implementation
independent of ours) or by hand, byte for byte, and fed to the client's
reader through a scripted stream, so every read boundary can be tried.  The
channels and consumers are opened through the client's API, the stream
answering each request as the broker would.
"""

from __future__ import annotations

import datetime
import decimal
import itertools
import random
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest
import trio
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat

from asyncworker._transports import ConnectionParams, Delivery, Properties
from asyncworker._transports.amqp.channel import AMQPChannel
from asyncworker._transports.amqp.codec import decode_properties, encode_properties
from asyncworker._transports.amqp.connection import AMQPConnection
from asyncworker._transports.amqp.handshake import Tuned

pytestmark = pytest.mark.anyio


T = TypeVar("T")

#: What the reader tests' connections negotiated (they skip the handshake).
TUNED = Tuned(frame_max=131072, channel_max=2047, heartbeat=0, leftover=b"")


class ChunkStream(trio.abc.Stream):
    """The broker's side, scripted: ``feed()`` queues chunks for the reader,
    ``end()`` is EOF once they are read; writes are recorded."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.sent: list[bytes] = []
        self.ended = False
        self._more = trio.Event()

    def feed(self, *chunks: bytes) -> None:
        self.chunks.extend(chunks)
        self._more.set()

    def end(self) -> None:
        self.ended = True
        self._more.set()

    async def answer(
        self, conn: AMQPConnection, requests: Sequence[Awaitable[T]], replies: list[bytes]
    ) -> list[T]:
        """Run ``requests`` until each has sent its frame, feed ``replies``, return the results.

        (A reply must not be read before its request's waiter is queued.)
        """
        results: dict[int, T] = {}

        async def run(index: int, request: Awaitable[T]) -> None:
            results[index] = await request

        sent = len(conn.out)
        async with trio.open_nursery() as nursery:
            for index, request in enumerate(requests):
                nursery.start_soon(run, index, request)
            while len(conn.out) < sent + len(requests):
                await trio.lowlevel.checkpoint()
            self.feed(*replies)
        return [results[index] for index in range(len(requests))]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        while not self.chunks and not self.ended:
            self._more = trio.Event()
            await self._more.wait()
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if max_bytes is not None and len(chunk) > max_bytes:
            self.chunks.insert(0, chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _deliver(channel: int, tag: int, body: bytes, props: Any, frame_size: int) -> bytes:
    """basic.deliver + content header + body frames of at most ``frame_size`` bytes."""
    parts = [
        pframe.marshal(
            commands.Basic.Deliver(
                consumer_tag=f"ctag-{channel}",
                delivery_tag=tag,
                redelivered=tag % 2 == 0,
                exchange="ex",
                routing_key=f"rk.{tag}",
            ),
            channel,
        ),
        pframe.marshal(pheader.ContentHeader(0, len(body), props), channel),
    ]
    for offset in range(0, len(body), frame_size):
        parts.append(pframe.marshal(pbody.ContentBody(body[offset : offset + frame_size]), channel))
    return b"".join(parts)


def _recorded_stream() -> tuple[bytes, list[tuple[int, int, bytes, Properties]]]:
    """Deliveries on two channels (single-frame, multi-frame, empty bodies, with
    and without properties), heartbeats, a get-ok and a channel-0 method."""
    heartbeat = pframe.marshal(pheartbeat.Heartbeat(), 0)
    full = commands.Basic.Properties(
        content_type="application/json",
        headers={"x-int": 7, "x-str": "v", "x-list": [1, "a"], "x-nested": {"b": True}},
        delivery_mode=2,
        priority=4,
        correlation_id="c",
        message_id="m",
        timestamp=datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        app_id="app",
    )
    full_ours = Properties(
        content_type="application/json",
        headers={"x-int": 7, "x-str": "v", "x-list": [1, "a"], "x-nested": {"b": True}},
        delivery_mode=2,
        priority=4,
        correlation_id="c",
        message_id="m",
        timestamp=datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        app_id="app",
    )
    persistent = commands.Basic.Properties(delivery_mode=2)
    plan = [
        (1, 1, b"small", persistent, Properties(delivery_mode=2), 100),
        (2, 1, bytes(range(256)) * 3, full, full_ours, 100),  # 8 body frames
        (1, 2, b"", commands.Basic.Properties(), Properties(), 100),  # no body frame
        (1, 3, b"x" * 300, full, full_ours, 300),  # body exactly one frame
        (2, 2, b"y" * 301, persistent, Properties(delivery_mode=2), 300),  # 300 + 1
        (1, 4, b"z", commands.Basic.Properties(), Properties(), 100),
    ]
    stream = [heartbeat]
    expected = []
    for channel, tag, body, props, ours, frame_size in plan:
        stream.append(_deliver(channel, tag, body, props, frame_size))
        stream.append(heartbeat)
        expected.append((channel, tag, body, ours))
    # A basic.get-ok answer on channel 3, in two body frames.
    stream.append(
        pframe.marshal(
            commands.Basic.GetOk(
                delivery_tag=9, redelivered=True, exchange="", routing_key="q", message_count=5
            ),
            3,
        )
    )
    stream.append(pframe.marshal(pheader.ContentHeader(0, 7, persistent), 3))
    stream.append(pframe.marshal(pbody.ContentBody(b"get"), 3))
    stream.append(heartbeat)
    stream.append(pframe.marshal(pbody.ContentBody(b"-ok"), 3))
    stream.append(pframe.marshal(pbody.ContentBody(b"!"), 3))
    stream.append(pframe.marshal(commands.Connection.Blocked(reason="low memory"), 0))
    stream.append(heartbeat)
    return b"".join(stream), expected


# The broker's answers to opening channel N and consuming on it as ``ctag-N``.
_OPEN_OK = {i: pframe.marshal(commands.Channel.OpenOk(), i) for i in (1, 2, 3)}
_CONSUME_OK = {
    i: pframe.marshal(commands.Basic.ConsumeOk(consumer_tag=f"ctag-{i}"), i) for i in (1, 2, 3)
}


async def _consuming(
    stream: ChunkStream, conn: AMQPConnection, count: int, received: list[Delivery]
) -> list[AMQPChannel]:
    """Open channels 1..``count``, each with a consumer ``ctag-<channel>`` feeding ``received``."""
    ids = range(1, count + 1)
    channels = await stream.answer(conn, [conn.channel() for _ in ids], [_OPEN_OK[i] for i in ids])
    channels.sort(key=lambda ch: ch.channel_id)
    assert [ch.channel_id for ch in channels] == list(ids)
    consumes = [
        ch.consume("q", received.append, consumer_tag=f"ctag-{ch.channel_id}") for ch in channels
    ]
    await stream.answer(conn, consumes, [_CONSUME_OK[i] for i in ids])
    return channels


async def _read(
    conn: AMQPConnection,
    stream: ChunkStream,
    chunks: list[bytes],
    setup: Callable[[trio.Nursery], Awaitable[None]],
) -> None:
    """Run the reader: ``setup(nursery)``, then ``chunks``, then EOF."""
    async with trio.open_nursery() as nursery:
        # The reader alone (no handshake, writer or heartbeats): what connect()
        # starts around it needs a broker, and would hide the read boundaries.
        nursery.start_soon(conn._reader)  # noqa: SLF001 — see the comment above
        await setup(nursery)
        stream.feed(*chunks)
        stream.end()


async def _parse(chunks: list[bytes]) -> tuple[list[Delivery], Any, AMQPConnection]:
    stream = ChunkStream()
    conn = AMQPConnection(ConnectionParams(), stream, TUNED)
    received: list[Delivery] = []
    got: list[Delivery | None] = []

    async def setup(nursery: trio.Nursery) -> None:
        *_, third = await _consuming(stream, conn, 3, received)
        # Its basic.get-ok is in the recorded stream: wait until basic.get is sent.
        sent = len(conn.out)
        nursery.start_soon(_get, third, got)
        while len(conn.out) == sent:
            await trio.lowlevel.checkpoint()

    await _read(conn, stream, chunks, setup)
    assert "the broker closed the socket" in str(conn.close_reason)
    return received, got[0] if got else None, conn


async def _get(ch: AMQPChannel, got: list[Delivery | None]) -> None:
    got.append(await ch.get("q"))


def _check(received: list[Delivery], got: Any, conn: AMQPConnection, expected: Any) -> None:
    assert [(int(d.consumer_tag[-1]), d.delivery_tag, d.body, d.properties) for d in received] == [
        (channel, tag, body, props) for channel, tag, body, props in expected
    ]
    for d in received:
        assert (d.exchange, d.routing_key) == ("ex", f"rk.{d.delivery_tag}")
        assert d.redelivered is (d.delivery_tag % 2 == 0)
        assert type(d.body) is bytes
    assert got == Delivery("", 9, True, "", "q", b"get-ok!", Properties(delivery_mode=2), 5)
    assert conn.blocked == "low memory"


async def test_parser_every_split_point() -> None:
    data, expected = _recorded_stream()
    with trio.fail_after(60):
        for cut in range(1, len(data)):
            received, got, conn = await _parse([data[:cut], data[cut:]])
            _check(received, got, conn, expected)


async def test_parser_byte_by_byte_and_random_splits() -> None:
    data, expected = _recorded_stream()
    rng = random.Random(1234)
    with trio.fail_after(60):
        received, got, conn = await _parse([data[i : i + 1] for i in range(len(data))])
        _check(received, got, conn, expected)
        for _ in range(300):
            cuts = sorted(rng.sample(range(1, len(data)), rng.randint(2, 12)))
            bounds = [0, *cuts, len(data)]
            chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
            received, got, conn = await _parse(chunks)
            _check(received, got, conn, expected)


def _table(*entries: tuple[str, bytes]) -> bytes:
    raw = b"".join(bytes([len(k)]) + k.encode() + v for k, v in entries)
    return struct.pack(">I", len(raw)) + raw


def _array(*values: bytes) -> bytes:
    raw = b"".join(values)
    return struct.pack(">I", len(raw)) + raw


def _headers_of(table: bytes) -> Any:
    """Decode ``table`` as the headers property of a content header."""
    data = b"junk" + table + b"more"
    return decode_properties(data, 4, 0x2000).headers


def test_header_table_every_field_type() -> None:
    """Every field type RabbitMQ sends (its 0-9-1 errata table), byte for byte."""
    when = datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC)
    table = _table(
        ("t", b"t\x01"),
        ("f0", b"t\x00"),
        ("b", b"b\xff"),
        ("B", b"B\xff"),
        ("s", b"s" + struct.pack(">h", -2)),
        ("u", b"u" + struct.pack(">H", 65535)),
        ("I", b"I" + struct.pack(">i", -3)),
        ("i", b"i" + struct.pack(">I", 4294967295)),
        ("l", b"l" + struct.pack(">q", -(2**40))),
        ("f", b"f" + struct.pack(">f", 1.5)),
        ("d", b"d" + struct.pack(">d", -2.25)),
        ("D", b"D\x02" + struct.pack(">i", 12345)),
        ("Dneg", b"D\x02" + struct.pack(">i", -12345)),
        ("S", b"S" + struct.pack(">I", 6) + "héllo".encode()),
        ("x", b"x" + struct.pack(">I", 3) + b"\x00\xff\x10"),
        ("T", b"T" + struct.pack(">Q", 1700000000)),
        ("V", b"V"),
        ("A", b"A" + _array(b"I" + struct.pack(">i", 1), b"S\x00\x00\x00\x01a", b"A" + _array())),
        (
            "x-death",
            b"A"
            + _array(
                b"F"
                + _table(
                    ("count", b"l" + struct.pack(">q", 3)),
                    ("reason", b"S\x00\x00\x00\x08rejected"),
                    ("time", b"T" + struct.pack(">Q", 1700000000)),
                    ("routing-keys", b"A" + _array(b"S\x00\x00\x00\x01q")),
                )
            ),
        ),
        ("F", b"F" + _table(("inner", b"F" + _table(("deep", b"b\x05"))))),
        ("after", b"S\x00\x00\x00\x02ok"),
    )
    assert _headers_of(table) == {
        "t": True,
        "f0": False,
        "b": -1,
        "B": 255,
        "s": -2,
        "u": 65535,
        "I": -3,
        "i": 4294967295,
        "l": -(2**40),
        "f": 1.5,
        "d": -2.25,
        "D": decimal.Decimal("123.45"),
        "Dneg": decimal.Decimal("-123.45"),
        "S": "héllo",
        "x": b"\x00\xff\x10",
        "T": when,
        "V": None,
        "A": [1, "a", []],
        "x-death": [{"count": 3, "reason": "rejected", "time": when, "routing-keys": ["q"]}],
        "F": {"inner": {"deep": 5}},
        "after": "ok",
    }


@pytest.mark.parametrize(
    "value",
    [
        decimal.Decimal("-1.5"),
        decimal.Decimal("1E-7"),
        decimal.Decimal("1.50"),
        decimal.Decimal("-2147483648"),
        decimal.Decimal("15E+2"),
        -1,
        -129,
        2**31,
        -(2**63),
        0.1,
        b"\x00bytes",
        "",
        "ünïcode",
        None,
        True,
        [],
        {},
        [1, [2, [3, {"k": [None, False, -0.5, decimal.Decimal("-0.001")]}]]],
        datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    ],
)
def test_header_value_round_trip(value: Any) -> None:
    props = Properties(headers={"k": value, "next": "still aligned"})
    raw = encode_properties(props)
    decoded = decode_properties(raw, 2, int.from_bytes(raw[:2], "big"))
    assert decoded == props
    if isinstance(value, decimal.Decimal):
        assert decoded.headers is not None and decoded.headers["k"] == value


@pytest.mark.parametrize(
    "value",
    [
        decimal.Decimal("12345678901.5"),  # more digits than a signed 32-bit integer holds
        decimal.Decimal("NaN"),
        decimal.Decimal("1E-300"),  # more than 255 decimal places
        datetime.datetime(1960, 1, 1, tzinfo=datetime.UTC),  # AMQP timestamps are unsigned
        object(),
        2**64,
    ],
)
def test_unencodable_header_value_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot encode header/argument 'k'"):
        encode_properties(Properties(headers={"k": value}))


def test_properties_agree_with_pamqp() -> None:
    """Random subsets of the properties, encoded by pamqp, decoded by us."""
    rng = random.Random(99)
    values: dict[str, Any] = {
        "content_type": "text/plain",
        "content_encoding": "gzip",
        "headers": {"a": 1, "b": "two", "c": [True, {"d": 2.5}], "e": None},
        "delivery_mode": 2,
        "priority": 9,
        "correlation_id": "corr-ü",
        "reply_to": "amq.rabbitmq.reply-to",
        "expiration": "60000",
        "message_id": "mid",
        "timestamp": datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=datetime.UTC),
        "message_type": "kind",
        "user_id": "guest",
        "app_id": "app",
    }
    for _ in range(500):
        chosen = {k: v for k, v in values.items() if rng.random() < 0.5}
        raw = commands.Basic.Properties(**chosen).marshal()
        got = decode_properties(b"\x00" + raw, 3, int.from_bytes(raw[:2], "big"))
        expected = Properties(
            **{("type" if k == "message_type" else k): v for k, v in chosen.items()}
        )
        assert got == expected, chosen


def test_undecodable_property_values_do_not_kill_the_connection() -> None:
    """A foreign publisher's invalid UTF-8 or out-of-range timestamp must not raise:
    the reader would close the connection, and the redelivery would close the next."""
    bad_utf8 = b"\x05ab\xffcd"
    # content_type (invalid UTF-8), then timestamp (year > 9999), then app_id.
    data = bad_utf8 + struct.pack(">Q", 2**63 - 1) + b"\x02ok"
    props = decode_properties(data, 0, 0x8000 | 0x0040 | 0x0008)
    assert props.content_type == "ab\ufffdcd"
    assert props.app_id == "ok"
    table = _table(
        ("T", b"T" + struct.pack(">Q", 2**63 - 1)),
        ("S", b"S\x00\x00\x00\x02\xff\xfe"),
        ("after", b"b\x01"),
    )
    headers = _headers_of(table)
    assert headers["S"] == b"\xff\xfe"  # as pamqp does: not text, so bytes
    assert headers["after"] == 1


async def test_delivery_with_non_utf8_routing_key_is_delivered() -> None:
    """RabbitMQ does not check that short strings are UTF-8: a foreign
    publisher's routing key must not close the consumer's connection."""
    args = b"\x06ctag-1" + struct.pack(">QB", 1, 0) + b"\x02ex" + b"\x03k\xff\xfe"
    payload = struct.pack(">HH", 60, 60) + args
    method = struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"
    data = (
        method
        + pframe.marshal(pheader.ContentHeader(0, 2, commands.Basic.Properties()), 1)
        + pframe.marshal(pbody.ContentBody(b"hi"), 1)
    )
    stream = ChunkStream()
    conn = AMQPConnection(ConnectionParams(), stream, TUNED)
    received: list[Delivery] = []

    async def setup(nursery: trio.Nursery) -> None:
        await _consuming(stream, conn, 1, received)

    with trio.fail_after(5):
        await _read(conn, stream, [data], setup)
    assert "protocol error" not in str(conn.close_reason)
    assert [(d.routing_key, d.body) for d in received] == [("k\ufffd\ufffd", b"hi")]
