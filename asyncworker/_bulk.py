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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import trio

from ._chain import _IN_WORKER
from ._message import Message, Settlement

if TYPE_CHECKING:
    from ._chain import Middleware
    from ._consumer import Consumer
    from ._transport import Channel, Delivery, DeliveryCallback

__all__ = ["Batch", "BatchCollector", "BulkConfig", "check_bulk"]

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
    from .middlewares.retry import Retry

    for middleware in middlewares:
        if isinstance(middleware, Retry):
            raise TypeError(
                "Retry does not support bulk routes (it retries one message at a time): "
                "remove it from this route (and from the App's middlewares), or retry "
                "failed messages inside the bulk handler"
            )
    return BulkConfig(size=bulk_size, flush_interval=float(bulk_flush_interval))


class Batch(list[Message]):
    """The messages a bulk handler receives: a ``list[Message]`` of one queue.

    Besides being a list, a batch answers the few attributes the settlement
    policy and the standard middlewares read on a message, so that they work
    on bulk routes unchanged:

    * ``queue``, ``vhost``: where every message of the batch came from;
    * ``delivery_tag``: the delivery tag of the last message;
    * ``redelivered``: whether any message was delivered before;
    * ``settled``: whether every message is settled;
    * ``settlement``: the settlement shared by every message, or None while
      any is unsettled or when they were settled differently;
    * ``state``: a dict for middlewares to pass per-batch data along.

    Settle single messages with ``message.ack()`` / ``message.reject()``
    inside the handler; the settlement policy settles the others.
    """

    __slots__ = ("_collector", "queue", "state", "vhost")

    def __init__(
        self,
        messages: Iterable[Message] = (),
        *,
        queue: str,
        vhost: str,
        collector: BatchCollector | None = None,
    ) -> None:
        super().__init__(messages)
        #: The queue of every message in the batch.
        self.queue = queue
        #: Its vhost.
        self.vhost = vhost
        #: A dict for middlewares and handlers to pass per-batch data along.
        self.state: dict[str, Any] = {}
        self._collector = collector

    def __repr__(self) -> str:
        return f"<Batch queue={self.queue!r} vhost={self.vhost!r} size={len(self)}>"

    @property
    def delivery_tag(self) -> int:
        """The delivery tag of the last message (0 for an empty batch)."""
        return self[-1].delivery_tag if self else 0

    @property
    def redelivered(self) -> bool:
        """Whether any message of the batch was delivered before."""
        return any(message.redelivered for message in self)

    @property
    def settled(self) -> bool:
        """Whether every message of the batch is settled."""
        return all(message.settled for message in self)

    @property
    def settlement(self) -> Settlement | None:
        """The settlement shared by every message; None if any is unsettled or they differ."""
        kinds = {message.settlement for message in self}
        return kinds.pop() if len(kinds) == 1 else None

    def outcomes(self) -> dict[str, int]:
        """How many messages were settled each way (``"unsettled"`` for the others)."""
        counts: dict[str, int] = {}
        for message in self:
            key = message.settlement.value if message.settlement is not None else "unsettled"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _settle(self, how: Settlement) -> bool:
        """Settle every message not settled yet with ``how``; True if any was."""
        if how is Settlement.ACK and self._ack_all_at_once():
            return True
        done = False
        for message in self:
            done = message._settle(how) or done
        return done

    def _ack_all_at_once(self) -> bool:
        """The ``basic.ack(multiple=True)`` fast path; False when it does not apply.

        Safe only when every unacknowledged delivery of the channel up to the
        last tag is in this batch: all messages unsettled, on one open channel,
        with consecutive tags, and no other batch of the consumer in flight
        (earlier batches were settled in full by the settlement policy, and the
        buffered messages have higher tags).
        """
        collector = self._collector
        if collector is None or collector._running != 1 or len(self) < 2:
            return False
        first = self[0]
        channel = first._channel
        if not channel.is_open:
            return False
        if self[-1].delivery_tag - first.delivery_tag != len(self) - 1:
            return False
        for message in self:
            if message._settlement is not None or message._channel is not channel:
                return False
        channel.ack(self[-1].delivery_tag, True)
        for message in self:
            message._settlement = Settlement.ACK
        first._tally.acked += len(self)
        return True


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
        self._running = 0

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
        self._running += 1
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
            self._running -= 1
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
