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

Route options are checked here too (``check_route``), so that every
"you passed X, pass Y" message of the public API lives in one module.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import ssl as _ssl
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from pamqp import constants as amqp

from . import _settings
from ._settlement import AckRequeue
from ._supervisor import Backoff, ConnectionEvent
from ._transports import Connection, ConnectionParams, connect, redact_url
from ._util import is_async_callable

__all__ = [
    "AnyMiddleware",
    "AppConfig",
    "Connector",
    "Route",
    "check_keywords",
    "check_route",
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
        heartbeat: int,
        ssl: _ssl.SSLContext | bool | None,
        url: str | None,
        middlewares: Sequence[AnyMiddleware],
        settlement: AnyMiddleware | None,
        grace_period: float | None,
        reconnect: Backoff | None,
        on_connection_event: Callable[[ConnectionEvent], Any] | None,
        connect_timeout: float,
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
        if http is not None:
            require_http_extra()
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
                port=port or (_AMQPS_PORT if ssl_context is not None else amqp.DEFAULT_PORT),
                user=user if user is not None else amqp.DEFAULT_USER,
                password=password if password is not None else amqp.DEFAULT_PASS,
                **common,
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
        """This configuration on another broker URL.

        The heartbeat, the timeouts, the connection name and (for an
        ``amqps://`` URL) the TLS context are kept.  Raises ``ValueError`` for
        a URL that cannot be parsed (the message never shows its password).
        """
        old = self.params
        params = ConnectionParams.from_url(
            url,
            heartbeat=old.heartbeat,
            connect_timeout=old.connect_timeout,
            client_name=old.client_name,
        )
        if params.scheme == "amqps" and old.ssl is not None:
            params = replace(params, ssl=old.ssl)
        return replace(self, params=params)

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
    #: The queues it consumes.
    queues: tuple[str, ...]
    #: Their vhost.
    vhost: str
    #: The route's own middlewares (inside the App's), outermost first.
    middlewares: tuple[AnyMiddleware, ...]
    #: The route's settlement policy, or None for the App's.
    settlement: AnyMiddleware | None
    #: Whether missing queues are declared (durable).
    declare: bool
    #: The handler's qualified name (in logs, metrics and statistics).
    name: str
    #: Messages per batch on a bulk route; None for a route of single messages.
    bulk_size: int | None = None
    #: On a bulk route, seconds a partial batch waits for more messages.
    bulk_flush_interval: float = 1.0


def check_keywords(given: Iterable[str], allowed: Collection[str], what: str) -> None:
    """Raise ``TypeError`` for the first of ``given`` not in ``allowed``, with a "did you mean"."""
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{what} got an unexpected keyword argument {name!r}{hint}")


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
    return result


def check_settlement(settlement: AnyMiddleware | None, where: str) -> AnyMiddleware:
    """The settlement policy (``AckRequeue()`` for None), or a ``TypeError``."""
    if settlement is None:
        return AckRequeue()
    if not is_async_callable(settlement):
        raise TypeError(
            f"{where}: settlement must be an AckRequeue(...) or an async callable "
            f"(message, call_next) that settles every message, got {settlement!r}"
        )
    return settlement


def check_route(
    queues: Iterable[str] | str,
    *,
    vhost: str,
    middlewares: Sequence[AnyMiddleware],
    settlement: AnyMiddleware | None,
    declare: bool,
    bulk_size: int | None,
    bulk_flush_interval: float,
    config: AppConfig,
    existing: Sequence[Route],
) -> Callable[[Callable[..., Awaitable[Any]]], Route]:
    """Validate ``App.route()``'s options; returns what makes the ``Route`` of a handler."""
    names = (queues,) if isinstance(queues, str) else tuple(queues)
    if not names:
        raise ValueError("route() needs at least one queue name, got an empty list")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"queue names must be non-empty strings, got {name!r}")
    if not isinstance(vhost, str) or not vhost:
        raise ValueError(f"vhost must be a non-empty string, got {vhost!r}")
    for route in existing:
        clash = set(route.queues) & set(names)
        if route.vhost == vhost and clash:
            raise ValueError(
                f"queue {sorted(clash)[0]!r} in vhost {vhost!r} already has a "
                f"handler ({route.name}); one queue, one route"
            )
    route_middlewares = check_middlewares(middlewares, "route()")
    route_settlement = None if settlement is None else check_settlement(settlement, "route()")
    interval = _check_bulk(
        bulk_size,
        bulk_flush_interval,
        config.prefetch_count,
        (*config.middlewares, *route_middlewares),
    )

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
        )

    return make


def _check_bulk(
    bulk_size: int | None,
    bulk_flush_interval: float,
    prefetch_count: int,
    middlewares: Sequence[AnyMiddleware],
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
            "(pip install 'asyncworker[http]')"
        )
