"""Delivery behaviour every backend must share: the same tests on RabbitMQ and on ``memory://``.

Each test gets a ``backend``: a broker URL for the App and a ``Broker``
helper (declare, publish, count) that talks to the same broker through the
transport seam (``asyncworker._transport.connect``).  The ``rabbitmq``
parameter runs against the real broker; ``memory`` against a fresh, private
in-memory broker.  Both must give the same answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from asyncworker import App, Message
from asyncworker._memory import MemoryBroker, register_broker, unregister_broker
from asyncworker.middlewares import AckRequeue, Action, Retry, Timeout

from .conftest import BROKER_URL, Broker, open_broker, wait_for

pytestmark = pytest.mark.anyio


@dataclass
class Backend:
    """A broker URL and direct access to that broker."""

    name: str
    url: str
    broker: Broker

    def app(self, prefetch_count: int = 16, **kwargs: Any) -> App:
        return App(url=self.url, prefetch_count=prefetch_count, **kwargs)


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = MemoryBroker()
        name = register_broker(memory)
        try:
            async with open_broker(memory.url) as broker:
                yield Backend("memory", memory.url, broker)
        finally:
            unregister_broker(name)
    else:
        async with open_broker(BROKER_URL) as broker:
            yield Backend("rabbitmq", BROKER_URL, broker)


async def serve_until(app: App, condition: Any, timeout: float = 15) -> None:
    """Serve ``app`` until ``condition()`` holds, then shut it down gracefully."""
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        try:
            await wait_for(condition, timeout=timeout)
        finally:
            await app.shutdown()


async def test_ack_on_success(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish_many(queue, [b"m%d" % i for i in range(20)])
    app = backend.app()
    seen: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(20):
        await serve_until(app, lambda: len(seen) == 20)
        assert sorted(seen) == sorted(b"m%d" % i for i in range(20))
        assert await backend.broker.count(queue) == 0
    (stats,) = app.statistics().consumers
    assert (stats.acked, stats.requeued, stats.rejected, stats.lost) == (20, 0, 0, 0)


async def test_exception_requeues_and_redelivers(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish(queue, b"boom")
    app = backend.app()
    deliveries: list[bool] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        deliveries.append(message.redelivered)
        if len(deliveries) == 1:
            raise RuntimeError("first attempt fails")

    with trio.fail_after(20):
        await serve_until(app, lambda: len(deliveries) == 2)
        assert deliveries == [False, True]
        assert await backend.broker.count(queue) == 0


async def test_explicit_settlement_is_never_doubled(backend: Backend) -> None:
    queue = await backend.broker.declare()
    for body in (b"ack", b"reject", b"requeue-once", b"double-ack", b"after"):
        await backend.broker.publish(queue, body)
    app = backend.app(prefetch_count=1)
    results: dict[bytes, list[bool]] = {}

    @app.route([queue])
    async def handler(message: Message) -> None:
        attempts = results.setdefault(message.body, [])
        if message.body == b"ack":
            attempts.append(await message.ack())
        elif message.body == b"reject":
            attempts.append(await message.reject(requeue=False))
        elif message.body == b"requeue-once" and not message.redelivered:
            attempts.append(await message.reject(requeue=True))
        elif message.body == b"double-ack":
            attempts.append(await message.ack())
            attempts.append(await message.ack())
            attempts.append(await message.reject())
        else:
            attempts.append(True)

    with trio.fail_after(20):
        await serve_until(app, lambda: b"after" in results and len(results[b"requeue-once"]) == 2)
        assert await backend.broker.count(queue) == 0
    assert results[b"ack"] == [True]
    assert results[b"reject"] == [True]
    assert results[b"double-ack"] == [True, False, False]
    assert results[b"requeue-once"] == [True, True]
    (stats,) = app.statistics().consumers
    # A doubled ack would have closed the channel (406): "after" would be lost.
    assert (stats.acked, stats.rejected, stats.requeued, stats.lost) == (4, 1, 1, 0)


async def test_concurrency_is_bounded_by_prefetch(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish_many(queue, [b"%d" % i for i in range(40)])
    app = backend.app(prefetch_count=8)
    running = peak = done = 0
    release = trio.Event()

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
            done += 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: running == 8)
            assert await backend.broker.count(queue) == 32  # the rest stays in the queue
            release.set()
            await wait_for(lambda: done == 40)
            await app.shutdown()
    assert peak == 8
    assert await backend.broker.count(queue) == 0


async def test_graceful_shutdown_loses_nothing(backend: Backend) -> None:
    queue = await backend.broker.declare()
    published = 300
    await backend.broker.publish_many(queue, [b"%d" % i for i in range(published)])
    app = backend.app(prefetch_count=32)
    handled = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal handled
        await trio.sleep(0.01)
        handled += 1

    with trio.fail_after(30):
        await serve_until(app, lambda: handled >= 50)
        (stats,) = app.statistics().consumers
        assert stats.acked == handled < published
        left = await backend.broker.settled_count(queue, published - handled)
    assert handled + left == published


async def test_timeout_requeues(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish(queue, b"slow once")
    app = backend.app()
    deliveries: list[bool] = []

    @app.route([queue], middlewares=[Timeout(0.3)])
    async def handler(message: Message) -> None:
        deliveries.append(message.redelivered)
        if not message.redelivered:
            await trio.sleep_forever()

    with trio.fail_after(20):
        await serve_until(app, lambda: len(deliveries) == 2)
        assert deliveries == [False, True]
        assert await backend.broker.count(queue) == 0


async def test_retry_dead_letters_after_exactly_max_attempts(backend: Backend) -> None:
    queue = await backend.broker.declare("poison")
    dlq = f"{queue}.dlq"
    await backend.broker.publish(queue, b"poison", headers={"trace": "abc"})
    app = backend.app()
    attempts: list[int] = []
    exhausted = trio.Event()

    @app.route([queue], middlewares=[Retry(3, on_exhausted=lambda m, e: exhausted.set())])
    async def handler(message: Message) -> None:
        attempts.append(message.headers.get("x-asyncworker-attempt", 1))
        raise ValueError("cannot parse")

    with trio.fail_after(20):
        # Shutdown waits for the last attempt, dead-lettering included, to finish.
        await serve_until(app, exhausted.is_set)
        assert attempts == [1, 2, 3]
        assert await backend.broker.count(queue) == 0
        assert await backend.broker.count(dlq) == 1
        (dead,) = await backend.broker.drain(dlq)
    assert dead == b"poison"


async def test_reject_policy_dead_letters_through_the_dlx(backend: Backend) -> None:
    queue = backend.broker.queue_name("reject")
    dlq = f"{queue}.dlq"
    channel = backend.broker.channel
    await channel.queue_declare(dlq, durable=True)
    await channel.queue_declare(
        queue,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq},
    )
    await backend.broker.publish(queue, b"bad")
    app = backend.app(settlement=AckRequeue(on_exception=Action.REJECT))
    calls = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad message")

    with trio.fail_after(20):
        await serve_until(app, lambda: backend.broker.count(dlq))
        assert calls == 1
        assert await backend.broker.count(queue) == 0
        deliveries = [await channel.get(dlq, no_ack=True)]
    (dead,) = deliveries
    assert dead is not None and dead.body == b"bad"
    death = dead.properties.headers["x-death"][0]  # type: ignore[index]
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", queue, 1)
    (stats,) = app.statistics().consumers
    assert (stats.rejected, stats.requeued) == (1, 0)
