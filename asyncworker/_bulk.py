"""Bulk routes: a handler that receives a ``Batch`` (a ``list[Message]``).

``@app.route(["logs"], bulk_size=500, bulk_flush_interval=1.0)`` buffers the
deliveries of each of its queues and calls the chain once per batch: as soon
as ``bulk_size`` messages are buffered, or ``bulk_flush_interval`` seconds
after the *first* message of a partial batch arrived (not on a free-running
clock, so no message waits longer than the interval).

How it plugs into the consumer: a bulk route's consumer hands its deliveries
to a ``BatchCollector`` instead of the elastic worker pool (the choice is made
once per channel, in ``Consumer._delivery_callback``), so the hot path of the
ordinary routes is untouched.  The buffer *is* the consumer's ``_pending``
deque, which keeps the consumer's statistics (``waiting``), its drop of
messages of a dead channel and its drain logic valid.  Each batch runs in its
own task in the consumer's worker nursery, so the next batch keeps filling
while one is handled; the broker's ``prefetch_count`` (>= ``bulk_size``,
checked at registration) bounds how many messages are buffered or handled at
once.

Settlement: a ``Batch`` quacks like a ``Message`` where the settlement policy
and the standard middlewares need it (``queue``, ``vhost``, ``settled``,
``settlement``, ``delivery_tag``, ``redelivered`` and ``_settle``), so
``AckRequeue`` settles every message of the batch that the handler left
unsettled with one action, and honours the ones the handler settled itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import trio

from ._chain import _IN_WORKER
from ._message import Batch, Message

if TYPE_CHECKING:
    from ._chain import Middleware
    from ._consumer import Consumer
    from ._transports import Channel, Delivery, DeliveryCallback

__all__ = ["BatchCollector", "BulkConfig", "check_bulk"]

logger = logging.getLogger("asyncworker")


@dataclass(frozen=True, slots=True)
class BulkConfig:
    """The batching of a bulk route."""

    size: int
    flush_interval: float


def check_bulk(
    bulk_size: int | None,
    bulk_flush_interval: float,
    prefetch_count: int,
    middlewares: Sequence[Middleware],
) -> BulkConfig | None:
    """Validate the bulk options of ``route()``; None for an ordinary route."""
    if bulk_size is None:
        return None
    if isinstance(bulk_size, bool) or not isinstance(bulk_size, int):
        raise TypeError(f"bulk_size must be an int, got {bulk_size!r}")
    if bulk_size < 1:
        raise ValueError(
            f"bulk_size must be >= 1, got {bulk_size}: it is how many messages the handler "
            "receives at most per call (leave it out for a handler of single messages)"
        )
    if bulk_size > prefetch_count:
        raise ValueError(
            f"bulk_size={bulk_size} is larger than the App's prefetch_count={prefetch_count}: "
            "the broker would never deliver a full batch. Raise prefetch_count to at least "
            f"{bulk_size} (App(prefetch_count=...)) or lower bulk_size"
        )
    if (
        isinstance(bulk_flush_interval, bool)
        or not isinstance(bulk_flush_interval, (int, float))
        or not bulk_flush_interval > 0
        or not math.isfinite(bulk_flush_interval)
    ):
        raise ValueError(
            f"bulk_flush_interval must be a finite number of seconds > 0, got "
            f"{bulk_flush_interval!r}: it is how long a partial batch waits for more messages"
        )
    for middleware in middlewares:
        # A middleware declares that it cannot handle a Batch (as Retry does);
        # the core checks the declaration, never the class.
        if not getattr(middleware, "supports_bulk", True):
            name = type(middleware).__name__
            raise TypeError(
                f"{name} does not support bulk routes (it works on one message at a time): "
                "remove it from this route (and from the App's middlewares), or do its job "
                "inside the bulk handler"
            )
    return BulkConfig(size=bulk_size, flush_interval=float(bulk_flush_interval))


class BatchCollector:
    """Buffers the deliveries of one bulk consumer and runs its chain per batch."""

    def __init__(self, consumer: Consumer, config: BulkConfig) -> None:
        self._consumer = consumer
        self._size = config.size
        self._interval = config.flush_interval
        self._deadline = math.inf
        self._lot = trio.lowlevel.ParkingLot()
        self._collecting = False
        #: Batches being handled right now.
        self.running = 0

    def delivery_callback(self, channel: Channel) -> DeliveryCallback:
        """The ``on_delivery`` of ``channel``: buffer, and wake the collector when needed."""
        consumer = self._consumer
        queue = consumer.queue
        vhost = consumer.vhost
        app = consumer.app
        tally = consumer._tally
        pending = consumer._pending
        size = self._size
        lot = self._lot

        def on_delivery(delivery: Delivery) -> None:
            pending.append(
                Message(delivery, queue=queue, vhost=vhost, channel=channel, app=app, tally=tally)
            )
            consumer._received += 1
            count = len(pending)
            if count == 1:
                # The first message of a batch starts its flush timer.
                self._deadline = trio.current_time() + self._interval
                if not self._collecting:
                    self._start_collector()
                else:
                    lot.unpark()
            elif count >= size:
                lot.unpark()

        return on_delivery

    def _start_collector(self) -> None:
        nursery = self._consumer._worker_nursery
        assert nursery is not None
        self._collecting = True
        nursery.start_soon(self._collect, name=f"asyncworker batches {self._consumer.queue!r}")

    async def _collect(self) -> None:
        """Flush full batches at once and partial ones at their deadline; return when idle."""
        pending = self._consumer._pending
        try:
            while True:
                # Messages of a channel that closed were requeued by the broker.
                while pending and not pending[0]._channel.is_open:
                    pending.popleft()._settle_lost()
                if not pending:
                    return
                if len(pending) >= self._size or trio.current_time() >= self._deadline:
                    self._flush()
                    continue
                with trio.move_on_at(self._deadline):
                    await self._lot.park()
        finally:
            self._collecting = False

    def _flush(self) -> None:
        """Take up to ``bulk_size`` buffered messages and start their batch (synchronous)."""
        consumer = self._consumer
        pending = consumer._pending
        count = min(len(pending), self._size)
        batch = Batch(
            (pending.popleft() for _ in range(count)),
            queue=consumer.queue,
            vhost=consumer.vhost,
            collector=self,
        )
        if pending:
            # The rest arrived while this batch filled up: their timer starts now.
            self._deadline = trio.current_time() + self._interval
        # Counted in flight at once, so that the consumer's drain waits for it.
        consumer._in_flight += len(batch)
        self.running += 1
        nursery = consumer._worker_nursery
        assert nursery is not None
        nursery.start_soon(self._run_batch, batch, name=f"asyncworker batch {consumer.queue!r}")

    async def _run_batch(self, batch: Batch) -> None:
        _IN_WORKER.set(True)
        consumer = self._consumer
        try:
            await consumer._chain(cast(Message, batch))
        except Exception:  # pragma: no cover - AckRequeue swallows these
            logger.exception("unexpected error in the chain of bulk queue %r", consumer.queue)
        finally:
            self.running -= 1
            consumer._in_flight -= len(batch)
            # As the consumer's workers do: wake its drain (wait_idle()).
            if consumer._in_flight == 0 and consumer._idle_waiter is not None:
                consumer._idle_waiter.set()
                consumer._idle_waiter = None

    def close(self) -> None:
        """On shutdown, after ``basic.cancel``: flush the partial batch through the handler.

        Synchronous, so that the consumer's drain, which runs right after,
        waits for that last batch like any in-flight message.
        """
        pending = self._consumer._pending
        while pending and not pending[0]._channel.is_open:
            pending.popleft()._settle_lost()
        while pending:
            self._flush()
        self._lot.unpark_all()
