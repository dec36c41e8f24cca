"""Exchanges, bindings and queue features at the transport seam, on every backend.

Topic and headers routing, unbinding, the pre-declared ``amq.*`` exchanges,
which 404 names a queue and which an exchange, RabbitMQ 3.10's 406 texts for
inequivalent and invalid arguments, priorities, single active consumer and
the quorum delivery limit: the memory broker must answer exactly as RabbitMQ
does (see ``tests/contract/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from asyncworker import ChannelClosed, ExchangeNotFound, QueueNotFound
from asyncworker._transports import Channel, Delivery, Properties

from ..conftest import Backend, unique, wait_for

pytestmark = pytest.mark.anyio


async def _channel(backend: Backend) -> Channel:
    channel = await backend.broker.connection.channel()
    await channel.confirm_select()
    return channel


async def _bodies(channel: Channel, queue: str) -> list[bytes]:
    out = []
    while (delivery := await channel.get(queue, no_ack=True)) is not None:
        out.append(delivery.body)
    return out


async def test_topic_binding_patterns(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(20):
        exchange = await broker.declare_exchange("topic", "topic")
        patterns = {
            "star": "order.*",
            "hash": "order.#",
            "mid": "*.created.#",
            "all": "#",
            "exact": "user.created",
        }
        queues = {}
        for label, pattern in patterns.items():
            queues[label] = await broker.declare(label)
            await broker.channel.queue_bind(queues[label], exchange, pattern)
        keys = ["order.created", "user.created", "order", "order.created.eu", ""]
        for key in keys:
            await broker.channel.publish(
                key.encode() or b"<empty>", exchange=exchange, routing_key=key
            )
        got = {label: sorted(await _bodies(broker.channel, q)) for label, q in queues.items()}
    assert got == {
        # "*" is exactly one word; "#" zero or more, so "order.#" matches "order".
        "star": [b"order.created"],
        "hash": [b"order", b"order.created", b"order.created.eu"],
        "mid": [b"order.created", b"order.created.eu", b"user.created"],
        "all": sorted(
            [b"<empty>", b"order", b"order.created", b"order.created.eu", b"user.created"]
        ),
        "exact": [b"user.created"],
    }


async def test_headers_bindings(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(20):
        exchange = await broker.declare_exchange("headers", "headers")
        bindings: dict[str, dict[str, Any]] = {
            "all": {"x-match": "all", "format": "pdf", "size": 1},
            "any": {"x-match": "any", "format": "pdf", "size": 1},
            "default": {"format": "pdf"},  # x-match defaults to all
            "present": {"x-match": "all", "urgent": None},  # void: the header only has to be there
            "allx": {"x-match": "all-with-x", "x-tenant": "a"},
            "anyx": {"x-match": "any-with-x", "x-tenant": "a", "format": "zip"},
            "ignoredx": {"x-match": "all", "x-tenant": "a"},  # x- arguments ignored: matches all
            "flag": {"x-match": "all", "flag": True},
        }
        queues = {}
        for label, arguments in bindings.items():
            queues[label] = await broker.declare(label)
            await broker.channel.queue_bind(queues[label], exchange, "", arguments)
        messages: dict[bytes, dict[str, Any] | None] = {
            b"pdf1": {"format": "pdf", "size": 1},
            b"pdf2": {"format": "pdf", "size": 2},
            b"zip1": {"format": "zip", "size": 1.0},  # 1.0 equals 1, as in Erlang
            b"urgent": {"urgent": "yes"},
            b"tenant": {"x-tenant": "a"},
            b"flag1": {"flag": 1},  # 1 is not true
            b"flagT": {"flag": True},
            b"none": None,
        }
        for body, headers in messages.items():
            await broker.channel.publish(
                body,
                exchange=exchange,
                routing_key="ignored",
                properties=Properties(headers=headers),
            )
        got = {label: sorted(await _bodies(broker.channel, q)) for label, q in queues.items()}
    assert got == {
        "all": [b"pdf1"],
        "any": [b"pdf1", b"pdf2", b"zip1"],
        "default": [b"pdf1", b"pdf2"],
        "present": [b"urgent"],
        "allx": [b"tenant"],
        "anyx": [b"tenant", b"zip1"],
        "ignoredx": sorted(messages),
        "flag": [b"flagT"],
    }


async def test_invalid_x_match_is_406(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(20):
        exchange = await broker.declare_exchange("headers", "headers")
        queue = await broker.declare()
        channel = await _channel(backend)
        with pytest.raises(ChannelClosed) as info:
            await channel.queue_bind(queue, exchange, "", {"x-match": "most"})
    assert info.value.reply_code == 406
    assert info.value.reply_text == (
        'PRECONDITION_FAILED - Invalid x-match field value <<"most">>; expected all, any, '
        "all-with-x, or any-with-x"
    )


async def test_unbind_stops_routing_and_a_missing_binding_is_no_error(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(20):
        exchange = await broker.declare_exchange("direct", "direct")
        queue = await broker.declare()
        await broker.channel.queue_bind(queue, exchange, "k")
        await broker.channel.publish(b"bound", exchange=exchange, routing_key="k")
        await broker.channel.queue_unbind(queue, exchange, "k")
        await broker.channel.publish(b"unbound", exchange=exchange, routing_key="k")
        await broker.channel.queue_unbind(queue, exchange, "k")  # again: nothing to remove
        await broker.channel.queue_unbind(queue, unique("no-such-exchange"), "k")
        assert await _bodies(broker.channel, queue) == [b"bound"]
        assert broker.channel.is_open


async def test_predeclared_amq_exchanges(backend: Backend) -> None:
    with trio.fail_after(20):
        channel = await _channel(backend)
        for name, kind in (
            ("amq.topic", "topic"),
            ("amq.headers", "headers"),
            ("amq.match", "headers"),
        ):
            await channel.exchange_declare(name, kind)  # equivalent: fine
        with pytest.raises(ChannelClosed) as refused:
            await channel.exchange_declare("amq.topic", "direct")
        channel = await _channel(backend)
        with pytest.raises(ChannelClosed) as reserved:
            await channel.exchange_declare("amq.aw-test-new", "fanout")
    assert (refused.value.reply_code, refused.value.reply_text) == (
        406,
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'amq.topic' in vhost '/': "
        "received 'direct' but current is 'topic'",
    )
    assert (reserved.value.reply_code, reserved.value.reply_text) == (
        403,
        "ACCESS_REFUSED - exchange name 'amq.aw-test-new' contains reserved prefix 'amq.*'",
    )


async def test_a_404_says_whether_a_queue_or_an_exchange_is_missing(backend: Backend) -> None:
    broker = backend.broker
    missing_queue, missing_exchange = unique("no-queue"), unique("no-exchange")
    queue = await broker.declare()
    cases: list[tuple[str, type[ChannelClosed], Callable[[Channel], Awaitable[object]]]] = [
        ("consume", QueueNotFound, lambda ch: ch.consume(missing_queue, lambda d: None)),
        ("get", QueueNotFound, lambda ch: ch.get(missing_queue)),
        ("passive queue", QueueNotFound, lambda ch: ch.queue_declare(missing_queue, passive=True)),
        ("bind, no queue", QueueNotFound, lambda ch: ch.queue_bind(missing_queue, "amq.direct")),
        ("bind, no exchange", ExchangeNotFound, lambda ch: ch.queue_bind(queue, missing_exchange)),
        (
            "passive exchange",
            ExchangeNotFound,
            lambda ch: ch.exchange_declare(missing_exchange, passive=True),
        ),
        ("publish", ExchangeNotFound, lambda ch: ch.publish(b"x", exchange=missing_exchange)),
    ]
    with trio.fail_after(20):
        for label, kind, case in cases:
            channel = await _channel(backend)
            with pytest.raises(ChannelClosed) as info:
                await case(channel)
            assert type(info.value) is kind, label
            assert info.value.reply_code == 404, label
            name = missing_queue if kind is QueueNotFound else missing_exchange
            kind_word = "queue" if kind is QueueNotFound else "exchange"
            assert info.value.reply_text == f"NOT_FOUND - no {kind_word} '{name}' in vhost '/'"


async def _refusal(backend: Backend, queue: str, **kwargs: Any) -> tuple[int, str]:
    channel = await _channel(backend)
    with pytest.raises(ChannelClosed) as info:
        await channel.queue_declare(queue, **kwargs)
    return info.value.reply_code, info.value.reply_text


async def test_inequivalent_queue_arguments_are_406_with_rabbitmqs_text(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(20):
        plain = await broker.declare("plain")
        quorum = await broker.declare_quorum("quorum")
        ttl = await broker.declare("ttl", **{"x-message-ttl": 1000})
        # x-queue-type classic on a queue declared without it is equivalent.
        channel = await _channel(backend)
        await channel.queue_declare(plain, arguments={"x-queue-type": "classic"})
        got = [
            await _refusal(backend, plain, arguments={"x-queue-type": "quorum"}),
            await _refusal(backend, quorum),
            await _refusal(backend, quorum, arguments={"x-queue-type": "classic"}),
            await _refusal(backend, ttl, arguments={"x-message-ttl": 2000}),
            await _refusal(backend, plain, arguments={"x-single-active-consumer": False}),
            await _refusal(backend, plain, durable=False),
        ]
    where = "in vhost '/': received"
    assert got == [
        (
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{plain}' {where} "
            "the value 'quorum' of type 'longstr' but current is none",
        ),
        (
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{quorum}' {where} "
            "none but current is the value 'quorum' of type 'longstr'",
        ),
        (
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{quorum}' {where} "
            "'classic' but current is 'quorum'",
        ),
        (
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{ttl}' {where} "
            "'2000' but current is '1000'",
        ),
        (
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue "
            f"'{plain}' {where} the value 'false' of type 'bool' but current is none",
        ),
        (
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{plain}' {where} "
            "'false' but current is 'true'",
        ),
    ]


async def test_arguments_a_queue_type_refuses_are_406(backend: Backend) -> None:
    broker = backend.broker
    quorum = {"x-queue-type": "quorum"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "classic-dl",
            {"x-delivery-limit": 3},
            "x-delivery-limit' for queue '{q}' in vhost '/' of queue type rabbit_classic_queue",
        ),
        (
            "quorum-prio",
            {**quorum, "x-max-priority": 5},
            "x-max-priority' for queue '{q}' in vhost '/' of queue type rabbit_quorum_queue",
        ),
        (
            "prio-300",
            {"x-max-priority": 300},
            "x-max-priority' for queue '{q}' in vhost '/': {{max_value_exceeded,300}}",
        ),
        (
            "ttl-neg",
            {"x-message-ttl": -1},
            "x-message-ttl' for queue '{q}' in vhost '/': {{value_negative,-1}}",
        ),
        (
            "ttl-str",
            {"x-message-ttl": "5"},
            "x-message-ttl' for queue '{q}' in vhost '/': \"expected integer, got longstr\"",
        ),
        (
            "dlrk",
            {"x-dead-letter-routing-key": "k"},
            "x-dead-letter-routing-key' for queue "
            "'{q}' in vhost '/': routing_key_but_no_dlx_defined",
        ),
    ]
    with trio.fail_after(30):
        for label, arguments, text in cases:
            queue = broker.queue_name(label)
            code, reply = await _refusal(backend, queue, arguments=arguments)
            assert (code, reply) == (
                406,
                "PRECONDITION_FAILED - invalid arg '" + text.format(q=queue),
            )
        for prop, kwargs in (
            ("exclusive-owner", {"exclusive": True}),
            ("auto-delete", {"auto_delete": True}),
            ("non-durable", {"durable": False}),
        ):
            queue = broker.queue_name(prop)
            code, reply = await _refusal(backend, queue, arguments=quorum, **kwargs)
            assert (code, reply) == (
                406,
                f"PRECONDITION_FAILED - invalid property '{prop}' for queue '{queue}' in vhost '/'",
            )


async def test_priority_queue_serves_the_highest_priority_first(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(20):
        queue = await broker.declare("prio", **{"x-max-priority": 5})
        for body, priority in (
            (b"none-1", None),
            (b"p3-1", 3),
            (b"p5-1", 5),
            (b"p9", 9),  # above the maximum: served as 5
            (b"p0", 0),
            (b"p3-2", 3),
            (b"none-2", None),
        ):
            await broker.channel.publish(
                body, routing_key=queue, properties=Properties(priority=priority)
            )
        channel = await _channel(backend)
        first = await channel.get(queue)
        second = await channel.get(queue)
        assert first is not None and second is not None
        channel.reject(first.delivery_tag, requeue=True)  # back to its place
        rest = await _bodies(channel, queue)
    assert (first.body, second.body) == (b"p5-1", b"p9")
    assert rest == [b"p5-1", b"p3-1", b"p3-2", b"none-1", b"p0", b"none-2"]


async def test_single_active_consumer_takes_over_in_order(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(30):
        queue = await broker.declare("sac", **{"x-single-active-consumer": True})
        first, second = await _channel(backend), await _channel(backend)
        got: dict[str, list[Delivery]] = {"first": [], "second": []}
        await first.qos(10)
        tag = await first.consume(queue, got["first"].append)
        await second.qos(10)
        await second.consume(queue, got["second"].append)
        assert await backend.consumers(queue) == [(10, False), (10, True)]
        for i in range(4):
            await broker.channel.publish(b"%d" % i, routing_key=queue)
        await wait_for(lambda: len(got["first"]) == 4)
        await first.cancel(tag)  # unacked: they stay with the first channel
        await broker.channel.publish(b"after", routing_key=queue)
        await wait_for(lambda: len(got["second"]) == 1)
        await first.close()  # its 4 unacked messages go back, to the new active one
        await wait_for(lambda: len(got["second"]) == 5)
    assert [d.body for d in got["first"]] == [b"0", b"1", b"2", b"3"]
    assert sorted(d.body for d in got["second"]) == [b"0", b"1", b"2", b"3", b"after"]
    assert await backend.consumers(queue) == [(10, True)]


async def test_quorum_delivery_limit_dead_letters_with_reason(backend: Backend) -> None:
    broker = backend.broker
    with trio.fail_after(30):
        dlq = await broker.declare("limit-dlq")
        queue = await broker.declare_quorum(
            "limit",
            **{
                "x-delivery-limit": 2,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq,
            },
        )
        await broker.publish(queue, b"poison")
        channel = await _channel(backend)
        counts = []
        while (delivery := await channel.get(queue)) is not None:
            counts.append((delivery.properties.headers or {}).get("x-delivery-count"))
            channel.reject(delivery.delivery_tag, requeue=True)
        await wait_for(lambda: broker.count(dlq), timeout=10)
        (dead,) = [d async for d in _all(channel, dlq)]
    # Three deliveries (counted 0, 1, 2), the third return is over the limit.
    assert counts == [0, 1, 2]
    headers = dead.properties.headers or {}
    assert headers["x-first-death-reason"] == "delivery_limit"
    assert headers["x-death"][0]["reason"] == "delivery_limit"


async def _all(channel: Channel, queue: str) -> Any:
    while (delivery := await channel.get(queue, no_ack=True)) is not None:
        yield delivery
