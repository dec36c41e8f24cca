"""Prometheus metrics of one App, in a registry of its own (no global state).

Counters and gauges are read from ``App.statistics()`` (the only thing this
module is given of the App) when ``/metrics`` is scraped, so they cost
nothing on the hot path.  Only the handler duration histogram needs a
measure per message: its step is added to each route's chain when the chain
is built (at ``serve()``), and only when the App serves HTTP; without
``http=`` no step is added.

The names and labels are listed in docs/operations.md.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ._statistics import AppStatistics

__all__ = ["AppMetrics"]

#: Buckets of the handler duration histogram, in seconds.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class AppMetrics:
    """The Prometheus registry of one App: its statistics plus handler durations."""

    def __init__(self, statistics: Callable[[], AppStatistics]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatisticsCollector(statistics))
        self.durations = Histogram(
            "asyncworker_handler_duration_seconds",
            "Time the handler of a route took per message (per batch on bulk routes).",
            labelnames=("route", "vhost"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def timed(
        self, handler: Callable[[Any], Awaitable[Any]], route: str, vhost: str
    ) -> Callable[[Any], Awaitable[Any]]:
        """``handler`` wrapped so that its duration is observed (built once per route)."""
        observe = self.durations.labels(route=route, vhost=vhost).observe
        clock = time.perf_counter

        async def timed_handler(message: Any) -> Any:
            start = clock()
            try:
                return await handler(message)
            finally:
                observe(clock() - start)

        timed_handler.__qualname__ = getattr(handler, "__qualname__", "handler")
        return timed_handler


class _StatisticsCollector(Collector):
    """Reads ``statistics()`` at scrape time."""

    def __init__(self, statistics: Callable[[], AppStatistics]) -> None:
        self.statistics = statistics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        stats = self.statistics()
        queue_labels = ["vhost", "queue"]
        counters = {
            "received": CounterMetricFamily(
                "asyncworker_messages_received",
                "Messages delivered to the App.",
                labels=queue_labels,
            ),
            "acked": CounterMetricFamily(
                "asyncworker_messages_acked", "Messages acknowledged.", labels=queue_labels
            ),
            "requeued": CounterMetricFamily(
                "asyncworker_messages_requeued",
                "Messages rejected back to their queue.",
                labels=queue_labels,
            ),
            "rejected": CounterMetricFamily(
                "asyncworker_messages_rejected",
                "Messages rejected without requeue: dropped, or dead-lettered by the queue's DLX.",
                labels=queue_labels,
            ),
            "lost": CounterMetricFamily(
                "asyncworker_messages_lost",
                "Messages whose channel closed before they were settled (the broker redelivers "
                "them).",
                labels=queue_labels,
            ),
        }
        in_flight = GaugeMetricFamily(
            "asyncworker_messages_in_flight",
            "Messages being handled right now.",
            labels=queue_labels,
        )
        waiting = GaugeMetricFamily(
            "asyncworker_messages_waiting",
            "Messages delivered and waiting for a handler (or for their batch to fill).",
            labels=queue_labels,
        )
        consuming = GaugeMetricFamily(
            "asyncworker_consumer_up",
            "1 when the queue's consumer is registered on the broker, else 0.",
            labels=queue_labels,
        )
        for consumer in stats.consumers:
            labels = [consumer.vhost, consumer.queue]
            for attribute, family in counters.items():
                family.add_metric(labels, getattr(consumer, attribute))
            in_flight.add_metric(labels, consumer.in_flight)
            waiting.add_metric(labels, consumer.waiting)
            consuming.add_metric(labels, 1 if consumer.consuming else 0)
        yield from counters.values()
        yield in_flight
        yield waiting
        yield consuming

        # Every vhost the App consumes has its series from the start, at 0 (the
        # consumers exist before the supervisors connect, and publishes are
        # counted from the first one): a series that appears later breaks
        # rate() and alerts on its absence.
        vhosts = {
            **dict.fromkeys(consumer.vhost for consumer in stats.consumers),
            **dict.fromkeys(stats.connected),
            **dict.fromkeys(stats.reconnects),
            **dict.fromkeys(stats.publishes_confirmed),
            **dict.fromkeys(stats.publishes_failed),
        }
        up = GaugeMetricFamily(
            "asyncworker_connection_up",
            "1 when the connection to the vhost is open, else 0.",
            labels=["vhost"],
        )
        reconnects = CounterMetricFamily(
            "asyncworker_reconnects",
            "Reconnections to the vhost since the App started.",
            labels=["vhost"],
        )
        for vhost in vhosts:
            up.add_metric([vhost], 1 if stats.connected.get(vhost) else 0)
            reconnects.add_metric([vhost], stats.reconnects.get(vhost, 0))
        yield up
        yield reconnects

        confirmed = CounterMetricFamily(
            "asyncworker_publishes_confirmed",
            "Messages published by App.publish() and confirmed by the broker.",
            labels=["vhost"],
        )
        failed = CounterMetricFamily(
            "asyncworker_publishes_failed",
            "App.publish() calls that raised (nacked, unroutable, timed out, ...).",
            labels=["vhost"],
        )
        for vhost in vhosts:
            confirmed.add_metric([vhost], stats.publishes_confirmed.get(vhost, 0))
            failed.add_metric([vhost], stats.publishes_failed.get(vhost, 0))
        yield confirmed
        yield failed
        serving = GaugeMetricFamily(
            "asyncworker_serving", "1 while the App serves (every consumer started), else 0."
        )
        serving.add_metric([], 1 if stats.serving else 0)
        yield serving
