"""``MemoryBroker``: the in-memory broker's vhosts, expiry timer, inspection and names.

A ``MemoryBroker`` owns the model (``model``: vhosts with their queues and
exchanges) and what spans it: the TTL timer that expires messages without a
consumer, the change counter that inspection waits on (``version``,
``wait_for_change``), and the inspection methods tests read it with.  The
process-wide registry at the bottom maps the ``NAME`` of ``memory://NAME``
URLs to brokers; a test can also hand a broker to ``transport.connect``
directly and leave the registry alone.

The transport (``transport.MemoryConnection``) plugs in through three
hooks: ``_vhost`` to open a vhost, ``_attach``/``_detach`` so that one open
connection at a time hosts the timer task in its nursery.  The broker knows
connections only as the seam's ``Connection``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import secrets
from typing import Any, Final, Protocol

import pamqp.exceptions
import trio

from ..base import Connection, Delivery
from .model import ConsumerInfo, Queue, QueueStats, VHost, current_time

__all__ = [
    "ConsumerInfo",
    "MemoryBroker",
    "QueueStats",
    "get_broker",
    "register_broker",
    "unregister_broker",
]

#: The reply code of a connection closed by an operator (``rabbitmqctl close_connection``).
CONNECTION_FORCED: Final[int] = pamqp.exceptions.AMQPConnectionForced.value


class _Hosted(Connection, Protocol):
    """What the broker needs of an open connection (``transport.MemoryConnection``)."""

    def force_close(self, reply_code: int, reply_text: str) -> None:
        """Close the connection from the broker's side, as an operator would."""
        ...


logger = logging.getLogger("asyncworker.memory")


class MemoryBroker:
    """An in-memory AMQP broker: vhosts, exchanges, queues and their messages.

    A connection reaches it when it is handed to the memory transport's
    ``connect(params, broker=...)``, or by name, through the process-wide
    registry (``get_broker``/``register_broker``) that ``memory://NAME``
    URLs use.  The inspection methods below are for tests; they take the
    vhost first, like RabbitMQ's management API.  Those naming one queue
    raise ``KeyError`` if it does not exist (``has_queue`` says whether it
    does), and first expire the messages at its head whose TTL ran out, so
    that they read what a consumer would find.
    """

    def __init__(self) -> None:
        #: The name under which the broker is registered, or None.
        self.name: str | None = None
        self._vhosts: dict[str, VHost] = {"/": self._new_vhost("/")}
        # The open connections that can host the timer: their nursery and trio run.
        self._hosts: dict[_Hosted, tuple[trio.Nursery, trio.lowlevel.TrioToken]] = {}
        # Expiry timer: a heap of (deadline, seq, queue), driven by one task
        # hosted in the nursery of one open connection at a time.
        self._heap: list[tuple[float, int, Queue]] = []
        self._seq = itertools.count()
        self._timer_owner: Connection | None = None
        self._timer_token: trio.lowlevel.TrioToken | None = None
        self._timer_wake: trio.Event | None = None
        self._timer_target = math.inf
        self._version = 0
        self._change_waiter: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.name!r} vhosts={sorted(self._vhosts)}>"

    @property
    def url(self) -> str:
        """The ``memory://`` URL that connects to this broker (it must be registered)."""
        if self.name is None:
            raise RuntimeError("this MemoryBroker is not registered: call register_broker() first")
        return f"memory://{self.name}"

    # -- administration -----------------------------------------------------

    def add_vhost(self, name: str) -> None:
        """Create a vhost (no-op if it exists)."""
        if name not in self._vhosts:
            self._vhosts[name] = self._new_vhost(name)

    def vhosts(self) -> list[str]:
        """The names of the vhosts, sorted."""
        return sorted(self._vhosts)

    def close_connections(
        self, name: str | None = None, reason: str = "closed by the memory broker"
    ) -> int:
        """Close the open connections named ``name`` (every one when None); return how many.

        As ``rabbitmqctl close_connection``: each closes with 320
        CONNECTION_FORCED and ``reason``, its channels' unacknowledged
        deliveries go back to their queues, and a supervised App reconnects.
        ``name`` is the connection name a client gave (``App(name=...)``;
        ``ConnectionParams.client_name``).
        """
        closing = [
            connection
            for connection in self._hosts
            if connection.is_open and (name is None or connection.params.client_name == name)
        ]
        for connection in closing:
            connection.force_close(CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}")
        return len(closing)

    def reset(self) -> None:
        """Forget every queue, exchange and vhost except an empty ``/``.

        Open connections are not closed, but their channels' unacknowledged
        deliveries are forgotten; call it between tests, not during one.
        """
        for vhost in self._vhosts.values():
            for queue in list(vhost.queues.values()):
                queue.deleted = True
        self._vhosts = {"/": self._new_vhost("/")}
        self._heap.clear()
        self._changed()

    # -- inspection ---------------------------------------------------------

    def _queue(self, vhost: str, queue: str) -> Queue:
        try:
            vh = self._vhosts[vhost]
        except KeyError:
            raise KeyError(f"no vhost {vhost!r} in memory broker {self.name!r}") from None
        try:
            q = vh.queues[queue]
        except KeyError:
            raise KeyError(f"no queue {queue!r} in vhost {vhost!r}") from None
        if q.expire_heads(current_time()):
            self._changed()
        return q

    def queue_names(self, vhost: str = "/") -> list[str]:
        """The names of the queues of a vhost, sorted."""
        return sorted(self._vhosts[vhost].queues)

    def has_queue(self, vhost: str, queue: str) -> bool:
        """Whether ``queue`` exists in ``vhost`` (False if the vhost does not exist)."""
        vh = self._vhosts.get(vhost)
        return vh is not None and queue in vh.queues

    def queue_arguments(self, vhost: str, queue: str) -> dict[str, Any]:
        """The arguments the queue was declared with (``x-message-ttl``, ...), as a copy."""
        return dict(self._queue(vhost, queue).arguments)

    def exchange_names(self, vhost: str = "/") -> list[str]:
        """The names of the exchanges of a vhost (``""`` is the default exchange), sorted."""
        return sorted(self._vhosts[vhost].exchanges)

    def bindings(self, vhost: str, queue: str) -> list[tuple[str, str]]:
        """The ``(exchange, routing_key)`` bindings of a queue, the default one excluded."""
        q = self._queue(vhost, queue)
        return sorted(
            (exchange.name, binding.routing_key)
            for exchange in self._vhosts[vhost].exchanges.values()
            for binding in exchange.bindings.values()
            if binding.queue is q
        )

    def exchange_type(self, vhost: str, exchange: str) -> str:
        """The type of an exchange (``direct``, ``fanout``, ``topic``, ``headers``).

        Raises ``KeyError`` if it does not exist.
        """
        found = self._vhosts[vhost].exchange(exchange)
        if found is None:
            raise KeyError(f"no exchange {exchange!r} in vhost {vhost!r}")
        return found.kind

    def consumers(self, vhost: str, queue: str) -> list[ConsumerInfo]:
        """The consumers of a queue in registration order, as ``rabbitmqctl list_consumers``
        shows them: tag, prefetch and whether it is active (with
        ``x-single-active-consumer``, only the first one is)."""
        q = self._queue(vhost, queue)
        return [
            ConsumerInfo(
                tag=c.tag,
                prefetch_count=c.prefetch,
                active=not q.single_active or i == 0,
                unacked=c.unacked,
            )
            for i, c in enumerate(q.consumers)
        ]

    def queue_size(self, vhost: str, queue: str) -> int:
        """The number of ready messages (expired ones are removed first)."""
        return len(self._queue(vhost, queue).ready)

    def unacked_count(self, vhost: str, queue: str) -> int:
        """The number of delivered, not yet settled messages of a queue."""
        return self._queue(vhost, queue).unacked

    def consumer_count(self, vhost: str, queue: str) -> int:
        """The number of consumers of a queue."""
        return len(self._queue(vhost, queue).consumers)

    def stats(self, vhost: str, queue: str) -> QueueStats:
        """A snapshot of the counters of a queue."""
        return self._queue(vhost, queue).stats.snapshot()

    def ready_messages(self, vhost: str, queue: str) -> list[Delivery]:
        """The ready messages of a queue, head first, without removing them.

        ``delivery_tag`` is 0 and ``consumer_tag`` empty; the properties are copies.
        """
        q = self._queue(vhost, queue)
        return [
            Delivery(
                consumer_tag="",
                delivery_tag=0,
                redelivered=m.redelivered,
                exchange=m.exchange,
                routing_key=m.routing_key,
                body=m.body,
                properties=q.delivery_properties(m),
            )
            for m in q.ready
        ]

    def is_idle(self, vhost: str | None = None) -> bool:
        """True if no queue (of ``vhost``, or of any vhost) has ready or unacked messages.

        Messages waiting in a TTL "delay queue" count as ready.
        """
        vhosts = self._vhosts.values() if vhost is None else (self._vhosts[vhost],)
        return not any(q.ready or q.unacked for vh in vhosts for q in vh.queues.values())

    def has_delayed_messages(self, vhost: str | None = None) -> bool:
        """Whether a queue (of ``vhost``, or of any vhost) holds messages that will
        expire into its dead-letter exchange: a TTL "delay queue", such as ``Retry``'s.

        Those messages come back to some queue later.  False for a vhost that
        does not exist.
        """
        if vhost is None:
            vhosts = list(self._vhosts.values())
        else:
            vh = self._vhosts.get(vhost)
            vhosts = [] if vh is None else [vh]
        return any(
            q.dlx is not None and any(m.expires_at is not None for m in q.ready)
            for vh in vhosts
            for q in vh.queues.values()
        )

    # -- TTL expiry ---------------------------------------------------------------

    def expire_due(self) -> None:
        """Expire every message whose TTL has run out, now (dead-letter or drop it).

        The broker's timer does it by itself while a connection is open to
        host it; a caller about to inspect or wait for the broker may run it
        at once, since the timer task may not have run yet at this instant.
        """
        self._expire_due(trio.current_time())

    def next_expiry(self) -> float | None:
        """The trio time of the next TTL expiry the timer waits for, or None.

        No message expires before it; the timer may find nothing to expire
        then (the message was consumed, or its queue deleted).
        """
        return self._heap[0][0] if self._heap else None

    @property
    def version(self) -> int:
        """A counter that grows on every change of messages or topology."""
        return self._version

    async def wait_for_change(self) -> None:
        """Return at the next change of messages or topology (see ``version``)."""
        if self._change_waiter is None:
            self._change_waiter = trio.Event()
        await self._change_waiter.wait()

    async def wait_until_idle(self, vhost: str | None = None) -> None:
        """Return once ``is_idle(vhost)``, without polling.

        It also runs due TTL expiries itself, so it works even when no
        connection is open to host the broker's timer.
        """
        while True:
            self.expire_due()
            if self.is_idle(vhost):
                return
            deadline = self.next_expiry()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self.wait_for_change()

    # -- internals ------------------------------------------------------------

    def _changed(self) -> None:
        self._version += 1
        waiter = self._change_waiter
        if waiter is not None:
            self._change_waiter = None
            waiter.set()

    def _schedule(self, deadline: float, queue: Queue) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), queue))
        if deadline < self._timer_target:
            self._wake_timer()

    def _wake_timer(self) -> None:
        wake = self._timer_wake
        if wake is not None:
            self._timer_wake = None
            self._timer_target = -math.inf
            wake.set()

    def _expire_due(self, now: float) -> None:
        heap = self._heap
        expired = False
        while heap and heap[0][0] <= now:
            deadline, _, queue = heapq.heappop(heap)
            if queue.timer_at == deadline:
                queue.timer_at = None
            if queue.deleted:
                continue
            if queue.expire_heads(now):
                expired = True
            queue.reschedule()
        if expired:
            self._changed()

    async def _run_timer(self, owner: Connection) -> None:
        # Runs in the nursery of ``owner``; exits when ownership moves on.
        try:
            while self._timer_owner is owner and owner.is_open:
                self._expire_due(trio.current_time())
                deadline = self._heap[0][0] if self._heap else math.inf
                wake = self._timer_wake = trio.Event()
                self._timer_target = deadline
                with trio.move_on_at(deadline):
                    await wake.wait()
        except Exception:
            # Background tasks never raise into the connection's owner; a bug
            # here stops TTL expiry (inspection and wait_until_idle still expire).
            logger.exception("memory broker: the TTL timer failed")
            if self._timer_owner is owner:
                self._timer_owner = None

    # -- the transport's hooks (``transport.MemoryConnection`` calls these) ------

    def _new_vhost(self, name: str) -> VHost:
        return VHost(name, self._schedule, self._changed)

    def _vhost(self, name: str) -> VHost | None:
        """The vhost a connection opens, or None if it does not exist."""
        return self._vhosts.get(name)

    def _attach(self, connection: _Hosted, nursery: trio.Nursery) -> None:
        """A connection opened: it may host the timer task in ``nursery``.

        The timer moves to it unless an open connection of the same
        ``trio.run`` hosts it already.
        """
        token = trio.lowlevel.current_trio_token()
        self._hosts[connection] = (nursery, token)
        owner = self._timer_owner
        if owner is None or not owner.is_open or self._timer_token is not token:
            self._start_timer(connection)

    def _start_timer(self, connection: _Hosted) -> None:
        self._wake_timer()
        nursery, token = self._hosts[connection]
        self._timer_owner = connection
        self._timer_token = token
        nursery.start_soon(self._run_timer, connection)

    def _detach(self, connection: _Hosted) -> None:
        """A connection closed: hand the timer to another one of the same run, if any."""
        host = self._hosts.pop(connection, None)
        if self._timer_owner is connection:
            self._timer_owner = None
            self._wake_timer()
            token = None if host is None else host[1]
            for other, (_, other_token) in self._hosts.items():
                if other.is_open and other_token is token:
                    self._start_timer(other)
                    break


_registry: dict[str, MemoryBroker] = {}
_anonymous = itertools.count(1)


def get_broker(name: str = "default") -> MemoryBroker:
    """The broker that ``memory://NAME`` connects to, created on first use."""
    broker = _registry.get(name)
    if broker is None:
        broker = MemoryBroker()
        broker.name = name
        _registry[name] = broker
    return broker


def register_broker(broker: MemoryBroker, name: str | None = None) -> str:
    """Register ``broker`` for ``memory://NAME`` URLs; return the name.

    Without ``name`` a unique one is chosen.  Raises ``ValueError`` if the
    name belongs to another broker.
    """
    if name is None:
        name = f"broker-{next(_anonymous)}-{secrets.token_hex(4)}"
    existing = _registry.get(name)
    if existing is not None and existing is not broker:
        raise ValueError(f"a memory broker named {name!r} is already registered")
    if broker.name is not None and broker.name != name and _registry.get(broker.name) is broker:
        del _registry[broker.name]
    broker.name = name
    _registry[name] = broker
    return name


def unregister_broker(name: str) -> None:
    """Remove a broker from the registry (no-op if absent).  Open connections keep working."""
    broker = _registry.pop(name, None)
    if broker is not None and broker.name == name:
        broker.name = None
