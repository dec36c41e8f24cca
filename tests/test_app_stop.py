"""Stopping an App from odd places: a handler, a stuck handler, a publish that times out."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from asyncworker import App, Message, PublishTimeout
from asyncworker._memory import MemoryBroker, register_broker, unregister_broker

from .conftest import BROKER_URL, Broker, wait_for


@pytest.mark.rabbitmq
async def test_a_handler_can_shut_the_app_down(broker: Broker) -> None:
    queue = await broker.declare()
    await broker.publish(queue, b"stop")
    # A grace period far longer than the test's deadline: waiting for it would fail.
    app = App(url=BROKER_URL, prefetch_count=4, grace_period=120)
    handled: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        handled.append(message.body)
        await app.shutdown()  # must not wait for this very handler

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: handled == [b"stop"])
            await app.shutdown()
    (stats,) = app.statistics().consumers
    assert stats.acked == 1 and stats.requeued == 0
    assert await broker.settled_count(queue, 0) == 0


def test_a_handler_ignoring_cancellation_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    name = register_broker(broker)
    app = App(url=f"memory://{name}", prefetch_count=1, grace_period=1)
    release = trio.Event()
    started = trio.Event()

    @app.route(["stuck"], declare=True)
    async def handler(message: Message) -> None:
        started.set()
        with trio.CancelScope(shield=True):  # the bug being reported
            await release.wait()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await app.publish(b"x", routing_key="stuck")
            await started.wait()
            nursery.start_soon(app.shutdown)
            # grace period (1 s) + one report interval, in virtual time
            await trio.sleep(30)
            release.set()

    caplog.set_level(logging.ERROR, logger="asyncworker")
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        unregister_broker(name)
    reports = [r for r in caplog.records if "ignore cancellation" in r.getMessage()]
    assert reports and "/stuck (1)" in reports[0].getMessage()


async def test_a_publish_that_is_not_confirmed_in_time_raises_publish_timeout() -> None:
    broker = MemoryBroker()
    name = register_broker(broker)
    app = App(url=f"memory://{name}")
    try:
        with pytest.raises(PublishTimeout, match="not confirmed within 0 s"):
            await app.publish(b"x", routing_key="anywhere", timeout=0)
    finally:
        unregister_broker(name)
