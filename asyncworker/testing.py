"""Test your handlers without RabbitMQ: ``app.test_client()``.

::

    async def test_orders() -> None:
        async with app.test_client() as client:
            await client.publish("orders", b'{"id": 1}')
            await client.wait_until_idle()
            assert client.acked("orders") == 1
            assert client.queue_size("orders.dlq") == 0

A ``TestClient`` runs ``app.serve`` on a fresh, private in-memory broker (a
``MemoryBroker``, the kind ``memory://`` URLs reach), so the App goes
through the very code it runs in production: its routes, middlewares,
settlement policy, ``Retry``'s republishing and dead-lettering, ``Timeout``,
graceful shutdown.  The broker models RabbitMQ's delivery semantics
(prefetch, requeue to the head with ``redelivered``, dead-letter exchanges,
TTLs, quorum delivery counts), so what a test observes is what RabbitMQ would
do.

Everything runs on trio's clock: under ``trio.testing.MockClock(autojump_threshold=0)``
a ``Retry(delay=30)`` or a ``Timeout(5)`` takes no wall time.  See
docs/testing.md.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import trio

from ._transports import Channel, Connection, ConnectionParams, Properties
from ._transports.memory import ConsumerInfo as ConsumerInfo
from ._transports.memory import MemoryBroker as MemoryBroker
from ._transports.memory import QueueStats as QueueStats
from ._transports.memory import connect as connect_memory
from ._util import raise_single, wait_first

if TYPE_CHECKING:
    from ._app import App

__all__ = ["ConsumerInfo", "MemoryBroker", "QueueStats", "TestClient"]

#: The URL the App shows (in logs, ``app.url``) while a TestClient runs it;
#: its connector, not this name, takes every connection to the client's broker.
_NAME = "testclient"
_URL = f"memory://{_NAME}"


class TestClient:
    """Run an App on a private in-memory broker, publish to it and observe the outcome.

    Use it as ``async with app.test_client() as client:`` (or
    ``TestClient(app)``).  On entry it

    * makes a fresh ``MemoryBroker`` of its own (``client.broker``; it is not
      registered under any name, so ``memory://`` URLs never reach it),
    * creates the vhosts the App uses on it and declares every route's
      queues given by name (durable; with the arguments given in ``queues``
      if any), so a test needs no setup; the App declares its own ``Queue``
      objects, exchanges and bindings itself, as in production,
    * hands the App a connector bound to that broker for the duration of the
      block (``App.reconfigured()``: the App's own settings are restored on
      exit; the App object is otherwise untouched),
    * starts ``app.serve`` and returns once every consumer is registered.

    On exit the App is shut down gracefully (in-flight handlers get the App's
    ``grace_period``), and the App gets its own settings
    back.  An exception raised in the block propagates as itself, not wrapped
    in an exception group.

    The inspection methods take a queue name and an optional ``vhost``; when
    it is omitted, the vhost of the route that consumes the queue is used, or
    else the App's default vhost.  A queue that does not exist (say a
    ``.dlq`` nothing was ever dead-lettered to) reads as empty, with all
    counters 0.

    Args:
        app: the App to run.  It must not be serving already.
        queues: queues to declare before the App starts, as
            ``{name: arguments}`` (arguments may be None): to give a route's
            queue a dead-letter exchange or a TTL, or to create extra queues.
            Names that are not a route's queue are declared in the App's
            default vhost.
    """

    # Not a pytest test class, despite its name.
    __test__ = False

    def __init__(
        self, app: App, *, queues: Mapping[str, Mapping[str, Any] | None] | None = None
    ) -> None:
        self.app = app
        self._queues = {name: dict(args or {}) for name, args in (queues or {}).items()}
        self._broker = MemoryBroker()
        self._stack: AsyncExitStack | None = None
        self._channels: dict[str, Channel] = {}
        self._connect_stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        state = "running" if self._stack is not None else "stopped"
        return f"<TestClient {self.app!r} on {self._broker!r} {state}>"

    @property
    def broker(self) -> MemoryBroker:
        """The private ``MemoryBroker`` the App runs on (for finer inspection)."""
        return self._broker

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> TestClient:
        app = self.app
        if self._stack is not None:
            raise RuntimeError("this TestClient is already running; use one `async with` at a time")
        stack = AsyncExitStack()
        try:
            # The App runs on the private broker for the duration of the block
            # only: it gets its own settings back on exit.
            try:
                # The App's own vhost is kept: its routes without vhost= consume
                # the vhost of its URL here as in production.
                url = f"{_URL}/{quote(app.vhost, safe='')}"
                stack.enter_context(app.reconfigured(url=url, connector=self._connect))
            except RuntimeError:
                raise RuntimeError(
                    "the App is already serving: a TestClient runs app.serve itself, on its "
                    "own in-memory broker; do not start the App yourself inside the test"
                ) from None
            await stack.enter_async_context(self._serving())
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        app = self.app
        default_vhost = app.vhost
        routed: dict[str, set[str]] = {}
        for route in app.routes:
            # Queue objects are the App's to declare (a quorum queue declared
            # here as classic would make the App's own declaration fail).
            own = {queue.name for queue in route.declared}
            routed.setdefault(route.vhost, set()).update(set(route.queues) - own)
        routed.setdefault(default_vhost, set())
        extra = {name for name in self._queues if not any(name in qs for qs in routed.values())}
        routed[default_vhost] |= extra
        for vhost in routed:
            self._broker.add_vhost(vhost)
        try:
            async with trio.open_nursery() as nursery, AsyncExitStack() as connections:
                self._connect_stack = connections
                for vhost, names in routed.items():
                    existing = set(self._broker.queue_names(vhost))
                    missing = sorted(names - existing)
                    if missing:
                        channel = await self._channel(vhost)
                        for queue in missing:
                            await channel.queue_declare(
                                queue, durable=True, arguments=self._queues.get(queue) or None
                            )
                await nursery.start(app.serve)
                try:
                    yield
                finally:
                    await app.shutdown()
                    self._connect_stack = None
                    self._channels.clear()
        except BaseExceptionGroup as group:
            raise_single(group)
            raise

    async def _channel(self, vhost: str) -> Channel:
        """A confirm-mode channel of the client's own on ``vhost`` (opened once)."""
        channel = self._channels.get(vhost)
        if channel is not None and channel.is_open:
            return channel
        if self._connect_stack is None:
            raise RuntimeError("the TestClient is not running: use it as `async with ...`")
        connection = await self._connect_stack.enter_async_context(
            self._connect(ConnectionParams(scheme="memory", host=_NAME, port=0, vhost=vhost))
        )
        channel = await connection.channel()
        await channel.confirm_select()
        self._channels[vhost] = channel
        return channel

    # -- acting ------------------------------------------------------------------

    async def publish(
        self,
        queue_or_routing_key: str,
        body: bytes | str | Any,
        *,
        exchange: str = "",
        headers: dict[str, Any] | None = None,
        properties: Properties | None = None,
        vhost: str | None = None,
    ) -> None:
        """Publish a message, as ``App.publish`` does (with publisher confirms).

        With the default ``exchange`` the first argument is the queue name;
        otherwise it is the routing key.  ``body`` may be bytes, str or a
        JSON-serialisable object.  Returns once the broker routed the message;
        a handler may already be running it.  Raises ``Unroutable`` if no
        queue receives it (a queue the App does not consume, not declared).
        """
        self._check_running()
        await self.app.publish(
            body,
            routing_key=queue_or_routing_key,
            exchange=exchange,
            vhost=self._vhost(queue_or_routing_key, vhost) if exchange == "" else vhost,
            headers=headers,
            properties=properties,
        )

    async def declare_queue(
        self,
        name: str,
        *,
        vhost: str | None = None,
        durable: bool = True,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Declare a queue on the broker (to bind it, or to publish to it)."""
        self._check_running()
        target = self._vhost(name, vhost)
        self._broker.add_vhost(target)
        channel = await self._channel(target)
        await channel.queue_declare(name, durable=durable, arguments=arguments)

    async def channel(self, vhost: str | None = None) -> Channel:
        """A confirm-mode channel on the broker, for anything else (exchanges, bindings, get)."""
        self._check_running()
        target = self.app.vhost if vhost is None else vhost
        self._broker.add_vhost(target)
        return await self._channel(target)

    async def wait_until_idle(self) -> None:
        """Return once the App has nothing left to do.

        That is: every queue the App consumes has no ready and no unacked
        message, no handler is running, and no message waits in a TTL queue
        that dead-letters somewhere (such as ``Retry``'s delay queues), since
        it would come back.  A handler that publishes keeps the App busy: its
        message is routed before the handler's own message is settled.

        It waits on the broker's and the consumers' events, never by polling;
        under ``MockClock(autojump_threshold=0)`` TTLs and timeouts elapse at
        once.  Bound it with ``trio.fail_after`` in tests: an App whose handler
        never returns is never idle.
        """
        self._check_running()
        broker = self._broker
        while True:
            # Run due TTL expiries ourselves: the broker's timer lives in a
            # connection's nursery and may not have run yet at this instant.
            broker.expire_due()
            version = broker.version
            busy, running = self._busy()
            if not busy:
                return
            waits: list[Callable[[], Awaitable[object]]] = [_changed_since(broker, version)]
            if running:
                waits.append(self.app.wait_idle)
            deadline = broker.next_expiry()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await wait_first(*waits)

    def _busy(self) -> tuple[bool, bool]:
        """Whether the App has work left, and whether handlers are running."""
        broker = self._broker
        busy = running = False
        for consumer in self.app.statistics().consumers:
            if consumer.in_flight:
                busy = running = True
            elif consumer.waiting:
                busy = True
            vhost, queue = consumer.vhost, consumer.queue
            if broker.has_queue(vhost, queue) and (
                broker.queue_size(vhost, queue) or broker.unacked_count(vhost, queue)
            ):
                busy = True
        # A delay queue: its messages will expire into another queue.
        if any(broker.has_delayed_messages(route.vhost) for route in self.app.routes):
            busy = True
        return busy, running

    # -- inspection ----------------------------------------------------------------

    def queue_size(self, queue: str, vhost: str | None = None) -> int:
        """Ready messages in ``queue`` (0 if it does not exist)."""
        target = self._vhost(queue, vhost)
        if not self._broker.has_queue(target, queue):
            return 0
        return self._broker.queue_size(target, queue)

    def messages(self, queue: str, vhost: str | None = None) -> list[bytes]:
        """The bodies of the ready messages of ``queue``, head first, left in place."""
        target = self._vhost(queue, vhost)
        if not self._broker.has_queue(target, queue):
            return []
        return [delivery.body for delivery in self._broker.ready_messages(target, queue)]

    def stats(self, queue: str, vhost: str | None = None) -> QueueStats:
        """The broker's counters of ``queue`` (all 0 if it does not exist)."""
        target = self._vhost(queue, vhost)
        if not self._broker.has_queue(target, queue):
            return QueueStats()
        return self._broker.stats(target, queue)

    def acked(self, queue: str, vhost: str | None = None) -> int:
        """Messages of ``queue`` acknowledged (by handlers, the settlement policy, Retry)."""
        return self.stats(queue, vhost).acked

    def requeued(self, queue: str, vhost: str | None = None) -> int:
        """Messages returned to ``queue``: rejected with requeue, or unacked when a
        channel closed."""
        return self.stats(queue, vhost).requeued

    def rejected(self, queue: str, vhost: str | None = None) -> int:
        """Messages of ``queue`` the App rejected *without* requeue (dropped, or
        dead-lettered by the queue's dead-letter exchange)."""
        target = self._vhost(queue, vhost)
        return sum(
            consumer.rejected
            for consumer in self.app.statistics().consumers
            if consumer.vhost == target and consumer.queue == queue
        )

    def dead_lettered(self, queue: str, vhost: str | None = None) -> int:
        """Messages that left ``queue`` for a dead-letter destination.

        If the queue has a dead-letter exchange (``x-dead-letter-exchange``),
        the messages the broker dead-lettered through it, for any reason
        (rejected without requeue, expired, over the length or delivery
        limit).  Otherwise, the messages published to ``<queue>.dlq``, where
        ``Retry`` (``dead_letter="dlq"``) puts the messages it gave up on.
        """
        target = self._vhost(queue, vhost)
        broker = self._broker
        if (
            broker.has_queue(target, queue)
            and broker.queue_arguments(target, queue).get("x-dead-letter-exchange") is not None
        ):
            return broker.stats(target, queue).dead_lettered
        return self.stats(f"{queue}.dlq", target).published

    # -- helpers ---------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._stack is None:
            raise RuntimeError(
                "the TestClient is not running: use it as `async with app.test_client() as "
                "client:` and call this inside the block"
            )

    def _vhost(self, queue: str, vhost: str | None) -> str:
        if vhost is not None:
            return vhost
        for route in self.app.routes:
            if queue in route.queues:
                return route.vhost
        return self.app.vhost

    def _connect(self, params: ConnectionParams) -> AbstractAsyncContextManager[Connection]:
        """The App's connector while the client runs: every connection reaches its broker.

        The vhost is created first: the vhosts the App uses (its routes', its
        ``App.declare(..., vhost=...)``'s, its publishes') all exist, as an
        operator would have set them up.
        """
        self._broker.add_vhost(params.vhost)
        return connect_memory(params, broker=self._broker)


def _changed_since(broker: MemoryBroker, version: int) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        # Checked again here: the broker may have changed between the caller's
        # look and this task's start, and that change must not be missed.
        while broker.version == version:
            await broker.wait_for_change()

    return wait
