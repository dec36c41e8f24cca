"""Bulk routes: batching on time (memory broker, virtual clock) and validation.

(How batches are settled, on every backend: ``tests/contract/test_bulk.py``.)
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from asyncworker import App, Message
from asyncworker._transports.memory import MemoryBroker
from asyncworker.middlewares import Logging, Retry, Timeout

from .conftest import wait_for


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    # Virtual time: flush intervals take no wall-clock time.
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


Calls = list[tuple[float, list[bytes]]]


def bulk_app(mem: MemoryBroker, calls: Calls, size: int = 4, interval: float = 1.0) -> App:
    app = App(url=mem.url, prefetch_count=16)

    @app.route(["logs"], declare=True, bulk_size=size, bulk_flush_interval=interval)
    async def handler(messages: list[Message]) -> None:
        calls.append((trio.current_time(), [m.body for m in messages]))

    return app


async def test_full_batch_at_once_partial_batch_after_the_interval(mem: MemoryBroker) -> None:
    calls: Calls = []
    app = bulk_app(mem, calls)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            start = trio.current_time()
            for i in range(6):
                await app.publish(b"m%d" % i, routing_key="logs")
            await wait_for(lambda: len(calls) == 2)
            # The full batch went at once; the partial one 1 s after its first message.
            assert calls[0][1] == [b"m0", b"m1", b"m2", b"m3"]
            assert calls[0][0] - start < 0.1
            assert calls[1][1] == [b"m4", b"m5"]
            assert 1.0 <= calls[1][0] - start < 1.1
            # A message arriving later in a partial batch does not extend its deadline.
            first = trio.current_time()
            await app.publish(b"late1", routing_key="logs")
            await trio.sleep(0.5)
            await app.publish(b"late2", routing_key="logs")
            await wait_for(lambda: len(calls) == 3)
            assert calls[2][1] == [b"late1", b"late2"]
            assert 1.0 <= calls[2][0] - first < 1.1
            await app.shutdown()
    stats = mem.stats("/", "logs")
    assert stats.acked == 8
    assert mem.ready_messages("/", "logs") == []


async def test_shutdown_flushes_the_partial_batch(mem: MemoryBroker) -> None:
    calls: Calls = []
    app = bulk_app(mem, calls, size=10, interval=1000)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            for i in range(3):
                await app.publish(b"m%d" % i, routing_key="logs")
            await wait_for(lambda: app.statistics().consumers[0].waiting == 3)
            assert calls == []
            await app.shutdown()
    assert [body for _, body in calls] == [[b"m0", b"m1", b"m2"]]
    assert mem.stats("/", "logs").acked == 3


async def test_logging_and_timeout_middlewares_see_the_batch(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "asyncworker")
    app = App(url=mem.url, prefetch_count=8)
    seen: list[int] = []

    @app.route(
        ["logs"],
        declare=True,
        bulk_size=3,
        middlewares=[Logging(), Timeout(5)],
    )
    async def handler(messages: list[Message]) -> None:
        await messages[0].reject(requeue=False)
        seen.append(len(messages))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            for i in range(3):
                await app.publish(b"m%d" % i, routing_key="logs")
            await wait_for(lambda: seen == [3])
            await app.shutdown()
    assert "batch of 3 messages from queue 'logs' (vhost '/'): 2 acked, 1 rejected" in caplog.text
    assert mem.stats("/", "logs").acked == 2


def test_bulk_validation_errors() -> None:
    app = App(url="memory://unused", prefetch_count=10)

    async def handler(messages: list[Message]) -> None:
        pass

    with pytest.raises(ValueError, match="bulk_size must be >= 1"):
        app.route(["q"], bulk_size=0)(handler)
    with pytest.raises(ValueError, match="larger than the App's prefetch_count=10"):
        app.route(["q"], bulk_size=11)(handler)
    with pytest.raises(ValueError, match="bulk_flush_interval must be"):
        app.route(["q"], bulk_size=5, bulk_flush_interval=0)(handler)
    with pytest.raises(TypeError, match="Retry does not support bulk routes"):
        # The type checker refuses it too: Retry takes a Message, not a Batch.
        app.route(["q"], bulk_size=5, middlewares=[Retry()])(handler)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Retry does not support bulk routes"):
        App(url="memory://unused", prefetch_count=10, middlewares=[Retry()]).route(
            ["q"], bulk_size=5
        )(handler)
