"""Topology declared by an App, on every backend (issue #12's "done when").

A route given ``Queue`` objects declares them, their bindings and their
exchanges before ``serve()`` reports started; a conflict fails ``serve()``
with one line; a binding removed while the App runs is back after a
reconnect; per-route prefetch; quorum delivery limits; single active
consumer; ``Retry``'s quorum siblings.

On the memory broker these tests run under ``MockClock(autojump_threshold=0)``:
a poison message's pause between redeliveries (the default policy may grow
it) takes no wall time there; on RabbitMQ every wait is bounded instead.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from asyncworker import (
    Backoff,
    Binding,
    ConnectionEvent,
    Exchange,
    Message,
    Queue,
    TopologyError,
    Unroutable,
)
from asyncworker.middlewares import Retry

from ..conftest import Backend, serving, unique, wait_for

pytestmark = pytest.mark.anyio

FAST_RECONNECT = Backoff(initial=0.05, maximum=0.2)


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Virtual time on the memory broker; the real clock against RabbitMQ."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "memory":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return "trio"


def _exchange(backend: Backend, kind: str, prefix: str = "ex") -> Exchange:
    return Exchange(backend.broker.exchange_name(prefix), kind)


async def test_a_topic_binding_routes_order_created_and_not_user_created(
    backend: Backend,
) -> None:
    events = _exchange(backend, "topic", "events")
    orders = Queue(backend.broker.queue_name("orders"), bindings=[Binding(events, "order.*")])
    app = backend.app()
    seen: list[str] = []

    @app.route([orders])
    async def handle(message: Message) -> None:
        seen.append(message.routing_key)

    with trio.fail_after(30):
        async with serving(app):
            # Right after start: the exchange, the queue and the binding exist.
            await app.publish(b"{}", exchange=events.name, routing_key="order.created")
            with pytest.raises(Unroutable):
                await app.publish(
                    b"{}", exchange=events.name, routing_key="user.created", mandatory=True
                )
            await wait_for(lambda: seen == ["order.created"])
    assert await backend.broker.count(orders.name) == 0


async def test_quorum_delivery_limit_dead_letters_a_poison_message(backend: Backend) -> None:
    broker = backend.broker
    dlx = _exchange(backend, "fanout", "dlx")
    dead = Queue(broker.queue_name("dead"), bindings=[Binding(dlx)])
    poison = Queue(
        broker.queue_name("poison"), "quorum", delivery_limit=2, dead_letter_exchange=dlx
    )
    app = backend.app()
    app.declare(dead)
    deliveries: list[int | None] = []

    @app.route([poison])
    async def handle(message: Message) -> None:
        deliveries.append(message.headers.get("x-delivery-count"))
        raise RuntimeError("poison")

    with trio.fail_after(60):
        async with serving(app):
            await app.publish(b"poison", routing_key=poison.name)
            await wait_for(lambda: broker.count(dead.name), timeout=50)
    # The default policy requeues; the quorum queue counts each return and
    # dead-letters the message once returned more than twice: 3 deliveries.
    assert deliveries == [None, 1, 2]
    assert await broker.count(poison.name) == 0
    assert await backend.queue_type(poison.name) == "quorum"


async def test_a_conflicting_declaration_fails_serve_naming_queue_and_argument(
    backend: Backend,
) -> None:
    existing = await backend.broker.declare("classic")  # declared without x-queue-type
    app = backend.app()

    @app.route([Queue(existing, "quorum")])
    async def handle(message: Message) -> None:
        pass

    with trio.fail_after(20), pytest.raises(TopologyError) as info:
        await app.serve()
    message = str(info.value)
    assert "\n" not in message
    assert f"queue {existing!r} in vhost '/'" in message
    assert "x-queue-type" in message and "'quorum'" in message
    assert (info.value.reply_code, info.value.argument) == (406, "x-queue-type")
    assert (info.value.received, info.value.current) == ("'quorum'", "none (not set)")
    assert await backend.queue_type(existing) == "classic"  # left as it was


async def test_a_removed_binding_is_back_after_a_forced_reconnect(backend: Backend) -> None:
    broker = backend.broker
    events = _exchange(backend, "topic", "events")
    orders = Queue(broker.queue_name("orders"), bindings=[Binding(events, "order.*")])
    name = unique("conn")
    recovered = trio.Event()

    def on_event(event: ConnectionEvent) -> None:
        if event.kind == "recovered":
            recovered.set()

    app = backend.app(name=name, reconnect=FAST_RECONNECT, on_connection_event=on_event)
    seen: list[bytes] = []

    @app.route([orders])
    async def handle(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(60):
        async with serving(app):
            await app.publish(b"before", exchange=events.name, routing_key="order.created")
            await wait_for(lambda: seen == [b"before"])
            # An operator removes the binding while the App runs.
            await broker.channel.queue_unbind(orders.name, events.name, "order.*")
            with pytest.raises(Unroutable):
                await app.publish(
                    b"lost", exchange=events.name, routing_key="order.created", mandatory=True
                )
            await backend.close_connections(name)
            await recovered.wait()
            await app.publish(
                b"after", exchange=events.name, routing_key="order.created", mandatory=True
            )
            await wait_for(lambda: seen == [b"before", b"after"])


async def test_two_routes_with_their_own_prefetch(backend: Backend) -> None:
    broker = backend.broker
    narrow, wide = await broker.declare("narrow"), await broker.declare("wide")
    await broker.publish_many(narrow, [b"n%d" % i for i in range(20)])
    await broker.publish_many(wide, [b"w%d" % i for i in range(30)])
    app = backend.app(prefetch_count=16)
    running = {narrow: 0, wide: 0}
    peak = {narrow: 0, wide: 0}
    done = {narrow: 0, wide: 0}
    release = trio.Event()

    async def handle(message: Message) -> None:
        running[message.queue] += 1
        peak[message.queue] = max(peak[message.queue], running[message.queue])
        try:
            await release.wait()
        finally:
            running[message.queue] -= 1
            done[message.queue] += 1

    app.route([narrow], prefetch_count=2)(handle)
    app.route([wide], prefetch_count=10)(handle)
    with trio.fail_after(40):
        async with serving(app):
            await wait_for(lambda: running == {narrow: 2, wide: 10})
            # The rest waits in the queues: each consumer has its own basic.qos.
            assert await broker.count(narrow) == 18
            assert await broker.count(wide) == 20
            assert await backend.consumers(narrow) == [(2, True)]
            assert await backend.consumers(wide) == [(10, True)]
            release.set()
            await wait_for(lambda: done == {narrow: 20, wide: 30})
    assert peak == {narrow: 2, wide: 10}


async def test_single_active_consumer_a_second_app_waits_for_the_first(
    backend: Backend,
) -> None:
    queue = Queue(backend.broker.queue_name("sac"), single_active_consumer=True)
    first, second = backend.app(prefetch_count=4), backend.app(prefetch_count=4)
    handled: dict[str, list[bytes]] = {"first": [], "second": []}
    for label, app in (("first", first), ("second", second)):

        async def handle(message: Message, label: str = label) -> None:
            handled[label].append(message.body)

        app.route([queue])(handle)
    with trio.fail_after(60):
        async with serving(first), serving(second):
            assert await backend.consumers(queue.name) == [(4, False), (4, True)]
            for i in range(10):
                await first.publish(b"%d" % i, routing_key=queue.name)
            await wait_for(lambda: len(handled["first"]) == 10)
            assert handled["second"] == []  # idle: not the active consumer
            await first.shutdown()
            assert await backend.consumers(queue.name) == [(4, True)]
            for i in range(10, 15):
                await second.publish(b"%d" % i, routing_key=queue.name)
            await wait_for(lambda: len(handled["second"]) == 5)
    assert handled["first"] == [b"%d" % i for i in range(10)]
    assert handled["second"] == [b"%d" % i for i in range(10, 15)]


async def test_retry_on_a_quorum_queue_dead_letters_into_a_quorum_dlq(backend: Backend) -> None:
    queue = Queue(backend.broker.queue_name("retried"), "quorum")
    app = backend.app()
    attempts: list[bytes] = []

    @app.route([queue], middlewares=[Retry(2)])
    async def handle(message: Message) -> None:
        attempts.append(message.body)
        raise RuntimeError("always fails")

    dlq = f"{queue.name}.dlq"
    with trio.fail_after(60):
        async with serving(app):
            await app.publish(b"poison", routing_key=queue.name)
            await wait_for(lambda: len(attempts) == 2)
            await wait_for(lambda: _exists(backend, dlq))
            await wait_for(lambda: backend.broker.count(dlq))
    assert attempts == [b"poison", b"poison"]
    assert await backend.queue_type(dlq) == "quorum"
    (dead,) = await backend.broker.drain(dlq)
    assert dead == b"poison"


async def test_a_conflict_after_a_reconnect_is_logged_and_retried_the_others_go_on(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    broker = backend.broker
    changed = Queue(broker.queue_name("changed"), max_length=100)
    steady = Queue(broker.queue_name("steady"))
    name = unique("conn")
    recoveries: list[ConnectionEvent] = []
    # Seconds between reconnection attempts (and declaration retries): the
    # window where the test changes the queue while the App is away.
    slow = Backoff(initial=3.0, maximum=3.0, jitter=0.1)
    app = backend.app(name=name, reconnect=slow, on_connection_event=recoveries.append)
    seen: list[bytes] = []

    @app.route([changed, steady])
    async def handle(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(60):
        async with serving(app):
            # While the App is away, someone redeclares the queue differently.
            await backend.close_connections(name)
            await broker.channel.queue_delete(changed.name)
            await broker.channel.queue_declare(changed.name, durable=True)
            await wait_for(lambda: any(e.kind == "recovered" for e in recoveries))
            await app.publish(b"steady", routing_key=steady.name)
            await wait_for(lambda: seen == [b"steady"])  # the other queue goes on
            await wait_for(
                lambda: any(
                    r.levelno == logging.ERROR
                    and changed.name in r.getMessage()
                    and "x-max-length" in r.getMessage()
                    for r in caplog.records
                )
            )
            # Fixed by the operator: declared by the retry, then consumed.
            await broker.channel.queue_delete(changed.name)
            await wait_for(lambda: _exists(backend, changed.name), timeout=20)
            await app.publish(b"changed", routing_key=changed.name)
            await wait_for(lambda: sorted(seen) == [b"changed", b"steady"], timeout=20)


async def _exists(backend: Backend, queue: str) -> bool:
    channel = await backend.broker.connection.channel()
    try:
        await channel.queue_declare(queue, passive=True)
    except Exception:
        return False
    await channel.close()
    return True


async def test_declare_true_consumes_an_existing_quorum_queue_as_it_is(backend: Backend) -> None:
    existing = await backend.broker.declare_quorum("existing")
    await backend.broker.publish(existing, b"m")
    app = backend.app()
    seen: list[bytes] = []

    @app.route([existing], declare=True)
    async def handle(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(20):
        async with serving(app):
            await wait_for(lambda: seen == [b"m"])
            assert app.statistics().consumers[0].problem is None


async def test_retry_uses_an_existing_dlq_of_another_type_as_it_is(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    queue = Queue(backend.broker.queue_name("retried"), "quorum")
    dlq = f"{queue.name}.dlq"
    await backend.broker.channel.queue_declare(dlq, durable=True)  # classic, from before
    app = backend.app()
    attempts: list[bytes] = []

    @app.route([queue], middlewares=[Retry(1)])
    async def handle(message: Message) -> None:
        attempts.append(message.body)
        raise RuntimeError("always fails")

    with trio.fail_after(60):
        async with serving(app):
            for body in (b"one", b"two"):
                await app.publish(body, routing_key=queue.name)
            await wait_for(lambda: backend.broker.settled_count(dlq, 2), timeout=50)
    # Never a loop on the 406: each message was handled once, then dead-lettered.
    assert attempts == [b"one", b"two"]
    assert await backend.queue_type(dlq) == "classic"
    warnings = [r.getMessage() for r in caplog.records if "uses it as it is" in r.getMessage()]
    assert len(warnings) == 1 and "x-queue-type" in warnings[0]
