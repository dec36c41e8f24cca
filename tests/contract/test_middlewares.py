"""The standard middlewares on every backend: what ends up where.

Timeout requeues a slow handler's message, Retry counts attempts and
dead-letters poison messages (with and without a delay, on classic and quorum
queues), and a swapped settlement policy rejects instead of requeueing.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from asyncworker import App, Message
from asyncworker.middlewares import AckRequeue, Action, Retry, Timeout

from ..conftest import Backend, Broker, serve_until, serving, wait_for

pytestmark = pytest.mark.anyio


def make_app(backend: Backend, **kwargs: Any) -> App:
    return backend.app(prefetch_count=8, grace_period=1.0, **kwargs)


def dead_lettered(caplog: pytest.LogCaptureFixture, queue: str) -> bool:
    """Whether Retry logged that it dead-lettered a message of ``queue``.

    (Waiting on the log, not on the broker: a passive declare of the ``.dlq``
    before Retry created it would close the test's channel.)
    """
    return any(
        f"queue {queue!r}" in r.getMessage() and "dead-lettered into" in r.getMessage()
        for r in caplog.records
    )


async def get_one(broker: Broker, queue: str) -> Any:
    delivery = await broker.channel.get(queue, no_ack=True)
    assert delivery is not None, f"no message in {queue!r}"
    return delivery


async def test_timeout_requeues_a_slow_handler_message(backend: Backend) -> None:
    # Also was test_behaviour.py's test_timeout_requeues: the same scenario.
    broker = backend.broker
    queue = await broker.declare("timeout")
    await broker.publish(queue, b"slow once")
    app = make_app(backend)
    deliveries: list[bool] = []

    @app.route([queue], middlewares=[Timeout(0.3)])
    async def handler(message: Message) -> None:
        deliveries.append(message.redelivered)
        if not message.redelivered:
            await trio.sleep_forever()

    with trio.fail_after(20):
        async with serving(app):
            await wait_for(lambda: len(deliveries) == 2)
        # Cancelled on the first delivery, requeued (not lost), acked on the second.
        assert deliveries == [False, True]
        assert await broker.count(queue) == 0


async def test_retry_dead_letters_a_poison_message_after_max_attempts(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # Also was test_behaviour.py's test_retry_dead_letters_after_exactly_max_attempts
    # (on_exhausted, and shutdown waiting for the dead-lettering).
    broker = backend.broker
    queue = await broker.declare("poison")
    dlq = f"{queue}.dlq"
    await broker.publish(queue, b"poison", headers={"trace": "abc"}, message_id="m-1")
    app = make_app(backend)
    attempts: list[int] = []
    exhausted = trio.Event()

    @app.route([queue], middlewares=[Retry(3, on_exhausted=lambda m, e: exhausted.set())])
    async def handler(message: Message) -> None:
        attempts.append(message.headers.get("x-asyncworker-attempt", 1))
        raise ValueError("cannot parse order")

    with trio.fail_after(20):
        # on_exhausted runs before the dead-lettering: shutdown waits for the
        # last attempt, dead-lettering included, to finish.
        await serve_until(app, exhausted.is_set)
        assert dead_lettered(caplog, queue)
        assert attempts == [1, 2, 3]
        assert await broker.count(queue) == 0
        assert await broker.count(dlq) == 1
        dead = await get_one(broker, dlq)
    assert dead.body == b"poison"
    assert dead.properties.message_id == "m-1"
    headers = dead.properties.headers
    assert headers["x-asyncworker-error"] == "ValueError: cannot parse order"
    assert headers["x-asyncworker-attempts"] == 3
    assert headers["x-asyncworker-original-queue"] == queue
    assert headers["trace"] == "abc"


async def test_retry_with_delay_goes_through_a_delay_queue(backend: Backend) -> None:
    broker = backend.broker
    queue = await broker.declare("delay")
    retry_queue = f"{queue}.retry.200"
    broker.declared.append(retry_queue)  # deleted after the test
    await broker.publish(queue, b"flaky")
    app = make_app(backend)
    calls: list[dict[str, Any]] = []

    @app.route([queue], middlewares=[Retry(5, delay=0.2)])
    async def handler(message: Message) -> None:
        calls.append(dict(message.headers))
        if len(calls) < 3:
            raise ConnectionError(f"downstream unavailable ({len(calls)})")

    with trio.fail_after(20):
        async with serving(app):
            await wait_for(lambda: len(calls) == 3)
        assert await broker.count(queue) == 0
        # The delay queue exists (declared by Retry) and is empty again.
        assert await broker.count(retry_queue) == 0
    assert [h.get("x-asyncworker-attempt") for h in calls] == [None, 2, 3]
    assert calls[1]["x-asyncworker-last-error"] == ("ConnectionError('downstream unavailable (1)')")
    # Each copy came back because the broker expired it in the delay queue
    # (nothing else dead-letters with reason "expired"), once per retry...
    for count, headers in enumerate(calls[1:], start=1):
        (death,) = headers["x-death"]
        assert (death["queue"], death["reason"], death["count"]) == (retry_queue, "expired", count)
    # ...and the delay queue holds a copy for 200 ms: declaring it again with
    # these arguments succeeds only if they are the ones it has.  (That the
    # broker waits out the TTL is the memory broker's parity, under MockClock,
    # in test_memory_broker.py; that the retries come 30 s apart in virtual time,
    # test_testing.py's.)
    await broker.channel.queue_declare(
        retry_queue,
        durable=True,
        arguments={
            "x-message-ttl": 200,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        },
    )


async def test_retry_delay_function_and_exhaustion(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    broker = backend.broker
    queue = await broker.declare("backoff")
    broker.declared += [f"{queue}.retry.100", f"{queue}.retry.200"]
    await broker.publish(queue, b"always fails")
    app = make_app(backend)
    calls = 0

    @app.route([queue], middlewares=[Retry(3, delay=lambda attempt: 0.1 * attempt)])
    async def handler(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("still broken")

    with trio.fail_after(20):
        async with serving(app):
            await wait_for(lambda: dead_lettered(caplog, queue), timeout=15)
        assert calls == 3
        assert await broker.count(queue) == 0
        # One delay queue per distinct delay: 100 ms after attempt 1, 200 ms after 2.
        assert await broker.count(f"{queue}.retry.100") == 0
        assert await broker.count(f"{queue}.retry.200") == 0


async def test_retry_outside_timeout_counts_timeouts(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    broker = backend.broker
    queue = await broker.declare("retry-timeout")
    await broker.publish(queue, b"hangs")
    app = make_app(backend)
    calls = 0

    @app.route([queue], middlewares=[Retry(2), Timeout(0.2)])
    async def handler(message: Message) -> None:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with serving(app):
            await wait_for(lambda: dead_lettered(caplog, queue), timeout=15)
        assert calls == 2
        assert await broker.count(queue) == 0
        dead = await get_one(broker, f"{queue}.dlq")
    assert dead.properties.headers["x-asyncworker-error"].startswith("HandlerTimeout: ")


async def test_retry_counts_quorum_redeliveries(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    broker = backend.broker
    queue = await broker.declare("quorum", **{"x-queue-type": "quorum"})
    await broker.publish(queue, b"poison")
    app = make_app(backend)
    seen: list[tuple[Any, Any]] = []

    @app.route([queue], middlewares=[Retry(3)])
    async def handler(message: Message) -> None:
        seen.append(
            (message.headers.get("x-delivery-count"), message.headers.get("x-asyncworker-attempt"))
        )
        if len(seen) == 1:
            # Requeued by the handler itself: Retry leaves it, the broker counts it.
            await message.reject(requeue=True)
        raise ValueError("poison")

    with trio.fail_after(30):
        async with serving(app):
            await wait_for(lambda: dead_lettered(caplog, queue), timeout=25)
        assert await broker.count(queue) == 0
        dead = await get_one(broker, f"{queue}.dlq")
    # 1st: requeued by the handler; 2nd (x-delivery-count=1, attempt 2): Retry
    # re-raises and the policy requeues; 3rd (count 2, attempt 3): dead-lettered.
    assert seen == [(None, None), (1, None), (2, None)]
    assert dead.properties.headers["x-asyncworker-attempts"] == 3
    assert "x-delivery-count" not in dead.properties.headers


async def test_retry_dlx_rejects_to_the_queue_dead_letter_exchange(backend: Backend) -> None:
    broker = backend.broker
    queue, dlq = await broker.declare_dead_lettered("dlx")
    await broker.publish(queue, b"poison")
    app = make_app(backend)
    calls = 0

    @app.route([queue], middlewares=[Retry(2, dead_letter="dlx")])
    async def handler(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("poison")

    with trio.fail_after(20):
        async with serving(app):
            await wait_for(lambda: broker.count(dlq), timeout=15)
        assert calls == 2
        assert await broker.count(queue) == 0
        dead = await get_one(broker, dlq)
    assert dead.properties.headers["x-death"][0]["reason"] == "rejected"
    assert dead.properties.headers["x-asyncworker-attempt"] == 2


@pytest.mark.parametrize("where", ["app", "route"])
async def test_settlement_reject_without_requeue(backend: Backend, where: str) -> None:
    # Also was test_behaviour.py's test_reject_policy_dead_letters_through_the_dlx
    # (the app-level case, with what the dead-lettered copy says).
    broker = backend.broker
    queue, dlq = await broker.declare_dead_lettered("reject")
    await broker.publish(queue, b"bad")
    policy = AckRequeue(on_exception=Action.REJECT)
    app = make_app(backend, settlement=policy) if where == "app" else make_app(backend)
    calls = 0

    @app.route([queue], settlement=policy if where == "route" else None)
    async def handler(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad message")

    with trio.fail_after(20):
        async with serving(app):
            await wait_for(lambda: broker.count(dlq))
        # Rejected once, not requeued: it went to the queue's dead-letter exchange.
        assert calls == 1
        assert await broker.count(queue) == 0
        assert await broker.count(dlq) == 1
        dead = await get_one(broker, dlq)
    assert dead.body == b"bad"
    death = dead.properties.headers["x-death"][0]
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", queue, 1)
    (stats,) = app.statistics().consumers
    assert (stats.rejected, stats.requeued) == (1, 0)
