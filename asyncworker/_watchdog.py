"""The loop-lag watchdog: names the routes whose handlers block the event loop.

A handler that calls something blocking (``time.sleep``, a synchronous HTTP
client, a long CPU-bound computation) stops *every* task of the worker: the
other queues, the AMQP reader and writer, and the heartbeats.  Block longer
than twice the heartbeat and the broker drops the connection, and every
message in flight is delivered again.

The watchdog is one task that sleeps ``interval`` seconds in a loop and
measures how late it wakes up.  Lateness above the threshold means the loop
was blocked; it then logs which routes had handlers running (or finishing)
since its previous wake-up.  It reads the consumers' counters only when it
wakes up (``App.statistics()``, the only thing it is given of the App), so the
message hot path is untouched.  It cannot name the exact
handler (that would need a trio instrument on every task step): when
several routes were busy in that window, all of them are named.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._statistics import AppStatistics

__all__: list[str] = []

logger = logging.getLogger("asyncworker")


@dataclass(frozen=True, slots=True)
class _Activity:
    route: str
    queue: str
    vhost: str
    in_flight: int
    settled: int


def _activity(stats: AppStatistics) -> dict[tuple[str, str], _Activity]:
    result: dict[tuple[str, str], _Activity] = {}
    for consumer in stats.consumers:
        result[(consumer.vhost, consumer.queue)] = _Activity(
            route=consumer.route,
            queue=consumer.queue,
            vhost=consumer.vhost,
            in_flight=consumer.in_flight,
            settled=consumer.acked + consumer.requeued + consumer.rejected + consumer.lost,
        )
    return result


def _suspects(
    before: dict[tuple[str, str], _Activity], after: dict[tuple[str, str], _Activity]
) -> list[_Activity]:
    """Consumers that had a handler running at some point between two snapshots."""
    found = []
    for key, now in after.items():
        then = before.get(key)
        busy_before = then is not None and then.in_flight > 0
        finished = then is not None and now.settled != then.settled
        if now.in_flight > 0 or busy_before or finished:
            found.append(now)
    return found


async def watch_loop(
    statistics: Callable[[], AppStatistics],
    threshold: float,
    heartbeat: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Log a warning each time the event loop was blocked for ``threshold`` s or more.

    Runs until cancelled (the App runs it in its nursery while serving).
    """
    # The block is measured to within ``interval``.
    interval = min(0.1, threshold / 4)
    snapshot = _activity(statistics())
    task_status.started()
    while True:
        start = trio.current_time()
        await trio.sleep(interval)
        blocked = trio.current_time() - start - interval
        current = _activity(statistics())
        if blocked >= threshold:
            _report(blocked, threshold, heartbeat, _suspects(snapshot, current))
        snapshot = current


def _report(blocked: float, threshold: float, heartbeat: int, suspects: list[_Activity]) -> None:
    if suspects:
        where = ", ".join(
            f"route {s.route!r} (queue {s.queue!r}, vhost {s.vhost!r})" for s in suspects
        )
        culprit = f"handlers were running on {where}"
    else:
        culprit = "no handler was running (the blocking code is outside the handlers)"
    danger = (
        f"; that is longer than the heartbeat ({heartbeat} s): the broker may drop the "
        "connection and redeliver every message in flight"
        if heartbeat and blocked >= heartbeat
        else ""
    )
    logger.log(
        logging.ERROR if danger else logging.WARNING,
        "the event loop was blocked for at least %.1f s (threshold %.1f s): %s%s. A blocking call "
        "(time.sleep, synchronous I/O, CPU-bound work) in an async handler stops every "
        "queue and the heartbeats; await trio.sleep() instead, or run sync code with "
        "`await trio.to_thread.run_sync(func, *args)`",
        blocked,
        threshold,
        culprit,
        danger,
    )
