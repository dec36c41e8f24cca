"""``App``: route registration, ``serve()``/``run()``/``shutdown()``, publishing."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import logging
import random
import signal
import ssl as _ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import _settings
from ._bulk import BulkConfig, check_bulk
from ._chain import _IN_WORKER, CallNext, Handler, Middleware, build_chain
from ._consumer import Consumer
from ._exceptions import (
    AsyncWorkerError,
    AuthenticationError,
    ChannelClosed,
    ConnectError,
    ConnectionClosed,
    PublishTimeout,
    QueueNotFound,
)
from ._lifecycle import Lifecycle, LifecycleMixin
from ._logging import configure_logging
from ._settlement import AckRequeue
from ._statistics import AppStatistics
from ._transports import Channel, Connection, ConnectionParams, Properties, connect, redact_url
from ._util import is_async_callable, only_leaf, sleep_unless, wait_first
from ._watchdog import watch_loop

if TYPE_CHECKING:
    from .testing import TestClient

__all__ = ["App", "AppStatistics", "Backoff", "ConnectionEvent"]

logger = logging.getLogger("asyncworker")

#: Seconds between reports of handlers still running after the grace period.
_STUCK_REPORT_SECONDS = 10.0

# A handler of messages, or of ``list[Message]`` on a bulk route.
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


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


@dataclass(eq=False)
class _Route:
    handler: Handler
    queues: tuple[str, ...]
    vhost: str
    middlewares: tuple[Middleware, ...]
    settlement: Middleware | None
    declare: bool
    name: str
    bulk: BulkConfig | None = None
    consumers: list[Consumer] = field(default_factory=list)


class App(LifecycleMixin):
    """A RabbitMQ worker: routes from queues to async handlers.

    ::

        app = App(host="127.0.0.1", user="guest", password="guest", prefetch_count=256)

        @app.route(["orders"], vhost="/")
        async def handle(message: Message) -> None:
            ...

        app.run()

    Connection: either ``host``/``port``/``user``/``password`` or ``url``
    (``amqp://user:pass@host:port/vhost``, ``amqps://...`` or ``memory://``);
    the vhost of each route overrides the URL's.  One connection is opened per
    vhost (and one more for publishing, on the first ``publish``), and each
    queue gets its own channel with
    ``basic.qos(prefetch_count)``: at most ``prefetch_count`` handlers of one
    queue run at once.

    Settlement: every message is settled exactly once by the ``settlement``
    policy, the outermost step of every chain (``AckRequeue()`` by default:
    ack when the handler returns, requeue when it raises), unless the handler
    settled it itself.  ``middlewares`` wrap every route's handler, outside the
    route's own middlewares.

    Args:
        host, port, user, password, heartbeat, ssl: where and how to connect;
            ``ssl`` is an ``ssl.SSLContext`` or True for the default context.
        url: alternative to host/port/user/password.  When none of url, host,
            port, user and password is given, ``ASYNCWORKER_URL`` is used.
        prefetch_count: messages delivered and not yet settled, per queue
            (default ``ASYNCWORKER_PREFETCH``, else 128).
        middlewares: App-wide middlewares, outermost first.
        settlement: the settlement policy (an ``AckRequeue``), default
            ``AckRequeue()``.
        grace_period: seconds that in-flight handlers get to finish on shutdown
            before they are cancelled (and their messages requeued); default
            ``ASYNCWORKER_GRACE_PERIOD``, else 30.
        reconnect: the ``Backoff`` between reconnection attempts.
        on_connection_event: a callback (sync or async) receiving a
            ``ConnectionEvent`` for each connection failure and recovery.
        connect_timeout: seconds to open a connection.
        name: the connection name the broker shows (management UI,
            ``rabbitmqctl list_connections client_properties``).
        loop_block_threshold: when the event loop was blocked this many
            seconds or more (a handler called ``time.sleep`` or other blocking
            code), log a warning naming the routes that were running; None
            disables the watchdog.
        http: ``host:port`` where to serve ``/health`` and ``/metrics``
            (default ``ASYNCWORKER_HTTP``; off when neither is set).  See
            docs/operations.md.
    """

    if not TYPE_CHECKING:
        # Python's own TypeError for a misspelled keyword does not suggest the
        # right one; this does.  Hidden from type checkers, which see (and
        # check calls against) the real signature of __init__.
        def __new__(cls, *args: Any, **kwargs: Any) -> App:
            unknown = [name for name in kwargs if name not in _init_parameters()]
            if unknown:
                close = difflib.get_close_matches(unknown[0], _init_parameters(), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"App() got an unexpected keyword argument {unknown[0]!r}{hint}")
            return super().__new__(cls)

    def __init__(
        self,
        host: str | None = None,
        user: str | None = None,
        password: str | None = None,
        prefetch_count: int | None = None,
        *,
        port: int | None = None,
        heartbeat: int = 60,
        ssl: _ssl.SSLContext | bool | None = None,
        url: str | None = None,
        middlewares: Sequence[Middleware] = (),
        settlement: Middleware | None = None,
        grace_period: float | None = None,
        reconnect: Backoff | None = None,
        on_connection_event: Callable[[ConnectionEvent], Any] | None = None,
        connect_timeout: float = 10.0,
        name: str = "asyncworker",
        loop_block_threshold: float | None = 1.0,
        http: str | None = None,
    ) -> None:
        # Deploy-time settings: the environment fills in what the code left out.
        prefetch_count = _settings.prefetch_count(prefetch_count)
        grace_period = _settings.grace_period(grace_period)
        http = _settings.http_address(http)
        if url is None and host is None and port is None and user is None and password is None:
            url = _settings.url()
        if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int):
            raise TypeError(f"prefetch_count must be an int, got {prefetch_count!r}")
        if not 1 <= prefetch_count <= 65535:
            raise ValueError(
                f"prefetch_count must be between 1 and 65535, got {prefetch_count}: it is how "
                "many messages of one queue may be delivered and not yet settled"
            )
        if heartbeat < 0:
            raise ValueError(f"heartbeat must be >= 0 seconds (0 disables it), got {heartbeat}")
        if not grace_period >= 0:
            raise ValueError(f"grace_period must be >= 0 seconds, got {grace_period}")
        if reconnect is not None and not isinstance(reconnect, Backoff):
            raise TypeError(f"reconnect must be an asyncworker.Backoff, got {reconnect!r}")
        if loop_block_threshold is not None and not loop_block_threshold > 0:
            raise ValueError(
                "loop_block_threshold must be > 0 seconds, or None to disable the "
                f"watchdog, got {loop_block_threshold}"
            )
        ssl_context = _ssl.create_default_context() if ssl is True else (ssl or None)
        common: dict[str, Any] = {
            "heartbeat": heartbeat,
            "connect_timeout": connect_timeout,
            "client_name": name,
        }
        if ssl_context is not None:
            common["ssl"] = ssl_context
        if url is not None:
            if host is not None or user is not None or password is not None or port is not None:
                raise ValueError(
                    "give either url= or host=/port=/user=/password=, not both "
                    f"(url={redact_url(url)!r})"
                )
            params = ConnectionParams.from_url(url, **common)
        else:
            params = ConnectionParams(
                scheme="amqps" if ssl_context is not None else "amqp",
                host=host or "127.0.0.1",
                port=port or (5671 if ssl_context is not None else 5672),
                user=user if user is not None else "guest",
                password=password if password is not None else "guest",
                **common,
            )
        self._params = params
        self.prefetch_count = prefetch_count
        self.grace_period = float(grace_period)
        self.reconnect = reconnect or Backoff()
        self._middlewares = _check_middlewares(middlewares, "App")
        self._settlement = _check_settlement(settlement, "App")
        self._on_connection_event = on_connection_event
        self.loop_block_threshold = loop_block_threshold
        self._lifecycle = Lifecycle(self, http)
        self._routes: list[_Route] = []
        self._serving = False
        self._started = False
        self._stop_event = trio.Event()
        self._stopped = trio.Event()
        self._connections: dict[str, Connection] = {}
        self._connected: dict[str, trio.Event] = {}
        self._reconnects: dict[str, int] = {}
        # Publishing has connections of its own (one per vhost, opened on the
        # first publish): a broker short of memory or disk blocks every
        # connection that publishes, and the consumers' acks must still flow.
        self._publisher_connections: dict[str, Connection] = {}
        self._consumed_vhosts: frozenset[str] = frozenset()
        self._publishers: dict[str, Channel] = {}
        self._publisher_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._worker_scopes: set[trio.CancelScope] = set()
        self._startup_scope: trio.CancelScope | None = None
        #: A dict for application state shared by handlers (database pools, clients, ...).
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<App {self._params.url()} routes={len(self._routes)}>"

    @property
    def url(self) -> str:
        """The broker URL, with the password masked."""
        return self._params.url()

    # -- registration -------------------------------------------------------

    def route(
        self,
        queues: Iterable[str] | str,
        *,
        vhost: str | None = None,
        middlewares: Sequence[Middleware] = (),
        settlement: Middleware | None = None,
        declare: bool = False,
        bulk_size: int | None = None,
        bulk_flush_interval: float = 1.0,
    ) -> Callable[[H], H]:
        """Register an async handler for one or more queues.

        The handler receives one ``Message`` per call, from any of ``queues``;
        with ``bulk_size``, a ``Batch`` (a ``list[Message]`` of one queue)
        instead: see docs/bulk.md.

        Args:
            queues: the queue names (a single name is accepted too).
            vhost: their vhost; defaults to the App's (``"/"``, or the URL's).
            middlewares: this route's middlewares, inside the App's.
            settlement: this route's settlement policy, instead of the App's.
            declare: declare the queues (durable) if they do not exist.
            bulk_size: make this a bulk route: the handler receives up to this
                many messages per call (1 <= bulk_size <= prefetch_count).
            bulk_flush_interval: on a bulk route, seconds after the first
                message of a partial batch when the batch is handled anyway.
        """
        if self._serving:
            raise RuntimeError("routes must be registered before serve()/run() starts")
        names = (queues,) if isinstance(queues, str) else tuple(queues)
        if not names:
            raise ValueError("route() needs at least one queue name, got an empty list")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"queue names must be non-empty strings, got {name!r}")
        route_vhost = self._params.vhost if vhost is None else vhost
        if not isinstance(route_vhost, str) or not route_vhost:
            raise ValueError(f"vhost must be a non-empty string, got {route_vhost!r}")
        for existing in self._routes:
            clash = set(existing.queues) & set(names)
            if existing.vhost == route_vhost and clash:
                raise ValueError(
                    f"queue {sorted(clash)[0]!r} in vhost {route_vhost!r} already has a "
                    f"handler ({existing.name}); one queue, one route"
                )
        route_middlewares = _check_middlewares(middlewares, "route()")
        route_settlement = None if settlement is None else _check_settlement(settlement, "route()")
        bulk = check_bulk(
            bulk_size,
            bulk_flush_interval,
            self.prefetch_count,
            (*self._middlewares, *route_middlewares),
        )

        def decorator(handler: H) -> H:
            if not is_async_callable(handler):
                raise TypeError(
                    f"handler {getattr(handler, '__qualname__', handler)!r} must be an async "
                    "function (async def handler(message): ...)"
                )
            self._routes.append(
                _Route(
                    handler=handler,
                    queues=names,
                    vhost=route_vhost,
                    middlewares=route_middlewares,
                    settlement=route_settlement,
                    declare=bool(declare),
                    name=getattr(handler, "__qualname__", repr(handler)),
                    bulk=bulk,
                )
            )
            return handler

        return decorator

    # -- running ------------------------------------------------------------

    def run(self) -> None:
        """Run the App until SIGINT or SIGTERM, then drain gracefully and return.

        A second signal skips the grace period.  If the broker cannot be
        reached at startup, logs one line saying why and exits with status 1.
        """
        # Text (or JSON) log lines on stderr, at ASYNCWORKER_LOG_LEVEL/_FORMAT.
        configure_logging()
        try:
            trio.run(self._run_until_signal)
        except BaseException as exc:
            leaf = only_leaf(exc)
            if isinstance(leaf, (AsyncWorkerError, RuntimeError)):
                logger.error("asyncworker cannot start: %s", leaf)
                sys.exit(1)
            raise

    async def _run_until_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    count = 0
                    async for signum in signals:
                        count += 1
                        name = signal.Signals(signum).name
                        if count == 1:
                            logger.info(
                                "%s received: draining (grace %.0f s)", name, self.grace_period
                            )
                            # Not shutdown(): that ignores a signal received
                            # before serve() began, and startup may hang.
                            self._request_stop()
                        else:
                            logger.warning("%s received again: cancelling in-flight handlers", name)
                            self.grace_period = 0
                            self._force_stop()

                # Listening before serve() starts: a signal during startup
                # (a slow connection, a hanging startup hook) stops it too.
                nursery.start_soon(on_signals)
                await nursery.start(self.serve)
                await self._stopped.wait()
                nursery.cancel_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Consume every route's queues until ``shutdown()``.

        Use with ``await nursery.start(app.serve)``: it returns once every
        consumer is registered on the broker (a missing queue is logged and
        retried in the background; it does not hold up the others).  Raises
        ``ConnectError`` if a vhost's connection cannot be opened at start.
        A ``shutdown()`` during startup cancels a startup hook still running,
        reports started and returns without consuming.
        """
        if self._serving:
            raise RuntimeError("this App is already serving")
        if not self._routes:
            raise RuntimeError("this App has no routes: add one with @app.route([...])")
        self._serving = True
        # _stop_event is fresh (see the finally clause): a signal received by
        # run() before this point still stops this serve().
        self._stopped = trio.Event()
        try:
            # Startup hooks first: handlers and chains may rely on app.state.
            # shutdown() cancels a hook that hangs (nothing is consumed yet).
            with trio.CancelScope() as self._startup_scope:
                if self._stop_event.is_set():
                    self._startup_scope.cancel()
                await self._lifecycle.startup()
            self._startup_scope = None
            if self._stop_event.is_set():
                logger.info("shutdown requested during startup: not consuming")
                # Release `await nursery.start(app.serve)`; there is nothing to serve.
                task_status.started()
                return
            by_vhost: dict[str, list[Consumer]] = {}
            for route in self._routes:
                chain = self._build_chain(route)
                route.consumers = [Consumer(self, route, queue, chain) for queue in route.queues]
                by_vhost.setdefault(route.vhost, []).extend(route.consumers)
            self._consumed_vhosts = frozenset(by_vhost)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._grace_timer)
                if self.loop_block_threshold is not None:
                    await nursery.start(watch_loop, self, self.loop_block_threshold)
                await self._lifecycle.start_http(nursery)
                async with trio.open_nursery() as supervisors:
                    for vhost, consumers in by_vhost.items():
                        await supervisors.start(self._supervise, vhost, consumers)
                    self._started = True
                    logger.info(
                        "serving %d queue(s) in vhost(s) %s on %s",
                        sum(len(c) for c in by_vhost.values()),
                        ", ".join(repr(vhost) for vhost in by_vhost),
                        self._params.url(),
                    )
                    task_status.started()
                    supervisors.start_soon(self._lifecycle.run_periodic)
                # Every vhost has drained: close the publishing connections
                # left (to vhosts the App only publishes to); a publish from
                # now on (a shutdown hook) opens a short-lived connection.
                self._nursery = None
                for vhost in list(self._publisher_connections):
                    await self._close_publisher(vhost)
                # Stop the grace timer and user tasks.
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # A startup failure surfaces as itself, not wrapped in the groups
            # of our internal nurseries.
            leaf = only_leaf(group)
            if isinstance(leaf, AsyncWorkerError):
                raise leaf from None
            raise
        finally:
            await self._lifecycle.shutdown()
            self._startup_scope = None
            self._nursery = None
            self._serving = False
            self._started = False
            self._connections.clear()
            self._publishers.clear()
            self._publisher_connections.clear()
            self._consumed_vhosts = frozenset()
            self._stop_event = trio.Event()
            self._stopped.set()

    async def shutdown(self) -> None:
        """Stop gracefully and return once ``serve()`` has finished.

        Called from a handler, it starts the shutdown and returns at once (the
        handler's own message is then settled as usual).

        Every consumer is cancelled on the broker; messages delivered but not
        started go back to their queue; in-flight handlers get
        ``grace_period`` seconds to finish (then they are cancelled and their
        messages requeued); channels and connections are closed.
        """
        if not self._serving:
            return
        self._request_stop()
        if _IN_WORKER.get():
            # Called by a handler: waiting for serve() to finish would wait for
            # this very handler (until the grace period cancels it and requeues
            # its message).  Stopping is under way; let the handler return.
            return
        await self._stopped.wait()

    def _request_stop(self) -> None:
        self._stop_event.set()
        if self._startup_scope is not None:
            self._startup_scope.cancel()

    def _force_stop(self) -> None:
        self._request_stop()
        self._cancel_handlers()

    def _build_chain(self, route: _Route) -> CallNext:
        settlement = route.settlement or self._settlement
        handler = self._lifecycle.wrap_handler(route)
        return build_chain(handler, (settlement, *self._middlewares, *route.middlewares))

    # -- connection supervision ------------------------------------------------

    async def _supervise(
        self,
        vhost: str,
        consumers: list[Consumer],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep one connection to ``vhost`` open and its consumers registered."""
        params = replace(self._params, vhost=vhost)
        connected = self._connected.setdefault(vhost, trio.Event())
        self._reconnects.setdefault(vhost, 0)
        self._publisher_locks.setdefault(vhost, trio.Lock())
        first = True
        attempt = 0
        # Handlers run in this nursery, which outlives each connection so that
        # in-flight handlers finish when their connection drops.
        async with trio.open_nursery() as workers:
            self._worker_scopes.add(workers.cancel_scope)
            while not self._stop_event.is_set():
                try:
                    async with connect(params) as connection:
                        self._connections[vhost] = connection
                        connected.set()
                        async with trio.open_nursery() as generation:
                            for consumer in consumers:
                                await generation.start(consumer.run, connection, workers)
                            if first:
                                first = False
                                self._report("connected", vhost, None, None)
                                task_status.started()
                            else:
                                self._reconnects[vhost] += 1
                                logger.info("reconnected to %s", params.display)
                                self._report("recovered", vhost, None, None)
                            attempt = 0
                            # The consumers return when the connection closes,
                            # or after draining once the App is stopping.
                        if not self._stop_event.is_set():
                            await wait_first(connection.wait_closed, self._stop_event.wait)
                        if not connection.is_open:
                            raise connection.close_reason or ConnectionClosed("connection lost")
                except (ConnectionClosed, ChannelClosed, ConnectError) as exc:
                    connected = self._reset_connected(vhost)
                    if first:
                        raise _startup_error(exc, params) from None
                    if self._stop_event.is_set():
                        break
                    kind = "lost" if attempt == 0 else "reconnect_failed"
                    delay = self.reconnect.delay(attempt)
                    attempt += 1
                    logger.warning(
                        "connection to %s %s: %s; reconnecting in %.1f s",
                        params.display,
                        "lost" if kind == "lost" else "still down",
                        exc,
                        delay,
                    )
                    self._report(kind, vhost, None, exc)
                    await sleep_unless(self._stop_event, delay)
                finally:
                    self._connections.pop(vhost, None)
            if first:
                # Stopped before the first connection: nothing to wait for.
                task_status.started()
            # This vhost is done: from now on a publish to it (a shutdown hook,
            # a handler still finishing) opens a connection of its own instead
            # of waiting for a reconnection that never comes.
            self._connected.pop(vhost, connected).set()
            # Handlers of a connection that died during shutdown may still run;
            # the grace timer bounds this wait.  Then retire the idle workers.
            for consumer in consumers:
                await consumer.wait_idle()
            # Publishing goes on until every handler has finished.
            await self._close_publisher(vhost)
            workers.cancel_scope.cancel()
        self._worker_scopes.discard(workers.cancel_scope)

    async def _grace_timer(self) -> None:
        await self._stop_event.wait()
        await trio.sleep(self.grace_period)
        logger.warning(
            "grace period of %.0f s is over: cancelling in-flight handlers (their messages "
            "are requeued)",
            self.grace_period,
        )
        self._cancel_handlers()
        # A handler that shields itself from cancellation keeps serve() open;
        # say which one, since trio cannot leave it behind.
        while True:
            await trio.sleep(_STUCK_REPORT_SECONDS)
            stuck = [
                f"{c.vhost}/{c.queue} ({c.in_flight})"
                for c in self.statistics().consumers
                if c.in_flight
            ]
            if stuck:
                logger.error(
                    "shutdown is waiting for handlers that ignore cancellation: %s",
                    ", ".join(stuck),
                )

    def _cancel_handlers(self) -> None:
        for scope in self._worker_scopes:
            scope.cancel()

    def _reset_connected(self, vhost: str) -> trio.Event:
        event = self._connected.get(vhost)
        if event is None or event.is_set():
            event = self._connected[vhost] = trio.Event()
        return event

    def _report(
        self, kind: str, vhost: str, queue: str | None, error: BaseException | None
    ) -> None:
        callback = self._on_connection_event
        if callback is None:
            return
        event = ConnectionEvent(kind=kind, vhost=vhost, queue=queue, error=error)
        try:
            result = callback(event)
        except Exception:
            logger.exception("on_connection_event callback failed on %s", event)
            return
        if inspect.isawaitable(result) and self._nursery is not None:
            self._nursery.start_soon(_await_logged, result, event)

    # -- publishing -------------------------------------------------------------

    async def publish(
        self,
        body: bytes | str | Any,
        *,
        routing_key: str,
        exchange: str = "",
        vhost: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: Properties | None = None,
        persistent: bool = True,
        mandatory: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish a message and wait for the broker's confirmation.

        ``body`` may be bytes (sent as is), str (UTF-8, ``text/plain``) or any
        JSON-serialisable object (``application/json``).  Returns once the
        broker confirmed the message; raises ``PublishNacked`` if it refused
        it, ``Unroutable`` if ``mandatory`` and no queue was bound,
        ``QueueNotFound`` if the exchange does not exist.  While the App is
        serving, a publish interrupted by a lost connection is retried on the
        next one, for up to ``timeout`` seconds; then ``PublishTimeout``.
        """
        payload, content_type = _encode_body(body)
        props = replace(properties) if properties is not None else Properties()
        if headers:
            props.headers = {**(props.headers or {}), **headers}
        if props.content_type is None and content_type is not None:
            props.content_type = content_type
        if persistent and props.delivery_mode is None:
            props.delivery_mode = 2
        target_vhost = self._params.vhost if vhost is None else vhost
        try:
            with trio.fail_after(timeout):
                while True:
                    async with self._publisher(target_vhost) as channel:
                        try:
                            await channel.publish(
                                payload,
                                exchange=exchange,
                                routing_key=routing_key,
                                properties=props,
                                mandatory=mandatory,
                            )
                            break
                        except (ConnectionClosed, ChannelClosed) as exc:
                            if not self._retry_publish(exchange, exc):
                                raise
                    # The connection (or the channel) went down before the
                    # confirm: publish again on the next one.  The first copy
                    # may have reached the queue: at-least-once.  (A short
                    # pause: a broker dropping every connection is not hammered.)
                    await trio.sleep(0.02)
        except trio.TooSlowError:
            self._lifecycle.count_publish(target_vhost, False)
            publishing = self._publisher_connections.get(target_vhost)
            blocked = publishing.blocked if publishing is not None else None
            why = f" (the broker is blocking publishers: {blocked})" if blocked else ""
            raise PublishTimeout(
                f"message to exchange {exchange!r} with routing key {routing_key!r} "
                f"(vhost {target_vhost!r}) was not confirmed within {timeout} s{why}; it may "
                "or may not have been delivered"
            ) from None
        except Exception:
            self._lifecycle.count_publish(target_vhost, False)
            raise
        self._lifecycle.count_publish(target_vhost, True)

    async def declare_queue(
        self,
        name: str,
        *,
        vhost: str | None = None,
        durable: bool = True,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Declare a queue (idempotent: an existing queue with the same arguments is kept)."""
        target_vhost = self._params.vhost if vhost is None else vhost
        async with self._publisher(target_vhost) as channel:
            await channel.queue_declare(name, durable=durable, arguments=arguments)

    @asynccontextmanager
    async def _publisher(self, vhost: str) -> AsyncIterator[Channel]:
        """A confirm-mode channel on ``vhost``; retried across reconnects while serving."""
        # A context manager yields once: retrying the body is the caller's job
        # (see publish()).  Only getting a channel is retried here.
        channel: Channel | None = None
        while channel is None:
            connected = self._connected.get(vhost)
            if connected is None or not self._serving:
                break
            await connected.wait()
            try:
                channel = await self._publisher_channel(vhost)
            except (ConnectionClosed, ChannelClosed, ConnectError) as exc:
                if isinstance(exc, QueueNotFound | AuthenticationError):
                    raise
                # Retried until the caller's timeout (the broker may be
                # restarting: the consumers' supervisor reconnects meanwhile).
                await trio.sleep(0.05)
        if channel is None and self._nursery is not None and vhost not in self._consumed_vhosts:
            # Serving, to a vhost the App only publishes to: a publishing
            # connection is kept for it too (a connection per message would
            # cost a TCP and an AMQP handshake each time).
            channel = await self._publisher_channel(vhost)
        if channel is None:
            # Not serving, or that vhost's consumers have stopped: a
            # short-lived connection of its own.
            async with connect(replace(self._params, vhost=vhost)) as connection:
                channel = await connection.channel()
                await channel.confirm_select()
                yield channel
            return
        try:
            yield channel
        except (ConnectionClosed, ChannelClosed):
            # A dead channel is never reused (404 from a publish closes it, too).
            if self._publishers.get(vhost) is channel:
                del self._publishers[vhost]
            raise

    def _retry_publish(self, exchange: str, exc: ConnectionClosed | ChannelClosed) -> bool:
        """Whether a publish that failed with ``exc`` goes again on a new channel."""
        if not self._serving:
            return False
        if isinstance(exc, ConnectionClosed) or not exc.reply_code:
            # Lost with its connection, or closed locally (a vhost that
            # finished draining closes its publishing connection): the next
            # attempt waits for the reconnection, or takes a short-lived
            # connection once that vhost has stopped.
            return True
        # A 404 naming another exchange: a concurrent publish on the shared
        # channel used a missing exchange, which closed the channel under this one.
        return isinstance(exc, QueueNotFound) and f"'{exchange}'" not in exc.reply_text

    async def _publisher_channel(self, vhost: str) -> Channel:
        channel = self._publishers.get(vhost)
        if channel is not None and channel.is_open:
            return channel
        async with self._publisher_locks.setdefault(vhost, trio.Lock()):
            channel = self._publishers.get(vhost)
            if channel is not None and channel.is_open:
                return channel
            connection = self._publisher_connections.get(vhost)
            if connection is None or not connection.is_open:
                if self._nursery is None:
                    raise ConnectionClosed("not serving")
                connection = await self._nursery.start(self._hold_publisher_connection, vhost)
            channel = await connection.channel()
            await channel.confirm_select()
            self._publishers[vhost] = channel
            return channel

    async def _hold_publisher_connection(
        self, vhost: str, *, task_status: trio.TaskStatus[Connection]
    ) -> None:
        """Open the publishing connection to ``vhost`` and hold it until it closes.

        ``_close_publisher`` closes it; a lost one is replaced by the next
        publish.  An error while opening it goes to that publish.
        """
        params = replace(
            self._params, vhost=vhost, client_name=f"{self._params.client_name} (publisher)"
        )
        started = False
        try:
            async with connect(params) as connection:
                self._publisher_connections[vhost] = connection
                task_status.started(connection)
                started = True
                try:
                    await connection.wait_closed()
                finally:
                    if self._publisher_connections.get(vhost) is connection:
                        del self._publisher_connections[vhost]
        except Exception as exc:
            if not started:
                raise
            # Never into the App's nursery: the next publish opens another.
            if isinstance(exc, AsyncWorkerError):
                logger.debug("publishing connection to vhost %r closed: %s", vhost, exc)
            else:
                logger.warning("publishing connection to vhost %r failed: %r", vhost, exc)

    async def _close_publisher(self, vhost: str) -> None:
        """Close the publishing channel and connection of ``vhost`` (once serving ends)."""
        channel = self._publishers.pop(vhost, None)
        connection = self._publisher_connections.pop(vhost, None)
        with trio.CancelScope(shield=True), trio.move_on_after(5), suppress(AsyncWorkerError):
            if channel is not None and channel.is_open:
                await channel.close()
            if connection is not None:
                await connection.aclose()

    # -- testing ------------------------------------------------------------------

    def test_client(self, **kwargs: Any) -> TestClient:
        """A ``TestClient`` running this App on a private in-memory broker.

        Use it as ``async with app.test_client() as client:``; keyword
        arguments go to ``asyncworker.testing.TestClient``.  See docs/testing.md.
        """
        from .testing import TestClient

        return TestClient(self, **kwargs)

    # -- introspection ------------------------------------------------------------

    def statistics(self) -> AppStatistics:
        """A snapshot of the App's connections and consumers."""
        return AppStatistics(
            serving=self._started,
            connected={
                vhost: vhost in self._connections and self._connections[vhost].is_open
                for vhost in self._reconnects
            },
            reconnects=dict(self._reconnects),
            consumers=tuple(
                consumer.statistics() for route in self._routes for consumer in route.consumers
            ),
            publishes_confirmed=dict(self._lifecycle.publishes_confirmed),
            publishes_failed=dict(self._lifecycle.publishes_failed),
        )


# -- helpers --------------------------------------------------------------------


@functools.cache
def _init_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(App.__init__).parameters) - {"self"}


def _check_middlewares(middlewares: Sequence[Middleware], where: str) -> tuple[Middleware, ...]:
    if isinstance(middlewares, (str, bytes)) or not isinstance(middlewares, Iterable):
        raise TypeError(f"{where} middlewares must be a list, got {middlewares!r}")
    result = tuple(middlewares)
    for middleware in result:
        if isinstance(middleware, type):
            raise TypeError(
                f"{where}: middleware {middleware.__name__} is a class; pass an instance "
                f"({middleware.__name__}(...))"
            )
        # Checked by declaration, not by class: any settlement policy says so.
        if getattr(middleware, "is_settlement_policy", False):
            name = type(middleware).__name__
            raise ValueError(
                f"{where}: {name} is the settlement policy, not a middleware; "
                f"pass it as settlement={name}(...)"
            )
        if not is_async_callable(middleware):
            raise TypeError(
                f"{where}: middleware {middleware!r} must be an async callable "
                "(async def middleware(message, call_next): ...)"
            )
    return result


def _check_settlement(settlement: Middleware | None, where: str) -> Middleware:
    if settlement is None:
        return AckRequeue()
    if not is_async_callable(settlement):
        raise TypeError(
            f"{where}: settlement must be an AckRequeue(...) or an async callable "
            f"(message, call_next) that settles every message, got {settlement!r}"
        )
    return settlement


def _encode_body(body: bytes | str | Any) -> tuple[bytes, str | None]:
    if isinstance(body, bytes):
        return body, None
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body), None
    if isinstance(body, str):
        return body.encode(), "text/plain"
    try:
        return json.dumps(body, separators=(",", ":")).encode(), "application/json"
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cannot publish a body of type {type(body).__name__}: pass bytes, str or a "
            f"JSON-serialisable object ({exc})"
        ) from exc


def _startup_error(exc: BaseException, params: ConnectionParams) -> BaseException:
    if isinstance(exc, ConnectError):
        return exc
    return ConnectError(f"cannot connect to {params.display}: {exc}")


async def _await_logged(awaitable: Awaitable[Any], event: ConnectionEvent) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("on_connection_event callback failed on %s", event)
