"""``App``: the facade users hold, composing objects that each own one topic.

What the App composes (see docs/architecture.md):

* ``Registry`` (``_registry``), its base class: ``route()`` and
  ``declare()``, the routes and the topology (``_topology``) they register;

* ``AppConfig`` (``_config``): the frozen configuration built from the
  arguments and the ``ASYNCWORKER_*`` settings; ``reconfigured()`` swaps it
  while the App is stopped (the command line and the test client use it);
* one ``Supervisor`` per consumed vhost (``_supervisor``): the connection,
  its reconnections and the consumers registered on it;
* one ``Consumer`` per (vhost, queue) (``_consumer``), each handing its
  deliveries to a dispatcher (``_dispatch``: worker pool, or batch collector
  on a bulk route) that runs the route's chain (``_chain``);
* the ``Publisher`` (``_publisher``): publishing connections, confirm
  channels, retries and counts;
* the ``Lifecycle`` (``_lifecycle``): hooks and periodic tasks; and, while
  serving, the HTTP server (``_http``, ``_metrics``) and the loop watchdog
  (``_watchdog``), which read nothing of the App but ``statistics()``.

The App keeps the run state (serving, the stop event, the scopes the grace
timer cancels) and wires these together with narrow values: a stop event, a
report callback, a ``statistics`` callable.  No other module touches a
private attribute of the App.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import logging
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import trio

from ._chain import _IN_WORKER, Middleware
from ._config import (
    KEYWORD_ALIASES,
    AppConfig,
    Connector,
    Route,
    chain_layers,
    check_queue_clash,
    publish_hook_of,
)
from ._consumer import Consumer, consumers_for
from ._declare import Declarer
from ._exceptions import AsyncWorkerError
from ._lifecycle import Lifecycle, ShutdownReport, grace_timer, serving_line
from ._publisher import Publisher, encode_body
from ._registry import Registry
from ._run import run_until_signal, skipped_under_cli
from ._statistics import AppStatistics
from ._supervisor import Backoff, ConnectionEvent, Supervisor, report_event
from ._topology import Queue, Topology
from ._transports import Properties
from ._util import check_keywords, only_leaf, suggest_call_keywords
from ._watchdog import watch_loop

if TYPE_CHECKING:
    from ._metrics import AppMetrics
    from .testing import TestClient

__all__ = ["App"]

logger = logging.getLogger("asyncworker")

T = TypeVar("T")
#: A lifecycle hook or periodic task: ``async def hook(app) -> None``.
F = TypeVar("F", bound=Callable[["App"], Awaitable[Any]])


class _ConfigAttribute(Generic[T]):
    """An App attribute that reads (and, set, replaces) a field of its ``AppConfig``.

    ``app.grace_period = 0`` keeps working as it always did, while the
    record itself stays frozen: setting makes a new one.
    """

    def __init__(self, field: str, doc: str) -> None:
        self._field = field
        self.__doc__ = doc

    @overload
    def __get__(self, owner: None, kind: type) -> _ConfigAttribute[T]: ...
    @overload
    def __get__(self, owner: App, kind: type | None = None) -> T: ...
    def __get__(self, owner: App | None, kind: type | None = None) -> T | _ConfigAttribute[T]:
        if owner is None:
            return self
        # The App's own attribute, read for it by its own descriptor.
        return cast(T, getattr(owner._config, self._field))  # noqa: SLF001

    def __set__(self, owner: App, value: T) -> None:
        changes: dict[str, Any] = {self._field: value}
        owner._config = replace(owner._config, **changes)  # noqa: SLF001


class App(Registry):
    """A RabbitMQ worker: routes from queues to async handlers.

    ::

        app = App(host="127.0.0.1", user="guest", password="guest", prefetch_count=256)

        @app.route(["orders"], vhost="/")
        async def handle(message: Message) -> None:
            ...

        app.run()

    Connection: either ``host``/``port``/``user``/``password`` or ``url``
    (``amqp://user:pass@host:port/vhost?heartbeat=30``, ``amqps://...`` or
    ``memory://``).  A route without ``vhost=`` consumes the vhost of the
    App's URL, however the URL was given (here, ``--url`` or
    ``ASYNCWORKER_URL``); a route with ``vhost=`` keeps its own.  One connection is opened per
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
            ``ssl`` is an ``ssl.SSLContext`` or True for the default context
            (with ``url=``, the URL must then be ``amqps://``); ``heartbeat``
            defaults to 60 seconds (or the URL's ``?heartbeat=``).
        url: alternative to host/port/user/password, with the query options
            of docs/reference.md (``?heartbeat=``, ``?connection_timeout=``,
            ...).  When none of url, host, port, user and password is given,
            ``ASYNCWORKER_URL`` is used.
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
        connect_timeout: seconds to open a connection (default 10, or the
            URL's ``?connection_timeout=`` in milliseconds).
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
            if "vhost" in kwargs:
                raise TypeError(
                    "App() got an unexpected keyword argument 'vhost': write the vhost in the "
                    "URL (url='amqp://user:password@host:5672/vhost'), or give each route "
                    "its own (@app.route([...], vhost='...'))"
                )
            check_keywords(kwargs, _init_parameters(), "App()", KEYWORD_ALIASES)
            return super().__new__(cls)

    def __init__(
        self,
        host: str | None = None,
        user: str | None = None,
        password: str | None = None,
        prefetch_count: int | None = None,
        *,
        port: int | None = None,
        heartbeat: int | None = None,
        ssl: _ssl.SSLContext | bool | None = None,
        url: str | None = None,
        middlewares: Sequence[Middleware] = (),
        settlement: Middleware | None = None,
        grace_period: float | None = None,
        reconnect: Backoff | None = None,
        on_connection_event: Callable[[ConnectionEvent], Any] | None = None,
        connect_timeout: float | None = None,
        name: str = "asyncworker",
        loop_block_threshold: float | None = 1.0,
        http: str | None = None,
    ) -> None:
        self._config = AppConfig.from_arguments(
            host=host,
            user=user,
            password=password,
            prefetch_count=prefetch_count,
            port=port,
            heartbeat=heartbeat,
            ssl=ssl,
            url=url,
            middlewares=middlewares,
            settlement=settlement,
            grace_period=grace_period,
            reconnect=reconnect,
            on_connection_event=on_connection_event,
            connect_timeout=connect_timeout,
            name=name,
            loop_block_threshold=loop_block_threshold,
            http=http,
        )
        self._lifecycle: Lifecycle[App] = Lifecycle(self)
        self._publisher = Publisher(self._config.params, self._config.connector)
        self._routes: list[Route] = []
        # What is declared, per vhost (None: the vhost of the App's URL when it
        # serves, as for a route without vhost=): Queue objects, declare()'s.
        self._topology: dict[str | None, Topology] = {}
        self._find_publish_hook()
        # Kept across serve() calls: their reconnection counts are "since the App started".
        self._supervisors: dict[str, Supervisor] = {}
        self._consumers: list[Consumer] = []
        self._metrics: AppMetrics | None = None
        self._http_url: str | None = None
        self._serving = False
        self._started = False
        self._stop_event = trio.Event()
        self._stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        # The scopes the grace timer cancels: the supervisors' worker nurseries
        # and the runs of periodic tasks.
        self._worker_scopes: set[trio.CancelScope] = set()
        self._startup_scope: trio.CancelScope | None = None
        # Handlers cancelled on shutdown since the App started, and the stopped line.
        self._shutdown_report = ShutdownReport()
        #: A dict for application state shared by handlers (database pools, clients, ...).
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<App {self.url} routes={len(self._routes)}>"

    # -- configuration ------------------------------------------------------

    @property
    def url(self) -> str:
        """The broker URL, with the password masked."""
        return self._config.params.url()

    @property
    def vhost(self) -> str:
        """The default vhost: of routes and publishes that give none (the URL's, else ``/``)."""
        return self._config.params.vhost

    @property
    def http(self) -> str | None:
        """``host:port`` where ``serve()`` serves health and metrics, or None."""
        return self._config.http

    @property
    def http_url(self) -> str | None:
        """The URL of the health/metrics server while serving (None without ``http=``)."""
        return self._http_url

    prefetch_count = _ConfigAttribute[int](
        "prefetch_count", "Messages of one queue delivered and not yet settled (and handlers)."
    )
    grace_period = _ConfigAttribute[float](
        "grace_period", "Seconds in-flight handlers get to finish on shutdown."
    )
    reconnect = _ConfigAttribute[Backoff]("reconnect", "The delays between reconnection attempts.")
    loop_block_threshold = _ConfigAttribute["float | None"](
        "loop_block_threshold", "Seconds of a blocked event loop the watchdog reports (None: off)."
    )

    @property
    def routes(self) -> tuple[Route, ...]:
        """The registered routes, in registration order, each with the vhost it consumes now.

        A route registered without ``vhost=`` shows the vhost of the App's
        current URL (``reconfigured()`` moves it).
        """
        default = self._config.params.vhost
        return tuple(route.on_vhost(default) for route in self._routes)

    @contextmanager
    def reconfigured(
        self,
        *,
        url: str | None = None,
        http: str | None = None,
        connector: Connector | None = None,
    ) -> Iterator[None]:
        """Run this App with another URL, HTTP address or connector, for a ``with`` block.

        ::

            with app.reconfigured(url="amqp://worker:secret@rabbit:5672/"):
                app.run()

        ``url`` keeps the App's heartbeat, timeouts, connection name and (for
        ``amqps://``) TLS context; ``http`` is a ``host:port`` for health and
        metrics; ``connector`` opens the App's connections (``params -> async
        context manager of a connection``: the test client passes one bound
        to its private broker).  What is left None is unchanged.  On exit the
        App gets back exactly what it had.  Raises ``ValueError`` for an
        invalid URL or address (a password is never shown) and
        ``RuntimeError`` while the App is serving.
        """
        if self._serving:
            raise RuntimeError("cannot reconfigure an App while it is serving")
        original = self._config
        config = original
        if url is not None:
            try:
                config = config.with_url(url)
            except ValueError as exc:
                raise ValueError(f"invalid broker URL: {exc}") from None
        if http is not None:
            config = config.with_http(http)
        if connector is not None:
            config = config.with_connector(connector)
        self._use(config)
        try:
            yield
        finally:
            self._use(original)

    def _use(self, config: AppConfig) -> None:
        self._config = config
        self._publisher.configure(config.params, config.connector)

    # -- registration (route() and declare() are Registry's) -------------

    def _find_publish_hook(self) -> None:
        # A middleware that traces publishes declares a hook (Tracing does):
        # the App's own middlewares first, then its routes'.  None: the
        # process-wide hook, if any (see _instrumentation).
        self._publisher.hook = publish_hook_of(
            (*self._config.middlewares, *(m for route in self._routes for m in route.middlewares))
        )

    def on_startup(self, hook: F) -> F:
        """Register ``async def hook(app)`` to run before the consumers start.

        Hooks run in registration order, each once per ``serve()``.  Put
        shared resources (database pools, HTTP clients, ...) in ``app.state``
        here: handlers reach it as ``message.app.state``.  If a hook raises,
        ``serve()`` raises ``StartupError`` naming it and nothing is consumed
        (``run()`` logs one line and exits with status 1); the shutdown
        hooks do not run then.
        """
        self._lifecycle.add_startup_hook(hook)
        return hook

    def on_shutdown(self, hook: F) -> F:
        """Register ``async def hook(app)`` to run once the consumers have drained.

        Hooks run in registration order, after every in-flight handler
        finished (or was cancelled at the end of the grace period) and the
        periodic tasks stopped.  A hook that raises is logged with its
        traceback and the next one still runs.  They run shielded from
        cancellation, bounded by ``max(grace_period, 5)`` seconds in all.
        """
        self._lifecycle.add_shutdown_hook(hook)
        return hook

    @suggest_call_keywords
    def run_every(
        self,
        interval: float | datetime.timedelta,
        *,
        max_concurrency: int = 1,
        run_at_start: bool = False,
    ) -> Callable[[F], F]:
        """Register ``async def task(app)`` to run every ``interval`` while serving.

        The first run is ``interval`` after the consumers started (at once
        with ``run_at_start=True``), then one every ``interval`` on a fixed
        cadence.  A tick that finds ``max_concurrency`` runs of the task still
        in progress is skipped (logged at DEBUG): runs never pile up, and
        ticks missed while the process was busy are not made up.  An
        exception is logged with its traceback and the schedule goes on.  On
        shutdown no new run starts; runs in progress get the grace period to
        finish, then are cancelled.

        Args:
            interval: seconds (> 0) or a ``datetime.timedelta``.
            max_concurrency: how many runs of this task may overlap (>= 1).
            run_at_start: also run once as soon as the App serves.
        """
        register = self._lifecycle.periodic_task(
            interval, max_concurrency=max_concurrency, run_at_start=run_at_start
        )

        def decorator(function: F) -> F:
            register(function)
            return function

        return decorator

    # -- running ------------------------------------------------------------

    def run(self) -> None:
        """Run the App until SIGINT or SIGTERM, then drain gracefully and return.

        A second signal skips the grace period.  If the broker cannot be
        reached at startup, logs one line saying why and exits with status 1.
        While ``asyncworker run`` imports the module, it only warns and returns:
        the command runs the App itself.
        """
        if not skipped_under_cli():
            run_until_signal(
                self.serve,
                request_stop=self._request_stop,
                force_stop=self._force_stop,
                grace_period=lambda: self.grace_period,
            )

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
        config = self._config
        lifecycle = self._lifecycle
        if not (
            self._routes
            or self._topology
            or lifecycle.periodic
            or lifecycle.startup_hooks
            or lifecycle.shutdown_hooks
            or config.http
        ):
            raise RuntimeError(
                "this App has nothing to serve: add a route (@app.route([...])), a periodic "
                "task (@app.run_every(...)) or a lifecycle hook (@app.on_startup)"
            )
        # A route without vhost= consumes the vhost of the URL the App has now.
        routes = self.routes
        check_queue_clash(routes)
        declarers = {vhost: Declarer(t) for vhost, t in self._topologies().items()}
        self._serving = True
        # _stop_event is fresh (see the finally clause): a signal received by
        # run() before this point still stops this serve().
        self._stopped = trio.Event()
        self._publisher.open()
        try:
            if config.http is not None and self._metrics is None:
                from ._metrics import AppMetrics  # needs the 'http' extra

                self._metrics = AppMetrics(self.statistics)
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
            for route in routes:
                by_vhost.setdefault(route.vhost, []).extend(
                    self._consumers_of(route, config, declarers.get(route.vhost))
                )
            for vhost in declarers:  # declared again on every reconnect, without consumers
                by_vhost.setdefault(vhost, [])
            self._consumers = [c for consumers in by_vhost.values() for c in consumers]
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._publisher.attach(nursery, frozenset(by_vhost), self._vhost_connected)
                nursery.start_soon(
                    grace_timer,
                    self._stop_event,
                    lambda: self.grace_period,
                    self._cancel_handlers,
                    self.statistics,
                )
                if config.loop_block_threshold is not None:
                    await nursery.start(
                        watch_loop,
                        self.statistics,
                        config.loop_block_threshold,
                        config.params.heartbeat,
                    )
                if config.http is not None and self._metrics is not None:
                    from ._http import start_http  # needs the 'http' extra

                    self._http_url = await start_http(
                        nursery, self.statistics, self._metrics, config.http
                    )
                async with trio.open_nursery() as supervisors:
                    for vhost, consumers in by_vhost.items():
                        supervisor = self._supervisors.get(vhost)
                        if supervisor is None:
                            supervisor = self._supervisors[vhost] = Supervisor(
                                vhost, report=self._report, worker_scopes=self._worker_scopes
                            )
                        await supervisors.start(
                            functools.partial(
                                supervisor.run,
                                replace(config.params, vhost=vhost),
                                consumers,
                                connector=config.connector,
                                backoff=config.reconnect,
                                stop=self._stop_event,
                                on_drained=self._publisher.close_vhost,
                                declarer=declarers.get(vhost),
                            )
                        )
                    self._started = True
                    served = {vhost: [c.queue for c in cs] for vhost, cs in by_vhost.items()}
                    logger.info(
                        "%s",
                        serving_line(served, len(lifecycle.periodic), config.params.address),
                    )
                    task_status.started()
                    # It also keeps serve() open when nothing else would.
                    supervisors.start_soon(
                        self._shutdown_report.watch, self._stop_event, self.statistics
                    )
                    supervisors.start_soon(
                        lifecycle.run_periodic, self._stop_event, self._worker_scopes
                    )
                # Every vhost has drained: close the publishing connections
                # left (to vhosts the App only publishes to); a publish from
                # now on (a shutdown hook) opens a short-lived connection.
                self._nursery = None
                await self._publisher.detach()
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
            await lifecycle.shutdown(max(self.grace_period, 5.0))
            if self._started:
                self._shutdown_report.log_stopped()
            self._startup_scope = None
            self._nursery = None
            self._http_url = None
            self._serving = False
            self._started = False
            self._publisher.close()
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

    async def wait_idle(self) -> None:
        """Return once no handler of this App is running (``in_flight`` 0 everywhere).

        It does not wait for messages still to be delivered (the test client does).
        """
        while True:
            busy = [consumer for consumer in self._consumers if consumer.in_flight]
            if not busy:
                return
            await busy[0].wait_idle()

    def _request_stop(self) -> None:
        self._stop_event.set()
        if self._startup_scope is not None:
            self._startup_scope.cancel()

    def _force_stop(self) -> None:
        self.grace_period = 0
        self._request_stop()
        self._cancel_handlers()

    def _consumers_of(
        self, route: Route, config: AppConfig, declarer: Declarer | None
    ) -> list[Consumer]:
        """One consumer per queue of ``route``, each with its dispatcher and the route's chain."""
        handler: Callable[[Any], Awaitable[Any]] = route.handler
        if self._metrics is not None:
            handler = self._metrics.timed(handler, route.name, route.vhost)
        return consumers_for(
            route.queues,
            route.vhost,
            handler,
            chain_layers(
                route.settlement or config.settlement, (*config.middlewares, *route.middlewares)
            ),
            app=self,
            route=route.name,
            prefetch=route.prefetch_count or config.prefetch_count,
            redeclare=(lambda queue: None) if declarer is None else declarer.for_queue,
            bulk=None if route.bulk_size is None else (route.bulk_size, route.bulk_flush_interval),
            stop=self._stop_event,
            on_cancelled=functools.partial(self._on_cancelled, route.vhost),
        )

    def _vhost_connected(self, vhost: str) -> trio.Event | None:
        supervisor = self._supervisors.get(vhost)
        return None if supervisor is None else supervisor.connected

    def _on_cancelled(self, vhost: str, queue: str) -> None:
        self._report(ConnectionEvent("consumer_cancelled", vhost, queue))

    def _report(self, event: ConnectionEvent) -> None:
        report_event(self._config.on_connection_event, event, self._nursery)

    def _cancel_handlers(self) -> None:
        self._shutdown_report.cancelling(sum(consumer.in_flight for consumer in self._consumers))
        for scope in self._worker_scopes:
            scope.cancel()

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
        mandatory: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """Publish a message and wait for the broker's confirmation.

        ``body`` may be bytes (sent as is), str (UTF-8, ``text/plain``) or any
        JSON-serialisable object (``application/json``).  Returns once the
        broker confirmed the message; raises ``PublishNacked`` if it refused
        it, ``Unroutable`` if no queue was bound to receive it (a mistyped
        queue name: ``mandatory=False`` lets the broker drop such a message
        instead), ``ExchangeNotFound`` if the exchange does not exist.  While the App is
        serving, a publish interrupted by a lost connection is retried on the
        next one, for up to ``timeout`` seconds; then ``PublishTimeout``.
        """
        payload, content_type = encode_body(body)
        props = replace(properties) if properties is not None else Properties()
        if headers:
            props.headers = {**(props.headers or {}), **headers}
        if props.content_type is None and content_type is not None:
            props.content_type = content_type
        if persistent and props.delivery_mode is None:
            props.delivery_mode = 2
        await self._publisher.publish(
            payload,
            vhost=self.vhost if vhost is None else vhost,
            exchange=exchange,
            routing_key=routing_key,
            properties=props,
            mandatory=mandatory,
            timeout=timeout,
        )

    async def declare_queue(
        self,
        name: str | Queue,
        *,
        vhost: str | None = None,
        durable: bool = True,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Declare a queue now (idempotent: an existing queue with the same arguments is kept).

        ``name`` may be a ``Queue`` (declared with its bindings; ``durable`` and
        ``arguments`` are then the record's).  ``TopologyError`` on a 406.
        """
        await self._publisher.declare_queue(
            name,
            vhost=self.vhost if vhost is None else vhost,
            durable=durable,
            arguments=arguments,
        )

    # -- testing ------------------------------------------------------------------

    def test_client(self, **kwargs: Any) -> TestClient:
        """A ``TestClient`` running this App on a private in-memory broker.

        Use it as ``async with app.test_client() as client:``; keyword
        arguments go to ``asyncworker.testing.TestClient``.  See docs/testing.md.
        """
        # The one import upward (as Flask's app.test_client() does): the
        # testing layer sits above the App, and is loaded only when used.
        from .testing import TestClient

        return TestClient(self, **kwargs)

    # -- introspection ------------------------------------------------------------

    def statistics(self) -> AppStatistics:
        """A snapshot of the App's connections, consumers and publishes."""
        supervisors = self._supervisors
        return AppStatistics(
            serving=self._started,
            connected={vhost: s.is_connected for vhost, s in supervisors.items()},
            reconnects={vhost: s.reconnects for vhost, s in supervisors.items()},
            consumers=tuple(consumer.statistics() for consumer in self._consumers),
            publishes_confirmed=dict(self._publisher.confirmed),
            publishes_failed=dict(self._publisher.failed),
            handlers_cancelled=self._shutdown_report.cancelled,
        )


# -- helpers --------------------------------------------------------------------


@functools.cache
def _init_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(App.__init__).parameters) - {"self"}
