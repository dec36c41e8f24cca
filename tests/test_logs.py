"""What an operator reads: the serving line, the final stopped line (memory broker, virtual clock).

The worker number of every line in ``--workers`` mode is checked in
tests/test_cli.py, where the workers run.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from asyncworker import App, Message
from asyncworker._transports.memory import MemoryBroker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def lines(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(word)]


async def test_the_stopped_line_says_what_the_drain_did(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    mem.add_vhost("billing")
    app = App(url=f"{mem.url}/billing", prefetch_count=4, grace_period=10)
    started = 0

    @app.route(["jobs"], declare=True)
    async def handler(message: Message) -> None:
        nonlocal started
        started += 1
        # Two finish within the grace period, two never do.
        await trio.sleep(5 if message.body == b"quick" else 3600)

    @app.route(["other"], vhost="/", declare=True)
    async def other(message: Message) -> None:
        pass

    @app.run_every(60)
    async def tick(app: App) -> None:
        pass

    with caplog.at_level(logging.INFO, logger="asyncworker"):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            for body in (b"quick", b"quick", b"stuck", b"stuck", b"waiting"):
                await app.publish(body, routing_key="jobs")
            while started < 4:
                await trio.sleep(0.01)
            await app.shutdown()
    (serving,) = lines(caplog, "serving")
    assert serving == (
        "serving 2 queue(s): 'jobs' in vhost 'billing'; 'other' in vhost '/'; "
        f"1 periodic task(s), on memory://{mem.url.removeprefix('memory://')}"
    )
    (stopped,) = lines(caplog, "stopped")
    assert stopped == (
        "stopped: 2 handler(s) in flight at shutdown finished, the grace period cancelled 2 "
        "(their messages were requeued); drained in 10.0 s"
    )
    assert app.statistics().handlers_cancelled == 2
    assert mem.queue_size("billing", "jobs") == 3  # 2 cancelled + 1 never delivered


async def test_a_clean_drain_says_none_was_cancelled(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(url=mem.url, grace_period=10)

    @app.route(["jobs"], declare=True)
    async def handler(message: Message) -> None:
        await trio.sleep(1)

    with caplog.at_level(logging.INFO, logger="asyncworker"):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await app.publish(b"x", routing_key="jobs")
            await trio.sleep(0.5)
            await app.shutdown()
    (stopped,) = lines(caplog, "stopped")
    assert stopped.startswith(
        "stopped: 1 handler(s) in flight at shutdown finished, none was cancelled; drained in"
    )
    assert app.statistics().handlers_cancelled == 0
    record = next(r for r in caplog.records if r.getMessage() == stopped)
    assert (record.drained, record.cancelled) == (1, 0)  # type: ignore[attr-defined]
