"""The watchdog, on every backend: a handler that blocks the event loop is named."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from asyncworker import App, Message

from ..conftest import Backend, serving, wait_for

pytestmark = pytest.mark.anyio


async def test_a_handler_blocking_the_loop_is_named(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    broker = backend.broker
    queue = await broker.declare("blocking")
    app = App(url=backend.url, prefetch_count=2, loop_block_threshold=0.5)
    done = trio.Event()

    @app.route([queue])
    async def sleepy_handler(message: Message) -> None:
        time.sleep(1.5)  # the bug the watchdog names
        done.set()

    caplog.set_level(logging.WARNING, logger="asyncworker")
    with trio.fail_after(20):
        async with serving(app):
            await broker.publish(queue, b"x")
            await done.wait()
            await wait_for(lambda: any("blocked" in r.getMessage() for r in caplog.records))
    # How long the block was, measured by the watchdog, is checked to the
    # watchdog's resolution under MockClock (tests/test_watchdog.py): here, a
    # real block, on a machine whose load no test controls.
    (text,) = {r.getMessage() for r in caplog.records if "sleepy_handler" in r.getMessage()}
    assert "event loop was blocked for at least" in text and "(threshold 0.5 s)" in text
    assert f"sleepy_handler' (queue {queue!r}, vhost '/')" in text
    assert "trio.to_thread.run_sync" in text
