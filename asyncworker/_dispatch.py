"""The hand-off from a consumer to its handlers: a dispatcher, with two strategies.

A ``Consumer`` owns the subscription (channel, qos, consume, cancel, drain);
what happens to a delivery is its dispatcher's job.  Both dispatchers share
one ``Intake``: the deque of messages delivered and not started, the
settlement tallies, the received and in-flight counts, and the event that
wakes a drain waiting for the last handler.  The consumer's statistics, its
drop of messages of a dead channel and its drain read the intake, whichever
strategy runs.

* ``WorkerPool`` (ordinary routes): handlers run in *worker tasks*, each
  holding one token of a ``trio.CapacityLimiter(prefetch_count)``.  Workers
  are started on demand (when a message arrives and no worker is idle) and
  retire after ``_IDLE_SECONDS`` without work.  Starting a task per message
  costs about four times more CPU than handing the message to a parked
  worker, so at most ``prefetch_count`` long-lived workers do the job; the
  limiter is the bound, and the broker's ``basic.qos(prefetch_count)``
  guarantees a delivered message always finds a worker (or a free token to
  start one).  Idle workers park LIFO, without a ``ParkingLot``: a delivery
  wakes the one that ran last (its code and data are still in the CPU's
  caches), and a reaper task retires those that stayed idle longest, so that
  waiting for work costs no cancel scope.
* ``BatchCollector`` (bulk routes): the intake's deque is the batch being
  filled; the chain runs once per batch, as soon as ``bulk_size`` messages
  are buffered or ``bulk_flush_interval`` seconds after the *first* message
  of a partial batch arrived (not on a free-running clock, so no message
  waits longer than the interval).  Each batch runs in its own task in the
  worker nursery, so the next batch keeps filling while one is handled; the
  broker's ``prefetch_count`` (>= ``bulk_size``, checked at registration)
  bounds how many messages are buffered or handled at once.

Workers live in a nursery that outlives a connection: after a connection
drops, in-flight handlers finish, their settlement is skipped (it belongs to
the dead channel; the broker redelivers) and messages that had not started
are dropped for the same reason.  The transport calls ``on_delivery`` from
its reader task; it must never block (it would stall every channel of the
connection, heartbeats included), so it only wraps the delivery in a
``Message``, appends it to the deque and wakes a worker.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ._chain import _IN_WORKER
from ._message import AppHandle, Batch, Message, _Tally

if TYPE_CHECKING:
    from ._transports import Channel, Delivery, DeliveryCallback

__all__ = ["BatchCollector", "Dispatcher", "Intake", "WorkerPool"]

logger = logging.getLogger("asyncworker")

#: A worker parked for a whole period this long returns its limiter token.
_IDLE_SECONDS = 10.0


class Intake:
    """What a consumer's dispatcher shares with the consumer: one per consumer."""

    __slots__ = (
        "app",
        "idle_waiter",
        "in_flight",
        "pending",
        "queue",
        "received",
        "tally",
        "vhost",
    )

    def __init__(self, queue: str, vhost: str, app: AppHandle | None) -> None:
        self.queue = queue
        self.vhost = vhost
        #: The App the messages are handed (``message.app``).
        self.app = app
        #: Messages delivered and not started, oldest first.
        self.pending: collections.deque[Message] = collections.deque()
        self.tally = _Tally()
        self.received = 0
        #: Messages being handled (a batch counts each of its messages).
        self.in_flight = 0
        #: Set (and dropped) when ``in_flight`` falls to 0, while a drain waits.
        self.idle_waiter: trio.Event | None = None

    def finished(self, count: int) -> None:
        """``count`` messages are no longer in flight."""
        self.in_flight -= count
        if self.in_flight == 0 and self.idle_waiter is not None:
            self.idle_waiter.set()
            self.idle_waiter = None

    async def wait_idle(self) -> None:
        """Return once no message of this consumer is being handled."""
        if self.in_flight:
            if self.idle_waiter is None:
                self.idle_waiter = trio.Event()
            await self.idle_waiter.wait()

    def drop_lost(self) -> None:
        """Drop the waiting messages of a channel that closed: the broker requeued them."""
        # Messages the dispatcher never started are settled here, through the
        # package-internal side of Message (its channel, its lost/requeue marks).
        pending = self.pending
        while pending and not pending[0]._channel.is_open:  # noqa: SLF001
            pending.popleft()._settle_lost()  # noqa: SLF001

    def requeue_pending(self) -> None:
        """On a drain: every message that never started goes back to its queue."""
        pending = self.pending
        while pending:
            pending.popleft()._settle_requeue()  # noqa: SLF001 (see drop_lost)


class Dispatcher(Protocol):
    """How a consumer hands its deliveries to the route's chain."""

    @property
    def intake(self) -> Intake:
        """The deque, tallies and counts shared with the consumer."""
        ...

    @property
    def workers(self) -> int:
        """Tasks alive that run the chain (worker tasks, or batches in flight)."""
        ...

    def bind(self, nursery: trio.Nursery) -> None:
        """Run handlers in ``nursery`` from now on (it outlives a connection)."""
        ...

    def delivery_callback(self, channel: Channel) -> DeliveryCallback:
        """The ``on_delivery`` of a subscription on ``channel``."""
        ...

    def drain(self) -> None:
        """On shutdown, after ``basic.cancel``: start what is buffered, or release idle tasks.

        Synchronous, so that the consumer's drain, which runs right after,
        waits for what it started like any in-flight message.
        """
        ...


class WorkerPool:
    """Parked worker tasks, started on demand, bounded by ``prefetch_count``."""

    def __init__(self, intake: Intake, chain: Callable[[Message], Awaitable[Any]], prefetch: int):
        self.intake = intake
        self._chain = chain
        self._prefetch = prefetch
        self._limiter = trio.CapacityLimiter(prefetch)
        # Idle workers, the most recently parked last: a delivery wakes the
        # one that ran last and the reaper retires those idle longest.
        self._parked: list[trio.lowlevel.Task] = []
        self.workers = 0
        self._min_parked = 0
        self._retire = 0
        self._reaping = False
        self._closing = False
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- hot path --------------------------------------------------------

    def delivery_callback(self, channel: Channel) -> Callable[[Delivery], None]:
        intake = self.intake
        queue = intake.queue
        vhost = intake.vhost
        app = intake.app
        tally = intake.tally
        pending = intake.pending
        parked = self._parked
        reschedule = trio.lowlevel.reschedule

        def on_delivery(delivery: Delivery) -> None:
            pending.append(
                Message(delivery, queue=queue, vhost=vhost, channel=channel, app=app, tally=tally)
            )
            intake.received += 1
            if parked:
                reschedule(parked.pop())
                if len(parked) < self._min_parked:
                    self._min_parked = len(parked)
            elif self.workers < self._prefetch:
                self._start_worker()

        return on_delivery

    def _start_worker(self) -> None:
        nursery = self._nursery
        assert nursery is not None
        queue = self.intake.queue
        self.workers += 1
        nursery.start_soon(self._worker, name=f"asyncworker worker {queue!r}")
        if not self._reaping:
            self._reaping = True
            nursery.start_soon(self._reaper, name=f"asyncworker reaper {queue!r}")

    async def _worker(self) -> None:
        _IN_WORKER.set(True)
        token = object()
        self._limiter.acquire_on_behalf_of_nowait(token)
        intake = self.intake
        pending = intake.pending
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
                    if not message._channel.is_open:  # noqa: SLF001 (see Intake.drop_lost)
                        # Not started and its channel is gone: the broker has
                        # put it back in the queue already.
                        message._settle_lost()  # noqa: SLF001
                        continue
                    intake.in_flight += 1
                    try:
                        await chain(message)
                    except Exception:  # pragma: no cover - AckRequeue swallows these
                        logger.exception("unexpected error in the chain of queue %r", intake.queue)
                    finally:
                        intake.in_flight -= 1
                        if intake.in_flight == 0 and intake.idle_waiter is not None:
                            intake.idle_waiter.set()
                            intake.idle_waiter = None
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
            self.workers -= 1
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
            while self.workers:
                self._min_parked = len(self._parked)
                await trio.sleep(_IDLE_SECONDS)
                idle = min(self._min_parked, len(self._parked))
                if idle:
                    self._retire += idle
                    self._wake_parked(idle)
        finally:
            self._reaping = False

    def drain(self) -> None:
        # Parked workers see no work left and the closing flag: they return.
        self._closing = True
        self._wake_parked(len(self._parked))


class BatchCollector:
    """Buffers the deliveries of one bulk consumer and runs its chain per batch."""

    def __init__(
        self,
        intake: Intake,
        chain: Callable[[Batch], Awaitable[Any]],
        size: int,
        flush_interval: float,
    ) -> None:
        self.intake = intake
        self._chain = chain
        self._size = size
        self._interval = flush_interval
        self._deadline = math.inf
        self._lot = trio.lowlevel.ParkingLot()
        self._collecting = False
        self._nursery: trio.Nursery | None = None
        #: Batches being handled right now (a ``Batch`` reads it for its fast path).
        self.running = 0

    @property
    def workers(self) -> int:
        return self.running

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def delivery_callback(self, channel: Channel) -> Callable[[Delivery], None]:
        # The same bindings as the pool's, inlined: a shared helper would cost
        # a call per delivery.
        intake = self.intake
        queue = intake.queue
        vhost = intake.vhost
        app = intake.app
        tally = intake.tally
        pending = intake.pending
        size = self._size
        lot = self._lot

        def on_delivery(delivery: Delivery) -> None:
            pending.append(
                Message(delivery, queue=queue, vhost=vhost, channel=channel, app=app, tally=tally)
            )
            intake.received += 1
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
        nursery = self._nursery
        assert nursery is not None
        self._collecting = True
        nursery.start_soon(self._collect, name=f"asyncworker batches {self.intake.queue!r}")

    async def _collect(self) -> None:
        """Flush full batches at once and partial ones at their deadline; return when idle."""
        intake = self.intake
        pending = intake.pending
        try:
            while True:
                # Messages of a channel that closed were requeued by the broker.
                intake.drop_lost()
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
        intake = self.intake
        pending = intake.pending
        count = min(len(pending), self._size)
        batch = Batch(
            (pending.popleft() for _ in range(count)),
            queue=intake.queue,
            vhost=intake.vhost,
            collector=self,
        )
        if pending:
            # The rest arrived while this batch filled up: their timer starts now.
            self._deadline = trio.current_time() + self._interval
        # Counted in flight at once, so that the consumer's drain waits for it.
        intake.in_flight += len(batch)
        self.running += 1
        nursery = self._nursery
        assert nursery is not None
        nursery.start_soon(self._run_batch, batch, name=f"asyncworker batch {intake.queue!r}")

    async def _run_batch(self, batch: Batch) -> None:
        _IN_WORKER.set(True)
        try:
            await self._chain(batch)
        except Exception:  # pragma: no cover - AckRequeue swallows these
            logger.exception("unexpected error in the chain of bulk queue %r", self.intake.queue)
        finally:
            self.running -= 1
            # As the pool's workers do: wake the consumer's drain (wait_idle()).
            self.intake.finished(len(batch))

    def drain(self) -> None:
        # A bulk route's partial batch goes through its handler.
        self.intake.drop_lost()
        while self.intake.pending:
            self._flush()
        self._lot.unpark_all()
