"""One consumer per (vhost, queue): channel, qos, limiter, hand-off, drain.

The hot path, and why it looks the way it does:

* The transport calls ``_on_delivery`` from its reader task for every
  delivery.  It must never block (it would stall every channel of the
  connection, heartbeats included), so it only wraps the delivery in a
  ``Message``, appends it to a deque and wakes a worker.
* Handlers run in *worker tasks*, each holding one token of the consumer's
  ``trio.CapacityLimiter(prefetch_count)``.  Workers are started on demand
  (when a message arrives and no worker is idle) and retire after
  ``_IDLE_SECONDS`` without work (a reaper task per consumer retires them, so
  that waiting for work costs no cancel scope).  Starting a task per message costs about
  four times more CPU than handing the message to a parked worker, so at
  most ``prefetch_count`` long-lived workers do the job; the limiter is the
  bound, and the broker's ``basic.qos(prefetch_count)`` guarantees a
  delivered message always finds a worker (or a free token to start one).
* Workers live in a nursery that outlives a connection: after a connection
  drops, in-flight handlers finish, their settlement is skipped (it belongs to
  the dead channel; the broker redelivers) and messages that had not started
  are dropped for the same reason.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ._bulk import BatchCollector
from ._chain import _IN_WORKER
from ._exceptions import AsyncWorkerError, ChannelClosed, ConnectionClosed, QueueNotFound
from ._message import Message, _Tally
from ._statistics import ConsumerStatistics
from ._util import sleep_unless, wait_first

if TYPE_CHECKING:
    from ._app import App, _Route
    from ._chain import CallNext
    from ._transports import Channel, Connection, Delivery

__all__ = ["Consumer"]

logger = logging.getLogger("asyncworker")

#: A worker parked for a whole period this long returns its limiter token.
_IDLE_SECONDS = 10.0
#: Bounds of the delay between attempts to consume a queue that is missing.
_MISSING_QUEUE_RETRY = (1.0, 30.0)


class Consumer:
    """Consumes one queue for one route, across reconnections."""

    def __init__(self, app: App, route: _Route, queue: str, chain: CallNext) -> None:
        self.app = app
        self.route = route
        self.queue = queue
        self.vhost = route.vhost
        self._chain = chain
        self._prefetch = app.prefetch_count
        self._limiter = trio.CapacityLimiter(self._prefetch)
        self._pending: collections.deque[Message] = collections.deque()
        # Idle workers, the most recently parked last: a delivery wakes the
        # one that ran last (its code and data are still in the CPU's caches)
        # and the reaper retires those that stayed idle longest.
        self._parked: list[trio.lowlevel.Task] = []
        self._workers = 0
        self._in_flight = 0
        self._received = 0
        self._tally = _Tally()
        self._idle_waiter: trio.Event | None = None
        self._min_parked = 0
        self._retire = 0
        self._reaping = False
        self._closing = False
        self._consumer_tag: str | None = None
        self._problem: str | None = "not started"
        self._worker_nursery: trio.Nursery | None = None
        self._wake: trio.Event | None = None
        # Bulk routes hand their deliveries to a collector instead of the workers.
        self._bulk = None if route.bulk is None else BatchCollector(self, route.bulk)

    # -- hot path --------------------------------------------------------

    def _delivery_callback(self, channel: Channel) -> Callable[[Delivery], None]:
        if self._bulk is not None:
            return self._bulk.delivery_callback(channel)
        queue = self.queue
        vhost = self.vhost
        app = self.app
        tally = self._tally
        pending = self._pending
        parked = self._parked
        reschedule = trio.lowlevel.reschedule

        def on_delivery(delivery: Delivery) -> None:
            pending.append(
                Message(delivery, queue=queue, vhost=vhost, channel=channel, app=app, tally=tally)
            )
            self._received += 1
            if parked:
                reschedule(parked.pop())
                if len(parked) < self._min_parked:
                    self._min_parked = len(parked)
            elif self._workers < self._prefetch:
                self._start_worker()

        return on_delivery

    def _start_worker(self) -> None:
        nursery = self._worker_nursery
        assert nursery is not None
        self._workers += 1
        nursery.start_soon(self._worker, name=f"asyncworker worker {self.queue!r}")
        if not self._reaping:
            self._reaping = True
            nursery.start_soon(self._reaper, name=f"asyncworker reaper {self.queue!r}")

    async def _worker(self) -> None:
        _IN_WORKER.set(True)
        token = object()
        self._limiter.acquire_on_behalf_of_nowait(token)
        pending = self._pending
        chain = self._chain
        parked = self._parked
        task = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            parked.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            while True:
                while pending:
                    message = pending.popleft()
                    if not message._channel.is_open:
                        # Not started and its channel is gone: the broker has
                        # put it back in the queue already.
                        message._settle_lost()
                        continue
                    self._in_flight += 1
                    try:
                        await chain(message)
                    except Exception:  # pragma: no cover - AckRequeue swallows these
                        logger.exception("unexpected error in the chain of queue %r", self.queue)
                    finally:
                        self._in_flight -= 1
                        if self._in_flight == 0 and self._idle_waiter is not None:
                            self._idle_waiter.set()
                            self._idle_waiter = None
                if self._closing:
                    return
                if self._retire:
                    self._retire -= 1
                    return
                # No deadline here: a cancel scope per wait would cost more
                # than the rest of the hand-off; the reaper retires idle workers.
                parked.append(task)
                await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._workers -= 1
            self._limiter.release_on_behalf_of(token)

    def _wake_parked(self, count: int) -> None:
        """Wake the ``count`` workers that have been parked the longest."""
        woken = self._parked[:count]
        del self._parked[:count]
        for task in woken:
            trio.lowlevel.reschedule(task)

    async def _reaper(self) -> None:
        """Retire the workers that stayed parked for a whole ``_IDLE_SECONDS``."""
        try:
            while self._workers:
                self._min_parked = len(self._parked)
                await trio.sleep(_IDLE_SECONDS)
                idle = min(self._min_parked, len(self._parked))
                if idle:
                    self._retire += idle
                    self._wake_parked(idle)
        finally:
            self._reaping = False

    async def wait_idle(self) -> None:
        """Return once no handler of this consumer is running."""
        if self._in_flight:
            if self._idle_waiter is None:
                self._idle_waiter = trio.Event()
            await self._idle_waiter.wait()

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
        self._worker_nursery = worker_nursery
        delay = _MISSING_QUEUE_RETRY[0]
        started = False
        stop = self.app._stop_event
        while connection.is_open and not stop.is_set():
            try:
                channel = await self._subscribe(connection)
            except QueueNotFound as exc:
                self._problem = f"queue {self.queue!r} not found in vhost {self.vhost!r}"
                logger.error(
                    "cannot consume queue %r in vhost %r: it does not exist (%s); the other "
                    "queues go on, and this one is retried in %.0f s (use "
                    "route(..., declare=True) to declare it)",
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
                    return  # the supervisor reconnects, then runs us again
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
                self.app._report("consumer_cancelled", self.vhost, self.queue, None)
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await channel.close()
                continue
        if not started:
            task_status.started()

    async def _subscribe(self, connection: Connection) -> Channel:
        channel = await connection.channel()
        try:
            await channel.qos(self._prefetch)
            if self.route.declare:
                await channel.queue_declare(self.queue, durable=True)
            self._wake = trio.Event()
            self._consumer_tag = await channel.consume(
                self.queue, self._delivery_callback(channel), self._on_cancel
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
        await wait_first(channel.wait_closed, self.app._stop_event.wait, wake.wait)
        if not channel.is_open:
            reason = channel.close_reason
            self._problem = f"channel closed: {reason}"
            self._consumer_tag = None
            # Messages waiting for a worker belong to the dead channel: the
            # broker requeued them; drop them (workers skip them too).
            while self._pending and not self._pending[0]._channel.is_open:
                self._pending.popleft()._settle_lost()
            return False
        return self._consumer_tag is None

    async def _stop_consuming(self, channel: Channel) -> None:
        """Graceful drain: cancel the consumer, requeue what has not started,
        wait for in-flight handlers (the App enforces the grace period by
        cancelling the workers), then close the channel."""
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
            self._closing = True
            if self._bulk is not None:
                # A bulk route's partial batch goes through its handler.
                self._bulk.close()
            # Deliveries that arrived but never started go back to the queue.
            while self._pending:
                self._pending.popleft()._settle_requeue()
            self._wake_parked(len(self._parked))
        await self.wait_idle()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await channel.close()
            except AsyncWorkerError as exc:
                logger.debug("closing the channel of queue %r failed: %s", self.queue, exc)
        self._problem = "stopped"

    def statistics(self) -> ConsumerStatistics:
        """A snapshot of this consumer's state and counters."""
        tally = self._tally
        return ConsumerStatistics(
            queue=self.queue,
            vhost=self.vhost,
            consuming=self._consumer_tag is not None,
            received=self._received,
            in_flight=self._in_flight,
            waiting=len(self._pending),
            workers=self._workers,
            acked=tally.acked,
            requeued=tally.requeued,
            rejected=tally.rejected,
            lost=tally.lost,
            problem=self._problem,
            route=self.route.name,
        )
