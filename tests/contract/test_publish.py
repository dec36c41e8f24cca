"""Publishing and what a message carries, on every backend.

``app.publish`` returns once the broker confirmed the message and fails fast
and clearly on a missing exchange or an unroutable mandatory message; bodies
that cannot be decoded, odd header values, empty and large bodies never kill
the worker nor lose a message.
"""

from __future__ import annotations

import datetime
import decimal
import random

import pytest
import trio

from asyncworker import App, ExchangeNotFound, Message, Unroutable
from asyncworker.middlewares import Retry

from ..conftest import Backend, serving, unique, wait_for

pytestmark = pytest.mark.anyio


async def test_publish_returns_once_confirmed(backend: Backend) -> None:
    broker = backend.broker
    queue = await broker.declare("confirm")
    app = App(url=backend.url)
    # Not serving: a short-lived connection of its own.
    with trio.fail_after(10):
        await app.publish({"n": 1}, routing_key=queue)
        assert await broker.count(queue) == 1
    delivery = await broker.channel.get(queue, no_ack=True)
    assert delivery is not None and delivery.body == b'{"n":1}'
    assert delivery.properties.content_type == "application/json"
    assert delivery.properties.delivery_mode == 2


async def test_publish_errors_are_clear_and_fast(backend: Backend) -> None:
    broker = backend.broker
    queue = await broker.declare("errors")
    app = App(url=backend.url)

    @app.route([queue])
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(20):
        async with serving(app):
            with trio.fail_after(5), pytest.raises(ExchangeNotFound, match="no-such-exchange"):
                await app.publish(b"x", exchange="aw-no-such-exchange", routing_key="k")
            with trio.fail_after(5), pytest.raises(Unroutable, match="NO_ROUTE"):
                await app.publish(b"x", routing_key=unique("nowhere"))
            # The publisher channel recovered from the 404.
            await app.publish(b"after", routing_key=queue)


async def test_a_publish_nothing_routes_raises_unless_mandatory_is_turned_off(
    backend: Backend,
) -> None:
    """``mandatory=True`` is the default: a mistyped queue is an error, not a dropped message."""
    broker = backend.broker
    queue, idle = await broker.declare("mandatory"), await broker.declare("idle")
    app = App(url=backend.url)

    @app.route([idle])
    async def handler(message: Message) -> None:
        pass

    async def check() -> None:
        with pytest.raises(Unroutable) as info:
            await app.publish(b"typo", routing_key=queue + "-typo")
        assert info.value.reply_code == 312
        assert "mandatory=False" in str(info.value)  # the error names the opt-out
        # The explicit opt-out: confirmed, and dropped by the broker.
        await app.publish(b"dropped", routing_key=queue + "-typo", mandatory=False)
        await app.publish(b"kept", routing_key=queue)

    with trio.fail_after(20):
        await check()  # not serving: a connection of its own
        async with serving(app):
            await check()
    assert await broker.drain(queue) == [b"kept", b"kept"]


async def test_bad_input_never_kills_the_worker_nor_loses_a_message(backend: Backend) -> None:
    broker = backend.broker
    queue = await broker.declare("bad")
    app = App(url=backend.url, prefetch_count=8)
    handled: dict[str, Message] = {}

    @app.route([queue], middlewares=[Retry(max_attempts=2)])
    async def handler(message: Message) -> None:
        kind = message.headers.get("kind", "")
        if kind == "json":
            message.json()
        handled[kind] = message

    headers = {
        "kind": "headers",
        "table": {"nested": {"deeper": "yes", "n": -300}},
        "array": [1, "two", 3.5, True, {"k": "v"}, [1, 2]],
        "bytes": bytearray(b"\x00\xffraw"),  # AMQP byte array ('x')
        "decimal": decimal.Decimal("12.345"),
        "timestamp": datetime.datetime(2024, 5, 17, 12, 30, tzinfo=datetime.UTC),
        "flag": False,
        "big": 2**40,
        "none": None,
    }
    cases: list[tuple[str, bytes, dict[str, object]]] = [
        ("json", b"\xff\xfe not json {", {"kind": "json"}),
        ("headers", b"{}", headers),
        ("empty", b"", {"kind": "empty"}),
        ("1mb", random.randbytes(1024 * 1024), {"kind": "1mb"}),  # > frame_max: split frames
        ("10mb", random.randbytes(10 * 1024 * 1024), {"kind": "10mb"}),
    ]
    with trio.fail_after(60):
        async with serving(app):
            for i, (_kind, body, hdrs) in enumerate(cases):
                await broker.publish(queue, body, headers=hdrs)
                await broker.publish(queue, b"after", headers={"kind": f"after-{i}"})
                await wait_for(lambda i=i: f"after-{i}" in handled, timeout=20)
            # The undecodable body was retried once, then dead-lettered.
            await wait_for(lambda: broker.count(queue + ".dlq"), timeout=10)
            await wait_for(lambda: all(s.in_flight == 0 for s in app.statistics().consumers))
    assert "json" not in handled
    dead = await broker.channel.get(queue + ".dlq", no_ack=True)
    assert dead is not None and dead.body == cases[0][1]
    assert "MessageDecodeError" in str(dead.properties.headers)
    assert handled["headers"].headers == headers
    assert handled["empty"].body == b""
    assert handled["1mb"].body == cases[3][1]
    assert handled["10mb"].body == cases[4][1]
    assert await broker.settled_count(queue, 0) == 0
    (stats,) = app.statistics().consumers
    assert stats.lost == 0 and stats.requeued == 0


async def test_header_values_round_trip_exactly(backend: Backend) -> None:
    broker = backend.broker
    # pamqp 3.3 alone fails on ints in -128..-1, rounds floats to 32 bits and
    # refuses bytes; the seam encodes header tables itself.
    queue = await broker.declare("header-types")
    headers = {"delta": -1, "small": -128, "ratio": 0.1, "raw": b"\x00\xff", "neg64": -(2**40)}
    with trio.fail_after(10):
        await broker.publish(queue, b"x", headers=headers)
        delivery = await broker.channel.get(queue, no_ack=True)
    assert delivery is not None and delivery.properties.headers is not None
    received = delivery.properties.headers
    assert received["delta"] == -1 and received["small"] == -128
    assert received["ratio"] == 0.1
    assert bytes(received["raw"]) == b"\x00\xff"
    assert received["neg64"] == -(2**40)
