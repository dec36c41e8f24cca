"""The watchdog's figures, under trio's MockClock: how long the loop was blocked, exactly.

To trio's clock, a handler that blocks the event loop is one step during
which time moved on and nothing else ran; ``MockClock.jump()`` inside a
handler is exactly that.  So the figure the watchdog reports is checked here
to its own resolution (its 0.1 s interval), whatever the machine's load.  That
a real blocking call (``time.sleep``) is caught and named on every backend is
in ``tests/contract/test_watchdog.py``.
"""

from __future__ import annotations

import logging
import re

import pytest
import trio
import trio.testing

from asyncworker import App, Message
from asyncworker._transports.memory import MemoryBroker

from .conftest import serving, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


async def report_of_a_block(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture, seconds: float, **kwargs: object
) -> logging.LogRecord:
    """Serve an App whose handler holds the event loop for ``seconds`` (virtual)
    while one message is handled; return the watchdog's one report of it."""
    app = App(url=mem.url, loop_block_threshold=0.5, **kwargs)  # type: ignore[arg-type]
    done = trio.Event()

    @app.route(["jobs"], declare=True)
    async def hog(message: Message) -> None:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        clock.jump(seconds)  # no checkpoint: nothing else runs meanwhile
        done.set()

    caplog.set_level(logging.WARNING, logger="asyncworker")
    with trio.fail_after(60):
        async with serving(app):
            await app.publish(b"x", routing_key="jobs")
            await done.wait()
            await wait_for(lambda: reports(caplog))
            # Virtual time goes on: a block is reported once, not at every wake-up.
            await trio.sleep(5)
    (record,) = reports(caplog)
    return record


def reports(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "event loop was blocked" in r.getMessage()]


def blocked_seconds(record: logging.LogRecord) -> float:
    found = re.search(r"blocked for at least ([0-9.]+) s", record.getMessage())
    assert found is not None, record.getMessage()
    return float(found[1])


async def test_a_block_is_reported_once_to_within_the_watchdog_interval(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    record = await report_of_a_block(mem, caplog, 1.5)
    assert record.levelno == logging.WARNING
    # Measured as the lateness of a 0.1 s sleep that the block fell into.
    assert 1.4 <= blocked_seconds(record) <= 1.5
    text = record.getMessage()
    assert "threshold 0.5 s" in text
    assert "hog' (queue 'jobs', vhost '/')" in text
    assert "longer than the heartbeat" not in text  # 1.5 s is far below its 60 s


async def test_a_block_longer_than_the_heartbeat_is_an_error_that_says_so(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    record = await report_of_a_block(mem, caplog, 3, heartbeat=2)
    assert record.levelno == logging.ERROR
    assert 2.9 <= blocked_seconds(record) <= 3.0
    assert "longer than the heartbeat (2 s): the broker may drop the connection" in (
        record.getMessage()
    )
