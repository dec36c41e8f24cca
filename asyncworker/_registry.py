"""What an App is told before it serves: its routes and its topology (a base of ``App``).

``Registry`` holds the registration methods of the App facade that concern
queues: ``route()`` (which takes ``Queue`` objects and queue names) and
``declare()``, and what reads what they registered (``declared_queue()``,
``declare_topology()``).  ``App`` inherits them; they check their arguments
with ``_config`` (``check_route``, ``check_declare``) and keep the result in
the App's own state, which ``App.__init__`` creates: ``_routes`` and
``_topology`` (one ``Topology`` per vhost, the key None standing for the
vhost of the App's URL as it is when the App serves, as a route without
``vhost=`` consumes it).  Split from ``_app`` by topic; nothing else writes
those attributes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._chain import BulkMiddleware, Middleware
from ._config import AnyMiddleware, AppConfig, Route, check_declare, check_route
from ._declare import declare_topology
from ._topology import Exchange, Queue, Topology
from ._util import suggest_call_keywords

__all__ = ["Registry"]

# A handler of messages, or of ``list[Message]`` on a bulk route.
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


class Registry:
    """The App's routes and topology, and the methods that register them (see the module)."""

    if TYPE_CHECKING:
        # Created by App.__init__; declared here for the type checker.
        _config: AppConfig
        _serving: bool
        _routes: list[Route]
        _topology: dict[str | None, Topology]

        @property
        def vhost(self) -> str: ...

        def _find_publish_hook(self) -> None: ...

    @overload
    def route(
        self,
        queues: Iterable[str | Queue] | str | Queue,
        *,
        vhost: str | None = None,
        middlewares: Sequence[Middleware] = (),
        settlement: Middleware | None = None,
        declare: bool = False,
        bulk_size: None = None,
        bulk_flush_interval: float = 1.0,
        prefetch_count: int | None = None,
    ) -> Callable[[H], H]: ...

    @overload
    def route(
        self,
        queues: Iterable[str | Queue] | str | Queue,
        *,
        vhost: str | None = None,
        middlewares: Sequence[BulkMiddleware] = (),
        settlement: BulkMiddleware | None = None,
        declare: bool = False,
        bulk_size: int,
        bulk_flush_interval: float = 1.0,
        prefetch_count: int | None = None,
    ) -> Callable[[H], H]: ...

    @suggest_call_keywords
    def route(
        self,
        queues: Iterable[str | Queue] | str | Queue,
        *,
        vhost: str | None = None,
        middlewares: Sequence[AnyMiddleware] = (),
        settlement: AnyMiddleware | None = None,
        declare: bool = False,
        bulk_size: int | None = None,
        bulk_flush_interval: float = 1.0,
        prefetch_count: int | None = None,
    ) -> Callable[[H], H]:
        """Register an async handler for one or more queues.

        The handler receives one ``Message`` per call, from any of ``queues``;
        with ``bulk_size``, a ``Batch`` (a ``list[Message]`` of one queue)
        instead: see docs/bulk.md.  The middlewares of a bulk route receive
        that ``Batch`` too (``BulkMiddleware``).

        Args:
            queues: ``Queue`` objects, declared with their bindings at startup
                and after every reconnect (docs/topology.md), or queue names.
            vhost: their vhost; without it, the vhost of the App's URL as it
                is when the App serves (``/`` when the URL names none).
            middlewares: this route's middlewares, inside the App's.
            settlement: this route's settlement policy, instead of the App's.
            declare: declare the queues given by name that do not exist
                (durable, classic); one that exists is consumed as it is.
            bulk_size: make this a bulk route: the handler receives up to this
                many messages per call (1 <= bulk_size <= prefetch_count).
            bulk_flush_interval: on a bulk route, seconds after the first
                message of a partial batch when the batch is handled anyway.
            prefetch_count: this route's own ``basic.qos`` and bound of
                concurrent handlers per queue, instead of the App's.
        """
        if self._serving:
            raise RuntimeError("routes must be registered before serve()/run() starts")
        make_route, topology = check_route(
            queues,
            vhost=vhost,
            middlewares=middlewares,
            settlement=settlement,
            declare=declare,
            bulk_size=bulk_size,
            bulk_flush_interval=bulk_flush_interval,
            prefetch_count=prefetch_count,
            config=self._config,
            existing=self._routes,
            topology=self._topology.get(vhost) or Topology(vhost or self.vhost),
        )

        def decorator(handler: H) -> H:
            self._routes.append(make_route(handler))
            self._topology[vhost] = topology
            self._find_publish_hook()  # a route's middleware may trace publishes
            return handler

        return decorator

    def declare(self, *entities: Exchange | Queue, vhost: str | None = None) -> None:
        """Declare exchanges and queues (with their bindings) that no route consumes.

        ``app.declare(Queue("orders.dead", bindings=[Binding(dlx)]))``: like a
        route's ``Queue`` objects, declared at startup and after every
        reconnect.  Call it before ``serve()``; ``vhost`` as in ``route()``.
        """
        if self._serving:
            raise RuntimeError("declare() must be called before serve()/run() starts")
        topology = self._topology.get(vhost) or Topology(vhost or self.vhost)
        self._topology[vhost] = check_declare(entities, topology)

    def _topologies(self) -> dict[str, Topology]:
        """What each vhost declares now: the URL's vhost takes what gave no vhost."""
        return Topology.by_vhost(self._topology, self.vhost)

    def declared_queue(self, name: str, *, vhost: str | None = None) -> Queue | None:
        """The ``Queue`` this App declares under ``name`` (in ``vhost``), or None.

        ``Retry`` declares matching siblings from it (a quorum ``<queue>.dlq``).
        """
        topology = self._topologies().get(self.vhost if vhost is None else vhost)
        return None if topology is None else topology.queue(name)

    async def declare_topology(self) -> list[str]:
        """Declare the App's whole topology now, as ``serve()`` does at startup.

        What ``asyncworker declare module:app`` runs; returns what it declared
        (``"queue 'orders' in vhost '/'"``, ...).  Raises ``TopologyError`` if
        the broker refuses a declaration, ``ConnectError`` if it cannot be reached.
        """
        config, done = self._config, []
        for vhost, topology in self._topologies().items():
            params = replace(config.params, vhost=vhost)
            for what in await declare_topology(config.connector, params, topology):
                done.append(f"{what} in vhost {vhost!r}")
        return done
