"""The records ``App.statistics()`` returns (a leaf: plain frozen dataclasses).

Everything that reports on a running App (``/health``, ``/metrics``, the
loop watchdog, the test client) reads these snapshots and nothing else, so
that the objects doing the work keep their state to themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AppStatistics", "ConsumerStatistics"]


@dataclass(frozen=True, slots=True)
class ConsumerStatistics:
    """A snapshot of one consumer (one queue of one vhost)."""

    #: The queue consumed.
    queue: str
    #: Its vhost.
    vhost: str
    #: Whether a ``basic.consume`` is registered on the broker right now.
    consuming: bool
    #: Messages delivered since the App started.
    received: int
    #: Handlers running now.
    in_flight: int
    #: Messages delivered and waiting for a worker.
    waiting: int
    #: Worker tasks alive (each holds one limiter token).
    workers: int
    acked: int
    requeued: int
    rejected: int
    #: Messages whose channel closed before they were settled (redelivered by the broker).
    lost: int
    #: Why the consumer is not consuming, when it is not.
    problem: str | None
    #: The name of the route (its handler's qualified name).
    route: str = ""


@dataclass(frozen=True, slots=True)
class AppStatistics:
    """A snapshot of an App (see ``App.statistics()``)."""

    #: Whether ``serve()`` is running and has started every consumer.
    serving: bool
    #: Whether each vhost's connection is open right now.
    connected: dict[str, bool]
    #: Reconnections since the App started, per vhost.
    reconnects: dict[str, int]
    #: One record per (vhost, queue).
    consumers: tuple[ConsumerStatistics, ...]
    #: ``App.publish()`` calls the broker confirmed, per vhost.
    publishes_confirmed: dict[str, int] = field(default_factory=dict)
    #: ``App.publish()`` calls that raised (nacked, unroutable, timed out, ...), per vhost.
    publishes_failed: dict[str, int] = field(default_factory=dict)
    #: Handlers cancelled on shutdown since the App started: still running when
    #: the grace period ran out (or a second signal came); their messages were
    #: requeued.
    handlers_cancelled: int = 0
