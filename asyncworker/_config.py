"""An App's configuration: a frozen record built once from arguments and ``ASYNCWORKER_*``.

``App(...)`` hands its arguments to ``AppConfig.from_arguments``, which fills
in what the code left out from the environment (``_settings``), validates
everything (a ``TypeError`` or ``ValueError`` that says what to pass) and
builds the ``ConnectionParams``.  The App keeps the record and passes each
piece it owns to the object that needs it (the supervisors get the params and
the backoff, the publisher the params, the HTTP server its address).

A record cannot change under a running App: ``App.reconfigured()`` (the one
seam the command line and the test client use) swaps in a copy made by
``with_url`` / ``with_http`` / ``with_connector`` while the App is stopped,
and puts the original back afterwards.

Route options are checked here too (``check_route``), and what
``App.declare()`` registers (``check_declare``), so that every "you passed
X, pass Y" message of the public API lives in one module.  A route given
``Queue`` objects adds them to a ``Topology`` (``_topology``), which the
supervisor declares.
"""

from __future__ import annotations

import importlib.util
import math
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from pamqp import constants as amqp

from . import _settings
from ._instrumentation import PublishHook
from ._settlement import AckRequeue
from ._supervisor import Backoff, ConnectionEvent
from ._topology import Binding, Exchange, Queue, Topology
from ._transports import Connection, ConnectionParams, connect, redact_url
from ._transports.params import DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEARTBEAT, parse_url
from ._util import check_keywords, install_hint, is_async_callable

__all__ = [
    "AnyMiddleware",
    "AppConfig",
    "Connector",
    "Route",
    "KEYWORD_ALIASES",
    "chain_layers",
    "check_declare",
    "check_keywords",
    "check_prefetch",
    "check_queue_clash",
    "check_route",
    "check_settlement",
    "publish_hook_of",
    "require_http_extra",
]

#: How the App opens a connection: ``connector(params)`` is an async context
#: manager of a ``Connection`` (by default the transports' ``connect``).
Connector: TypeAlias = Callable[[ConnectionParams], AbstractAsyncContextManager[Connection]]
#: A middleware or settlement policy of either kind of route (what ``Route`` stores).
AnyMiddleware: TypeAlias = Callable[[Any, Any], Awaitable[Any]]

#: The AMQP over TLS port (pamqp names only the plain one).
_AMQPS_PORT = 5671


@dataclass(frozen=True, slots=True)
class AppConfig:
    """Everything ``App(...)`` was told, validated, with the environment filled in."""

    #: Where and how to connect (a vhost of its own is set per connection).
    params: ConnectionParams
    #: Unsettled deliveries per queue (``basic.qos``), and concurrent handlers.
    prefetch_count: int
    #: Seconds in-flight handlers get on shutdown.
    grace_period: float
    #: Delays between reconnection attempts.
    reconnect: Backoff
    #: App-wide middlewares, outermost first.
    middlewares: tuple[AnyMiddleware, ...]
    #: The App's settlement policy.
    settlement: AnyMiddleware
    #: The connection event callback, if any.
    on_connection_event: Callable[[ConnectionEvent], Any] | None
    #: The loop-block watchdog threshold in seconds, or None when off.
    loop_block_threshold: float | None
    #: ``host:port`` of the health/metrics server, or None.
    http: str | None
    #: Opens connections (the test client passes one bound to its own broker).
    connector: Connector = connect

    @classmethod
    def from_arguments(
        cls,
        *,
        host: str | None,
        user: str | None,
        password: str | None,
        prefetch_count: int | None,
        port: int | None,
        heartbeat: int | None,
        ssl: _ssl.SSLContext | bool | None,
        url: str | None,
        middlewares: Sequence[AnyMiddleware],
        settlement: AnyMiddleware | None,
        grace_period: float | None,
        reconnect: Backoff | None,
        on_connection_event: Callable[[ConnectionEvent], Any] | None,
        connect_timeout: float | None,
        name: str,
        loop_block_threshold: float | None,
        http: str | None,
    ) -> AppConfig:
        """Validate ``App(...)``'s arguments; the environment fills in what is None."""
        # Deploy-time settings: the environment fills in what the code left out.
        prefetch_count = _settings.prefetch_count(prefetch_count)
        grace_period = _settings.grace_period(grace_period)
        http = _settings.http_address(http)
        if url is None and host is None and port is None and user is None and password is None:
            url = _settings.url()
        prefetch_count = check_prefetch(prefetch_count, "")
        if heartbeat is not None and (isinstance(heartbeat, bool) or heartbeat < 0):
            raise ValueError(f"heartbeat must be >= 0 seconds (0 disables it), got {heartbeat}")
        if connect_timeout is not None and not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
        if not grace_period >= 0:
            raise ValueError(f"grace_period must be >= 0 seconds, got {grace_period}")
        if reconnect is not None and not isinstance(reconnect, Backoff):
            raise TypeError(f"reconnect must be an asyncworker.Backoff, got {reconnect!r}")
        if loop_block_threshold is not None and not loop_block_threshold > 0:
            raise ValueError(
                "loop_block_threshold must be > 0 seconds, or None to disable the "
                f"watchdog, got {loop_block_threshold}"
            )
        if http is not None:
            require_http_extra()
        ssl_context = _ssl.create_default_context() if ssl is True else (ssl or None)
        if url is not None:
            if host is not None or user is not None or password is not None or port is not None:
                raise ValueError(
                    "give either url= or host=/port=/user=/password=, not both "
                    f"(url={redact_url(url)!r})"
                )
            params = _params_of_url(url, heartbeat, connect_timeout, ssl_context, name)
        else:
            params = ConnectionParams(
                scheme="amqps" if ssl_context is not None else "amqp",
                host=host or "127.0.0.1",
                port=port or (_AMQPS_PORT if ssl_context is not None else amqp.DEFAULT_PORT),
                user=user if user is not None else amqp.DEFAULT_USER,
                password=password if password is not None else amqp.DEFAULT_PASS,
                heartbeat=DEFAULT_HEARTBEAT if heartbeat is None else heartbeat,
                connect_timeout=(
                    DEFAULT_CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
                ),
                client_name=name,
                ssl=ssl_context,
            )
        return cls(
            params=params,
            prefetch_count=prefetch_count,
            grace_period=float(grace_period),
            reconnect=reconnect or Backoff(),
            middlewares=check_middlewares(middlewares, "App"),
            settlement=check_settlement(settlement, "App"),
            on_connection_event=on_connection_event,
            loop_block_threshold=loop_block_threshold,
            http=http,
        )

    def with_url(self, url: str) -> AppConfig:
        """This configuration on another broker URL (``--url``, ``ASYNCWORKER_URL``).

        What the URL's query options say (``?heartbeat=5``) wins; the rest of
        the heartbeat, timeouts, frame and channel limits and the connection
        name are kept.  TLS: an ``amqps://`` URL keeps the App's TLS context
        (``ssl=``), else it gets its TLS options' context or the default
        verifying one; an ``amqp://`` URL for an App that connects with TLS
        is refused, since the credentials would cross the network in clear.
        Raises ``ValueError`` for a URL that cannot be parsed (the message
        never shows its password).
        """
        old = self.params
        given = parse_url(url)
        scheme = given["scheme"]
        if scheme == "amqp" and old.ssl is not None and old.scheme != "memory":
            raise ValueError(
                f"{redact_url(url)!r} is plain amqp://, and this App connects with TLS "
                f"({old.scheme}://, ssl=...): the password would cross the network "
                "unencrypted. Use amqps:// (TLS port 5671 by default), or remove ssl= "
                "from App(...) to connect without TLS"
            )
        kept: dict[str, Any] = {
            "heartbeat": old.heartbeat,
            "connect_timeout": old.connect_timeout,
            "frame_max": old.frame_max,
            "channel_max": old.channel_max,
            "client_name": old.client_name,
        }
        if scheme == "amqps" and old.ssl is not None:
            kept["ssl"] = old.ssl
        return replace(self, params=ConnectionParams.from_url(url, defaults=kept))

    def with_http(self, address: str | None) -> AppConfig:
        """This configuration serving health and metrics on ``address`` (None: no server)."""
        if address is not None:
            _settings.parse_http_address(address)
            require_http_extra()
        return replace(self, http=address)

    def with_connector(self, connector: Connector) -> AppConfig:
        """This configuration opening its connections with ``connector``."""
        if not callable(connector):
            raise TypeError(
                f"connector must be a callable (params -> async context manager of a "
                f"connection), got {connector!r}"
            )
        return replace(self, connector=connector)


@dataclass(frozen=True, slots=True)
class Route:
    """One route of an App, as ``App.route()`` registered it (see ``App.routes``)."""

    #: The handler (a ``Message`` per call, or a ``Batch`` on a bulk route).
    handler: Callable[..., Awaitable[Any]]
    #: The names of the queues it consumes.
    queues: tuple[str, ...]
    #: Their vhost: the route's ``vhost=``, else the vhost of the App's URL
    #: (as it is when the App serves: ``--url`` and ``ASYNCWORKER_URL`` move it).
    vhost: str
    #: The route's own middlewares (inside the App's), outermost first.
    middlewares: tuple[AnyMiddleware, ...]
    #: The route's settlement policy, or None for the App's.
    settlement: AnyMiddleware | None
    #: Whether missing queues given by name are declared (durable, classic).
    declare: bool
    #: The handler's qualified name (in logs, metrics and statistics).
    name: str
    #: Messages per batch on a bulk route; None for a route of single messages.
    bulk_size: int | None = None
    #: On a bulk route, seconds a partial batch waits for more messages.
    bulk_flush_interval: float = 1.0
    #: Whether ``vhost=`` was given; if not, the route follows the App's URL.
    explicit_vhost: bool = True
    #: The route's own prefetch (its ``basic.qos`` and concurrency), or None for the App's.
    prefetch_count: int | None = None
    #: The ``Queue`` objects it was given: the App declares them (and their bindings).
    declared: tuple[Queue, ...] = ()

    def on_vhost(self, default: str) -> Route:
        """This route as it serves when the App's URL has vhost ``default``."""
        if self.explicit_vhost or self.vhost == default:
            return self
        return replace(self, vhost=default)


#: Keywords people write from habit (other libraries, the AMQP spec), and the right one.
KEYWORD_ALIASES = {
    "hostname": "host",
    "username": "user",
    "login": "user",
    "passwd": "password",
    "prefetch": "prefetch_count",
    "qos": "prefetch_count",
    "uri": "url",
    "heartbeat_interval": "heartbeat",
    "timeout": "connect_timeout",
    "connection_timeout": "connect_timeout",
    "virtual_host": "vhost",
    "virtualhost": "vhost",
    "queue": "queues",
    "bulk": "bulk_size",
    "max_retries": "max_attempts",
    "retries": "max_attempts",
}


def check_middlewares(middlewares: object, where: str) -> tuple[AnyMiddleware, ...]:
    """The middlewares as a tuple, or a ``TypeError``/``ValueError`` saying what to pass."""
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
        for capability in ("around_settlement", "around_handler"):
            step = getattr(middleware, capability, None)
            if step is not None and not is_async_callable(step):
                raise TypeError(
                    f"{where}: {type(middleware).__name__}.{capability} must be an async "
                    f"callable (message, call_next), got {step!r}"
                )
        hook = getattr(middleware, "publish_hook", None)
        if hook is not None and not callable(hook):
            raise TypeError(
                f"{where}: {type(middleware).__name__}.publish_hook must be a function "
                f"(vhost, exchange, routing_key, properties) -> context manager, got {hook!r}"
            )
    return result


def chain_layers(
    settlement: AnyMiddleware, middlewares: Sequence[AnyMiddleware]
) -> tuple[AnyMiddleware, ...]:
    """The steps of a route's chain around its handler, outermost first.

    The settlement policy, then ``middlewares``.  A middleware may declare two
    more steps of its own (in the middlewares' order, each group):

    * ``around_settlement``, run *outside* the settlement policy: it sees the
      message once it is settled (``Tracing`` ends its span there, with the
      outcome), while the policy still gets every exception first;
    * ``around_handler``, run right around the handler, inside every
      middleware: it sees the handler's exception even when a middleware
      swallows it (``Retry``), as ``Tracing`` must to record it.
    """
    outer = [
        step
        for middleware in middlewares
        if (step := getattr(middleware, "around_settlement", None)) is not None
    ]
    inner = [
        step
        for middleware in middlewares
        if (step := getattr(middleware, "around_handler", None)) is not None
    ]
    return (*outer, settlement, *middlewares, *inner)


def publish_hook_of(middlewares: Iterable[AnyMiddleware]) -> PublishHook | None:
    """The publish hook the first of ``middlewares`` that declares one offers (``publish_hook``)."""
    for middleware in middlewares:
        hook: PublishHook | None = getattr(middleware, "publish_hook", None)
        if hook is not None:
            return hook
    return None


def check_settlement(settlement: object, where: str) -> AnyMiddleware:
    """The settlement policy (``AckRequeue()`` for None), or a ``TypeError`` saying what to pass.

    Only an object that declares itself a settlement policy
    (``is_settlement_policy = True``, as ``AckRequeue`` does) settles every
    message: anything else here would leave successful messages unacked and
    stall the consumer once ``prefetch_count`` of them are held.
    """
    if settlement is None:
        return AckRequeue()
    declares = getattr(settlement, "is_settlement_policy", False) is True
    if isinstance(settlement, type):
        name = settlement.__name__
        if declares:
            raise TypeError(
                f"{where}: settlement={name} is the class; pass an instance {name}() "
                f"(or {name}(on_exception=Action.REJECT), ...)"
            )
        raise TypeError(
            f"{where}: settlement={name} is a class, not a settlement policy; pass an "
            "instance of a policy such as AckRequeue()"
        )
    if not declares:
        name = type(settlement).__name__
        if is_async_callable(settlement):
            raise TypeError(
                f"{where}: {name} is a middleware, not a settlement policy: pass it in "
                f"middlewares=[...]; settlement= takes a policy such as AckRequeue() or "
                "AckRequeue(on_exception=Action.REJECT)"
            )
        raise TypeError(
            f"{where}: settlement= takes a settlement policy such as AckRequeue() or "
            f"AckRequeue(on_exception=Action.REJECT), got {settlement!r}"
        )
    if not is_async_callable(settlement):
        raise TypeError(
            f"{where}: settlement policy {settlement!r} must be an async callable "
            "(async def __call__(self, message, call_next): ...)"
        )
    return settlement


def check_prefetch(prefetch_count: object, where: str) -> int:
    """``prefetch_count`` as an int between 1 and 65535, or a ``TypeError``/``ValueError``."""
    if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int):
        raise TypeError(f"{where}prefetch_count must be an int, got {prefetch_count!r}")
    if not 1 <= prefetch_count <= 65535:
        raise ValueError(
            f"{where}prefetch_count must be between 1 and 65535, got {prefetch_count}: it is how "
            "many messages of one queue may be delivered and not yet settled"
        )
    return prefetch_count


def check_declare(entities: Iterable[object], topology: Topology) -> Topology:
    """``topology`` with ``entities`` (``Exchange``/``Queue`` objects) added, as a new set.

    Raises ``TypeError`` for anything else, ``ValueError`` for a record that
    conflicts with one already registered under its name.
    """
    updated = topology.copy()
    for entity in entities:
        if not isinstance(entity, Exchange | Queue):
            if isinstance(entity, str):
                hint = " (a queue name alone declares nothing: pass Queue(name))"
            elif isinstance(entity, Binding):
                hint = " (a Binding goes in Queue(..., bindings=[...]))"
            else:
                hint = ""
            raise TypeError(f"declare() takes Exchange and Queue objects, got {entity!r}{hint}")
        updated.add(entity)
    return updated


def check_route(
    queues: Iterable[str | Queue] | str | Queue,
    *,
    vhost: str | None,
    middlewares: Sequence[AnyMiddleware],
    settlement: AnyMiddleware | None,
    declare: bool,
    bulk_size: int | None,
    bulk_flush_interval: float,
    prefetch_count: int | None,
    config: AppConfig,
    existing: Sequence[Route],
    topology: Topology,
) -> tuple[Callable[[Callable[..., Awaitable[Any]]], Route], Topology]:
    """Validate ``App.route()``'s options.

    Returns what makes the ``Route`` of a handler, and ``topology`` (that of
    the route's vhost, or of the App's when the route gives none) with the
    route's ``Queue`` objects (and, with ``declare=True``, its queue names)
    added: the App keeps it once the handler is registered.
    """
    given = (queues,) if isinstance(queues, str | Queue) else tuple(queues)
    if not given:
        raise ValueError("route() needs at least one queue, got an empty list")
    for queue in given:
        if not isinstance(queue, Queue) and (not isinstance(queue, str) or not queue):
            raise ValueError(
                f"route() takes queue names (non-empty strings) or Queue objects, got {queue!r}"
            )
    names = tuple(q.name if isinstance(q, Queue) else q for q in given)
    declared = tuple(q for q in given if isinstance(q, Queue))
    if len(set(names)) != len(names):
        raise ValueError(f"route() got the same queue twice: {names!r}")
    explicit = vhost is not None
    if vhost is None:
        vhost = config.params.vhost
    elif not isinstance(vhost, str) or not vhost:
        raise ValueError(f"vhost must be a non-empty string, got {vhost!r}")
    check_queue_clash([*existing, Route(_never, names, vhost, (), None, False, "")])
    route_prefetch = None if prefetch_count is None else check_prefetch(prefetch_count, "route(): ")
    route_middlewares = check_middlewares(middlewares, "route()")
    route_settlement = None if settlement is None else check_settlement(settlement, "route()")
    interval = _check_bulk(
        bulk_size,
        bulk_flush_interval,
        route_prefetch or config.prefetch_count,
        (*config.middlewares, *route_middlewares),
        "the route's" if route_prefetch is not None else "the App's",
    )
    updated = check_declare(declared, topology)
    if declare:
        for name in names:
            updated.ensure(name)

    def make(handler: Callable[..., Awaitable[Any]]) -> Route:
        if not is_async_callable(handler):
            raise TypeError(
                f"handler {getattr(handler, '__qualname__', handler)!r} must be an async "
                "function (async def handler(message): ...)"
            )
        return Route(
            handler=handler,
            queues=names,
            vhost=vhost,
            middlewares=route_middlewares,
            settlement=route_settlement,
            declare=bool(declare),
            name=getattr(handler, "__qualname__", repr(handler)),
            bulk_size=bulk_size,
            bulk_flush_interval=interval,
            explicit_vhost=explicit,
            prefetch_count=route_prefetch,
            declared=declared,
        )

    return make, updated


async def _never(message: Any) -> None:  # the handler of a route being checked
    raise NotImplementedError


def check_queue_clash(routes: Sequence[Route]) -> None:
    """Raise ``ValueError`` if two of ``routes`` consume one queue of one vhost.

    Checked at registration, and again when the App serves: a route without
    ``vhost=`` follows the App's URL, which ``--url`` may have moved onto the
    vhost of another route.
    """
    owners: dict[tuple[str, str], Route] = {}
    for route in routes:
        for queue in route.queues:
            first = owners.setdefault((route.vhost, queue), route)
            if first is not route:
                what = "already has a handler" if route.name == "" else "has two handlers"
                names = first.name if route.name == "" else f"{first.name} and {route.name}"
                raise ValueError(
                    f"queue {queue!r} in vhost {route.vhost!r} {what} ({names}); one queue, "
                    "one route (a route without vhost= consumes the vhost of the App's URL)"
                )


def _check_bulk(
    bulk_size: int | None,
    bulk_flush_interval: float,
    prefetch_count: int,
    middlewares: Sequence[AnyMiddleware],
    whose: str = "the App's",
) -> float:
    """Validate the bulk options of ``route()``; the flush interval as a float."""
    if bulk_size is None:
        return 1.0
    if isinstance(bulk_size, bool) or not isinstance(bulk_size, int):
        raise TypeError(f"bulk_size must be an int, got {bulk_size!r}")
    if bulk_size < 1:
        raise ValueError(
            f"bulk_size must be >= 1, got {bulk_size}: it is how many messages the handler "
            "receives at most per call (leave it out for a handler of single messages)"
        )
    if bulk_size > prefetch_count:
        where = "route(prefetch_count=...)" if whose == "the route's" else "App(prefetch_count=...)"
        raise ValueError(
            f"bulk_size={bulk_size} is larger than {whose} prefetch_count={prefetch_count}: "
            "the broker would never deliver a full batch. Raise prefetch_count to at least "
            f"{bulk_size} ({where}) or lower bulk_size"
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
    return float(bulk_flush_interval)


def require_http_extra() -> None:
    """Raise ``RuntimeError`` saying how to install the 'http' extra, if it is missing."""
    missing = [
        name
        for name in ("hypercorn", "prometheus_client")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise RuntimeError(
            f"App(http=...) needs {' and '.join(missing)}: install the 'http' extra "
            f"({install_hint('http')})"
        )


def _params_of_url(
    url: str,
    heartbeat: int | None,
    connect_timeout: float | None,
    ssl_context: _ssl.SSLContext | None,
    name: str,
) -> ConnectionParams:
    """The ``ConnectionParams`` of ``App(url=..., ...)``: the URL and the arguments agree."""
    given = parse_url(url)
    shown = redact_url(url)
    for argument, value, key, scale in (
        ("heartbeat", heartbeat, "heartbeat", 1),
        ("connect_timeout", connect_timeout, "connect_timeout", 1000),
    ):
        if value is not None and key in given and given[key] != value:
            option = "connection_timeout" if key == "connect_timeout" else key
            raise ValueError(
                f"{argument}={value} and the URL's ?{option}={round(given[key] * scale)} "
                f"disagree ({shown!r}): give it in one place"
            )
    if ssl_context is not None:
        if given["scheme"] == "amqp":
            raise ValueError(
                f"ssl= asks for TLS, and url={shown!r} is plain amqp://: write amqps:// "
                "(TLS port 5671 by default), or leave ssl= out"
            )
        if "ssl" in given:
            raise ValueError(
                f"give the TLS settings either as ssl= or as options of url={shown!r}, not both"
            )
    defaults: dict[str, Any] = {
        "heartbeat": DEFAULT_HEARTBEAT,
        "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        "client_name": name,
    }
    explicit: dict[str, Any] = {}
    if heartbeat is not None:
        explicit["heartbeat"] = heartbeat
    if connect_timeout is not None:
        explicit["connect_timeout"] = connect_timeout
    if ssl_context is not None and given["scheme"] == "amqps":
        explicit["ssl"] = ssl_context
    return ConnectionParams.from_url(url, defaults=defaults, **explicit)
