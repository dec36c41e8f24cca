"""One consumer per (vhost, queue): the subscription, across reconnections.

A ``Consumer`` opens its channel, sets ``basic.qos(prefetch_count)`` (the
route's own, or the App's), registers ``basic.consume`` and, on shutdown,
drains: ``basic.cancel``, requeue what has not started, wait for in-flight
handlers, fence their settlements (one ``basic.get``: a quorum queue may
otherwise drop acks sent right before a close), close the channel.  What
happens to each delivery is its dispatcher's job (``_dispatch``: the parked
worker pool, or the batch collector of a bulk route); the consumer reads the
dispatcher's intake for its statistics and its drain.

Declaring its queue is the supervisor's job (``_declare``), before the
consumer starts; the consumer only declares it again (with its bindings)
when it finds it missing while the connection is up (deleted while the App
runs), through the ``redeclare`` callable it is handed.

It is handed narrow values, never the App: a stop event, a callback for a
broker-side cancellation, the route's name and options.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ._chain import BulkHandler, Handler, build_chain
from ._dispatch import BatchCollector, Dispatcher, Intake, WorkerPool
from ._exceptions import AsyncWorkerError, ChannelClosed, ConnectionClosed, QueueNotFound
from ._statistics import ConsumerStatistics
from ._util import sleep_unless, wait_first

if TYPE_CHECKING:
    from ._message import AppHandle
    from ._transports import Channel, Connection

__all__ = ["Consumer", "consumers_for"]

logger = logging.getLogger("asyncworker")

#: Bounds of the delay between attempts to consume a queue that is missing.
_MISSING_QUEUE_RETRY = (1.0, 30.0)
#: How long the drain waits for its fence (``Consumer._fence``) before closing anyway.
_FENCE_TIMEOUT = 10.0


class Consumer:
    """Consumes one queue for one route, across reconnections."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        route: str,
        prefetch: int,
        redeclare: Callable[[Connection], Awaitable[None]] | None,
        stop: trio.Event,
        on_cancelled: Callable[[str], None],
    ) -> None:
        self._dispatcher = dispatcher
        self._intake = intake = dispatcher.intake
        self.queue = intake.queue
        self.vhost = intake.vhost
        self.route = route
        self._prefetch = prefetch
        self._redeclare = redeclare
        # Set once the queue was found missing (or the broker cancelled us):
        # the next subscription declares it again first, if we can.
        self._missing = False
        self._stop = stop
        self._on_cancelled = on_cancelled
        self._consumer_tag: str | None = None
        self._problem: str | None = "not started"
        self._wake: trio.Event | None = None
        # Deliveries counted when the current subscription began: a drain
        # fences its settlements only if this channel received any.
        self._received_before = 0

    @property
    def in_flight(self) -> int:
        """Messages being handled right now."""
        return self._intake.in_flight

    async def wait_idle(self) -> None:
        """Return once no handler of this consumer is running."""
        await self._intake.wait_idle()

    def hold(self, reason: str) -> None:
        """The supervisor does not start this consumer yet (its queue could not be declared)."""
        self._problem = f"queue {self.queue!r} not consumed: {reason}"

    # -- lifecycle ---------------------------------------------------------

    async def run(
        self,
        connection: Connection,
        worker_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume on ``connection`` until it closes or the App stops.

        Reports started once ``basic.consume`` is registered, or once the queue
        was found missing (it then keeps trying in the background, so that one
        missing queue never holds up the others).
        """
        self._dispatcher.bind(worker_nursery)
        delay = _MISSING_QUEUE_RETRY[0]
        started = False
        stop = self._stop
        while connection.is_open and not stop.is_set():
            try:
                channel = await self._subscribe(connection)
            except QueueNotFound as exc:
                self._missing = True
                self._problem = f"queue {self.queue!r} not found in vhost {self.vhost!r}"
                logger.error(
                    "cannot consume queue %r in vhost %r: it does not exist (%s); the other "
                    "queues go on, and this one is retried in %.0f s (use "
                    "route(..., declare=True) or a Queue(...) to declare it)",
                    self.queue,
                    self.vhost,
                    exc.reply_text,
                    delay,
                )
                if not started:
                    task_status.started()
                    started = True
                await sleep_unless(stop, delay)
                delay = min(delay * 2, _MISSING_QUEUE_RETRY[1])
                continue
            except (ChannelClosed, ConnectionClosed) as exc:
                self._problem = str(exc)
                if not started:
                    task_status.started()
                    started = True
                if not connection.is_open:
                    # The supervisor reconnects, then runs us again.  (mypy keeps
                    # is_open narrowed to True from the loop's test across the
                    # awaits, where the connection may well have closed.)
                    return  # type: ignore[unreachable]
                # A channel error on a live connection (406 PRECONDITION_FAILED
                # from declare=True on a queue with other arguments, 403, ...):
                # returning would leave the queue without a consumer until the
                # next reconnection, so retry it like a missing queue.
                logger.error(
                    "cannot consume queue %r in vhost %r: %s; the other queues go on, and "
                    "this one is retried in %.0f s",
                    self.queue,
                    self.vhost,
                    exc,
                    delay,
                )
                await sleep_unless(stop, delay)
                delay = min(delay * 2, _MISSING_QUEUE_RETRY[1])
                continue
            delay = _MISSING_QUEUE_RETRY[0]
            self._problem = None
            if not started:
                task_status.started()
                started = True
            cancelled_by_broker = await self._consume_until_woken(channel)
            if stop.is_set():
                await self._stop_consuming(channel)
                return
            if cancelled_by_broker:
                logger.warning(
                    "the broker cancelled the consumer of queue %r in vhost %r (queue "
                    "deleted?); consuming it again as soon as it exists",
                    self.queue,
                    self.vhost,
                )
                self._problem = f"consumer of queue {self.queue!r} cancelled by the broker"
                self._missing = True
                self._on_cancelled(self.queue)
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await channel.close()
                continue
        if not started:
            task_status.started()

    async def _subscribe(self, connection: Connection) -> Channel:
        if self._missing and self._redeclare is not None:
            await self._redeclare(connection)
            self._missing = False
        channel = await connection.channel()
        try:
            await channel.qos(self._prefetch)
            self._wake = trio.Event()
            self._received_before = self._intake.received
            self._consumer_tag = await channel.consume(
                self.queue, self._dispatcher.delivery_callback(channel), self._on_cancel
            )
        except BaseException:
            if channel.is_open:
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await channel.close()
            raise
        logger.info(
            "consuming queue %r in vhost %r (prefetch %d)", self.queue, self.vhost, self._prefetch
        )
        return channel

    def _on_cancel(self, consumer_tag: str) -> None:
        if consumer_tag == self._consumer_tag and self._wake is not None:
            self._consumer_tag = None
            self._wake.set()

    async def _consume_until_woken(self, channel: Channel) -> bool:
        """Wait until the channel closes, the broker cancels us, or the App stops.

        Returns True if the broker cancelled the consumer.
        """
        wake = self._wake
        assert wake is not None
        await wait_first(channel.wait_closed, self._stop.wait, wake.wait)
        if not channel.is_open:
            reason = channel.close_reason
            self._problem = f"channel closed: {reason}"
            self._consumer_tag = None
            # Messages waiting for a worker belong to the dead channel: the
            # broker requeued them; drop them (workers skip them too).
            self._intake.drop_lost()
            return False
        return self._consumer_tag is None

    async def _stop_consuming(self, channel: Channel) -> None:
        """Graceful drain: cancel the consumer, requeue what has not started,
        wait for in-flight handlers (the App enforces the grace period by
        cancelling the workers), fence their settlements (``_fence``), then
        close the channel."""
        self._problem = "stopping"
        with trio.CancelScope(shield=True):
            tag = self._consumer_tag
            self._consumer_tag = None
            if tag is not None and channel.is_open:
                with trio.move_on_after(5):
                    try:
                        await channel.cancel(tag)
                    except AsyncWorkerError as exc:
                        logger.debug("basic.cancel of queue %r failed: %s", self.queue, exc)
            # Idle workers retire; a bulk route's partial batch goes through its handler.
            self._dispatcher.drain()
            # Deliveries that arrived but never started go back to the queue.
            self._intake.requeue_pending()
        await self._intake.wait_idle()
        with trio.CancelScope(shield=True):
            if self._intake.received > self._received_before and channel.is_open:
                with trio.move_on_after(_FENCE_TIMEOUT):
                    await self._fence(channel)
            with trio.move_on_after(5):
                try:
                    await channel.close()
                except AsyncWorkerError as exc:
                    logger.debug("closing the channel of queue %r failed: %s", self.queue, exc)
        self._problem = "stopped"

    async def _fence(self, channel: Channel) -> None:
        """Return once the queue has recorded every settlement sent on ``channel``.

        A quorum queue turns each ack into a Raft command; once 32 are
        unconfirmed, RabbitMQ holds the rest inside the channel, and a
        ``channel.close`` right after the last ack throws the held ones away:
        those messages come back and run twice (RabbitMQ issue #10327, open;
        a burst of handlers finishing after the cancel is exactly the end of
        a drain).  A ``basic.get`` on the same channel is a command of the
        queue's log too, answered only once everything before it is recorded.
        Measured, neither a ``basic.qos`` round trip (it proves the channel
        read the acks, not that the queue recorded them) nor a pause is
        enough under load; see docs/cluster.md.

        A message the get returns is left unacknowledged: the close right
        after returns it to the queue, marked redelivered (at most one per
        drain).  Harmless on a classic queue, where one round trip is the
        whole cost.
        """
        try:
            await channel.get(self.queue, no_ack=False)
        except AsyncWorkerError as exc:
            # A deleted queue (404), a queue without a leader (541), a lost
            # connection: nothing left to fence, or nothing can be done.
            logger.debug("the drain's fence on queue %r failed: %s", self.queue, exc)

    def statistics(self) -> ConsumerStatistics:
        """A snapshot of this consumer's state and counters."""
        intake = self._intake
        tally = intake.tally
        return ConsumerStatistics(
            queue=self.queue,
            vhost=self.vhost,
            consuming=self._consumer_tag is not None,
            received=intake.received,
            in_flight=intake.in_flight,
            waiting=len(intake.pending),
            workers=self._dispatcher.workers,
            acked=tally.acked,
            requeued=tally.requeued,
            rejected=tally.rejected,
            lost=tally.lost,
            problem=self._problem,
            route=self.route,
        )


def consumers_for(
    queues: Sequence[str],
    vhost: str,
    handler: Callable[[Any], Awaitable[Any]],
    layers: Sequence[Callable[[Any, Any], Awaitable[Any]]],
    *,
    app: AppHandle,
    route: str,
    prefetch: int,
    redeclare: Callable[[str], Callable[[Connection], Awaitable[None]] | None],
    bulk: tuple[int, float] | None,
    stop: trio.Event,
    on_cancelled: Callable[[str], None],
) -> list[Consumer]:
    """One consumer per queue of a route, each with its dispatcher and the route's chain.

    ``layers`` wrap ``handler``, the first outermost (the settlement policy);
    ``bulk`` is ``(bulk_size, bulk_flush_interval)`` on a bulk route;
    ``redeclare(queue)`` is what declares a queue again once it is found
    missing (None for a queue the App does not declare).
    """
    consumers = []
    for queue in queues:
        intake = Intake(queue, vhost, app)
        dispatcher: Dispatcher
        if bulk is None:
            message_handler: Handler = handler
            dispatcher = WorkerPool(intake, build_chain(message_handler, layers), prefetch)
        else:
            batch_handler: BulkHandler = handler
            chain = build_chain(batch_handler, layers)
            dispatcher = BatchCollector(intake, chain, *bulk)
        consumers.append(
            Consumer(
                dispatcher,
                route=route,
                prefetch=prefetch,
                redeclare=redeclare(queue),
                stop=stop,
                on_cancelled=on_cancelled,
            )
        )
    return consumers
