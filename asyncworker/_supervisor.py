"""Connection supervision, one supervisor per vhost: backoff, events, re-registration.

``Backoff`` paces reconnection attempts; ``ConnectionEvent`` is what the
``on_connection_event`` callback of an App receives; a ``Supervisor`` keeps
one vhost's connection open and its consumers registered on it.  This is
where connection failover lands (several nodes per URL: the supervisor picks
the next node of the list on each attempt, and names the node in its events).
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ._declare import Declarer, Step
from ._exceptions import ChannelClosed, ConnectError, ConnectionClosed, TopologyError
from ._util import sleep_unless, wait_first

if TYPE_CHECKING:
    from ._consumer import Consumer
    from ._transports import Connection, ConnectionParams

__all__ = ["Backoff", "ConnectionEvent", "Supervisor", "report_event"]

logger = logging.getLogger("asyncworker")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between reconnection attempts: exponential, capped, with jitter.

    The n-th attempt (from 0) waits ``min(initial * factor**n, maximum)``
    seconds, multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` so
    that a fleet of workers does not reconnect in lockstep.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(
                "Backoff needs 0 < initial <= maximum, factor >= 1 and 0 <= jitter < 1 "
                f"(got {self})"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt number ``attempt`` (from 0)."""
        base = min(self.initial * self.factor ** min(attempt, 64), self.maximum)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """What the ``on_connection_event`` callback of an App receives.

    ``kind`` is one of ``"connected"`` (first connection of a vhost),
    ``"lost"`` (the connection or its channel died; ``error`` says why),
    ``"reconnect_failed"`` (one attempt failed; ``error`` says why),
    ``"recovered"`` (connected again, consumers re-registered) and
    ``"consumer_cancelled"`` (the broker cancelled the consumer of ``queue``,
    usually because the queue was deleted).
    """

    kind: str
    vhost: str
    queue: str | None = None
    error: BaseException | None = None


class Supervisor:
    """Keeps one connection to a vhost open and its consumers registered.

    One per vhost an App consumes, kept across ``serve()`` calls (its
    ``reconnects`` count is "since the App started").  ``run()`` holds the
    worker nursery, which outlives each connection so that in-flight
    handlers finish when their connection drops; reconnects with the
    App's ``Backoff``; reports each failure and recovery through ``report``;
    and once the App stops, waits for the consumers to drain.

    It is handed narrow values, never the App: the stop event, the
    ``report`` callback, the set of cancel scopes the App's grace timer
    cancels, and ``on_drained`` (the publisher closes that vhost's
    publishing connection then).
    """

    def __init__(
        self,
        vhost: str,
        *,
        report: Callable[[ConnectionEvent], None],
        worker_scopes: set[trio.CancelScope],
    ) -> None:
        self.vhost = vhost
        self._report = report
        self._worker_scopes = worker_scopes
        #: Reconnections since the App started.
        self.reconnects = 0
        #: The open connection, if any.
        self.connection: Connection | None = None
        #: While ``run()`` runs: set while connected, replaced by a fresh one on loss.
        self.connected: trio.Event | None = None

    @property
    def is_connected(self) -> bool:
        """Whether the vhost's connection is open right now."""
        return self.connection is not None and self.connection.is_open

    def _reset_connected(self) -> trio.Event:
        event = self.connected
        if event is None or event.is_set():
            event = self.connected = trio.Event()
        return event

    async def run(
        self,
        params: ConnectionParams,
        consumers: Sequence[Consumer],
        *,
        connector: Callable[[ConnectionParams], AbstractAsyncContextManager[Connection]],
        backoff: Backoff,
        stop: trio.Event,
        on_drained: Callable[[str], Awaitable[None]],
        declarer: Declarer | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the connection open until ``stop``; then drain the consumers and return.

        On every connection, ``declarer`` (the vhost's topology) declares
        first, then the consumers start.  Reports started once the topology
        is declared and every consumer is registered on the first connection.
        A failure of that first connection raises ``ConnectError`` (the App
        does not start), a refused declaration ``TopologyError``; later ones
        are retried, a refused declaration holding back only the consumer of
        its queue.
        """
        try:
            vhost = self.vhost
            connected = self.connected = trio.Event()
            first = True
            attempt = 0
            # Handlers run in this nursery, which outlives each connection so that
            # in-flight handlers finish when their connection drops.
            async with trio.open_nursery() as workers:
                self._worker_scopes.add(workers.cancel_scope)
                while not stop.is_set():
                    try:
                        async with connector(params) as connection:
                            self.connection = connection
                            refused: list[Step] = []
                            if declarer:
                                # Before the consumers, and before publishes waiting
                                # for this vhost go out: what they need is there.
                                refused = await declarer.declare(connection, strict=first)
                            connected.set()
                            held = {step.queue_name for step in refused} - {None}
                            async with trio.open_nursery() as generation:
                                for consumer in consumers:
                                    if consumer.queue in held:
                                        consumer.hold("its declaration was refused: retrying")
                                    else:
                                        await generation.start(consumer.run, connection, workers)
                                if refused and declarer is not None:
                                    generation.start_soon(
                                        self._redeclare,
                                        declarer,
                                        connection,
                                        refused,
                                        consumers,
                                        workers,
                                        generation,
                                        backoff,
                                        stop,
                                    )
                                if first:
                                    first = False
                                    self._report(ConnectionEvent("connected", vhost))
                                    task_status.started()
                                else:
                                    self.reconnects += 1
                                    logger.info("reconnected to %s", params.display)
                                    self._report(ConnectionEvent("recovered", vhost))
                                attempt = 0
                                # The consumers return when the connection closes,
                                # or after draining once the App is stopping.
                            if not stop.is_set():
                                await wait_first(connection.wait_closed, stop.wait)
                            if not connection.is_open:
                                raise connection.close_reason or ConnectionClosed("connection lost")
                    except (ConnectionClosed, ChannelClosed, ConnectError) as exc:
                        connected = self._reset_connected()
                        if first:
                            raise _startup_error(exc, params) from None
                        if stop.is_set():
                            break
                        kind = "lost" if attempt == 0 else "reconnect_failed"
                        delay = backoff.delay(attempt)
                        attempt += 1
                        logger.warning(
                            "connection to %s %s: %s; reconnecting in %.1f s",
                            params.display,
                            "lost" if kind == "lost" else "still down",
                            exc,
                            delay,
                        )
                        self._report(ConnectionEvent(kind, vhost, error=exc))
                        await sleep_unless(stop, delay)
                    finally:
                        self.connection = None
                if first:
                    # Stopped before the first connection: nothing to wait for.
                    task_status.started()
                # This vhost is done: from now on a publish to it (a shutdown hook,
                # a handler still finishing) opens a connection of its own instead
                # of waiting for a reconnection that never comes.
                self.connected = None
                connected.set()
                # Handlers of a connection that died during shutdown may still run;
                # the grace timer bounds this wait.  Then retire the idle workers.
                for consumer in consumers:
                    await consumer.wait_idle()
                # Publishing goes on until every handler has finished.
                await on_drained(vhost)
                workers.cancel_scope.cancel()
            self._worker_scopes.discard(workers.cancel_scope)
        finally:
            self.connected = None

    @staticmethod
    async def _redeclare(
        declarer: Declarer,
        connection: Connection,
        refused: list[Step],
        consumers: Sequence[Consumer],
        workers: trio.Nursery,
        generation: trio.Nursery,
        backoff: Backoff,
        stop: trio.Event,
    ) -> None:
        """Retry what the broker refused to declare after a reconnect; start the
        consumer of each queue once it is declared."""
        by_queue = {consumer.queue: consumer for consumer in consumers}

        def start(queue: str) -> None:
            consumer = by_queue.get(queue)
            if consumer is not None:
                generation.start_soon(consumer.run, connection, workers)

        await declarer.retry(connection, refused, delay=backoff.delay, stop=stop, on_declared=start)


def report_event(
    callback: Callable[[ConnectionEvent], Any] | None,
    event: ConnectionEvent,
    nursery: trio.Nursery | None,
) -> None:
    """Call the ``on_connection_event`` callback; an async one runs in ``nursery``.

    A callback that raises is logged, never raised into the supervisor.
    """
    if callback is None:
        return
    try:
        result = callback(event)
    except Exception:
        logger.exception("on_connection_event callback failed on %s", event)
        return
    if inspect.isawaitable(result) and nursery is not None:
        nursery.start_soon(_await_logged, result, event)


async def _await_logged(awaitable: Awaitable[Any], event: ConnectionEvent) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("on_connection_event callback failed on %s", event)


def _startup_error(exc: BaseException, params: ConnectionParams) -> BaseException:
    if isinstance(exc, ConnectError | TopologyError):
        return exc
    return ConnectError(f"cannot connect to {params.display}: {exc}")
