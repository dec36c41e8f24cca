"""Stopping an App from odd places: a stuck handler, a publish that times out.

(A handler that shuts the App down, on every backend: ``tests/contract/test_delivery.py``.)
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from asyncworker import App, Message, PublishTimeout
from asyncworker._transports.memory import MemoryBroker


def test_a_handler_ignoring_cancellation_is_reported(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(url=mem.url, prefetch_count=1, grace_period=1)
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
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    reports = [r for r in caplog.records if "ignore cancellation" in r.getMessage()]
    assert reports and "/stuck (1)" in reports[0].getMessage()


async def test_a_publish_that_is_not_confirmed_in_time_raises_publish_timeout(
    mem: MemoryBroker,
) -> None:
    app = App(url=mem.url)
    with pytest.raises(PublishTimeout, match="not confirmed within 0 s"):
        await app.publish(b"x", routing_key="anywhere", timeout=0)
