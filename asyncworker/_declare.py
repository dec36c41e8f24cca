"""Declaring a vhost's topology on a connection: the order, the retries, the one-line errors.

The ``Supervisor`` declares its vhost's ``Topology`` (``_topology``) on the
consuming connection before it starts the consumers, at startup and after
every reconnect, with a ``Declarer``: exchanges first, then queues, then the
queues' bindings, each on a channel of the declarer's own (a refusal closes
the channel; the next declaration opens another).

* At startup (``strict``), the first refusal raises a ``TopologyError``:
  ``serve()`` fails, ``run()`` exits 1, with one line that names the entity,
  the argument and both values (RabbitMQ's 406 text carries them), and what
  to do.
* After a reconnect, a refusal is logged as an error and the rest goes on;
  ``retry()`` declares what failed again with the App's backoff, and a
  queue's consumer starts once its queue is declared.

``declare_queue`` / ``declare_exchange`` / ``declare_binding`` are the
single-entity steps, also used by ``App.declare_queue`` (``Retry``'s
siblings, through the publisher) and ``App.declare_topology()`` (the
``asyncworker declare`` command).  The records come validated; what the
broker refuses is translated here, once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from ._exceptions import ChannelClosed, ConnectionClosed, QueueNotFound, TopologyError
from ._topology import Binding, Exchange, Queue, Topology
from ._util import sleep_unless

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from ._transports import Channel, Connection, ConnectionParams, QueueInfo

__all__ = [
    "Declarer",
    "Step",
    "declare_binding",
    "declare_exchange",
    "declare_on_channel",
    "declare_queue",
    "declare_topology",
    "ensure_queue",
    "refusal",
]

logger = logging.getLogger("asyncworker")

#: RabbitMQ's text for a redeclaration that differs from what exists (406).
_INEQUIVALENT: Final = re.compile(
    r"inequivalent arg '(?P<argument>[^']*)' for (?P<kind>queue|exchange) '.*' in vhost '.*': "
    r"received (?P<received>.+) but current is (?P<current>.+)$"
)
_TYPED_VALUE: Final = re.compile(r"^the value (?P<value>'.*') of type '[^']*'$")


async def declare_exchange(channel: Channel, exchange: Exchange) -> None:
    """``exchange.declare`` of ``exchange``."""
    await channel.exchange_declare(
        exchange.name,
        exchange.type,
        durable=exchange.durable,
        auto_delete=exchange.auto_delete,
        arguments=exchange.amqp_arguments() or None,
    )


async def declare_queue(channel: Channel, queue: Queue) -> QueueInfo:
    """``queue.declare`` of ``queue`` (its bindings are ``declare_binding``'s)."""
    return await channel.queue_declare(
        queue.name,
        durable=queue.durable,
        exclusive=queue.exclusive,
        auto_delete=queue.auto_delete,
        arguments=queue.amqp_arguments() or None,
    )


async def declare_binding(channel: Channel, queue: str, binding: Binding) -> None:
    """``queue.bind`` of ``queue`` to ``binding``'s exchange."""
    await channel.queue_bind(
        queue, binding.exchange_name, binding.routing_key, dict(binding.arguments or {}) or None
    )


async def ensure_queue(connection: Connection, name: str) -> None:
    """Declare queue ``name`` (durable, classic) only if it does not exist.

    What ``route([...], declare=True)`` does with queue names: a passive
    declaration first, so that a queue that exists (a quorum queue, one with
    arguments) is consumed as it is instead of failing with 406.
    """
    channel = await connection.channel()
    try:
        await channel.queue_declare(name, passive=True)
    except QueueNotFound:
        channel = await connection.channel()  # the 404 closed the first one
        await channel.queue_declare(name, durable=True)
    finally:
        if channel.is_open:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await channel.close()


def _value(text: str) -> str:
    match = _TYPED_VALUE.match(text)
    if match is not None:
        return match["value"]
    return "none (not set)" if text == "none" else text


def refusal(exc: ChannelClosed, entity: str, vhost: str) -> TopologyError:
    """The ``TopologyError`` for a declaration of ``entity`` that the broker refused with ``exc``.

    ``entity`` says what was declared (``queue 'orders'``, ``binding of queue
    'orders' to exchange 'events'``).  A 406 for an existing entity with other
    arguments names the argument and both values from RabbitMQ's text.
    """
    text, code = exc.reply_text, exc.reply_code
    where = f"{entity} in vhost {vhost!r}"
    match = _INEQUIVALENT.search(text)
    if match is not None:
        argument, kind = match["argument"], match["kind"]
        received, current = _value(match["received"]), _value(match["current"])
        if kind == "queue":
            fix = (
                "declare it as it is, or move its messages, delete it and let the App declare "
                "it (RabbitMQ never changes an existing queue's arguments; a policy can set "
                "most of them)"
            )
        else:
            fix = (
                "declare it as it is, or delete it (its bindings go with it) and let the App "
                "declare it"
            )
        message = (
            f"{where} exists with {argument} {current}, and this App declares {received} "
            f"({text}); {fix}"
        )
        return TopologyError(
            text,
            code,
            entity=entity,
            vhost=vhost,
            message=message,
            argument=argument,
            received=received,
            current=current,
        )
    if code == 403:
        fix = "the App's user needs the configure permission on it (rabbitmqctl set_permissions)"
    elif code == 404:
        fix = (
            "declare the exchange too (Binding(Exchange(...)) or App.declare(Exchange(...))), "
            "or create it first"
        )
    else:
        fix = "fix its arguments"
    message = f"cannot declare {where}: {text} ({code}); {fix}"
    return TopologyError(text, code, entity=entity, vhost=vhost, message=message)


@dataclass(frozen=True, slots=True)
class Step:
    """One declaration: an exchange, a queue, a queue declared if missing, or a binding."""

    kind: str  # "exchange" | "queue" | "ensure" | "binding"
    entity: Exchange | Queue | Binding | str
    queue: str = ""  # the queue of a binding

    def describe(self) -> str:
        if isinstance(self.entity, Binding):
            key = (
                f" with routing key {self.entity.routing_key!r}" if self.entity.routing_key else ""
            )
            return f"binding of queue {self.queue!r} to exchange {self.entity.exchange_name!r}{key}"
        name = self.entity if isinstance(self.entity, str) else self.entity.name
        return f"{'queue' if self.kind == 'ensure' else self.kind} {name!r}"

    async def run(self, channel: Channel, connection: Connection | None = None) -> None:
        """Declare this on ``channel`` (a queue declared if missing needs ``connection``)."""
        entity = self.entity
        if isinstance(entity, Exchange):
            await declare_exchange(channel, entity)
        elif isinstance(entity, Queue):
            await declare_queue(channel, entity)
        elif isinstance(entity, Binding):
            await declare_binding(channel, self.queue, entity)
        else:
            assert connection is not None, "a queue declared if missing needs the connection"
            await ensure_queue(connection, entity)

    @property
    def queue_name(self) -> str | None:
        """The queue this step declares, if it declares one."""
        if self.kind == "queue" and isinstance(self.entity, Queue):
            return self.entity.name
        if self.kind == "ensure" and isinstance(self.entity, str):
            return self.entity
        return None


class Declarer:
    """Declares one vhost's ``Topology`` on a connection (see the module docstring)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        #: What it declares, in order.
        self.steps: list[Step] = [
            *(Step("exchange", exchange) for exchange in topology.exchanges),
            *(Step("queue", queue) for queue in topology.queues),
            *(Step("ensure", name) for name in topology.ensured),
            *(
                Step("binding", binding, queue.name)
                for queue in topology.queues
                for binding in queue.bindings
            ),
        ]

    def __bool__(self) -> bool:
        return bool(self.steps)

    async def declare(self, connection: Connection, *, strict: bool) -> list[Step]:
        """Declare everything; return the steps the broker refused (never, when ``strict``).

        ``strict`` (at startup): the first refusal raises its
        ``TopologyError``.  Otherwise each refusal is logged and the others
        go on.  A lost connection raises as itself (the supervisor reconnects).
        """
        return await self._run(connection, self.steps, strict=strict)

    async def _run(self, connection: Connection, steps: list[Step], *, strict: bool) -> list[Step]:
        failed: list[Step] = []
        refused_queues: set[str] = set()
        refused_exchanges: set[str] = set()
        channel: Channel | None = None
        vhost = self.topology.vhost
        try:
            for step in steps:
                entity = step.entity
                if isinstance(entity, Binding) and (
                    step.queue in refused_queues or entity.exchange_name in refused_exchanges
                ):
                    failed.append(step)  # retried with what it depends on
                    continue
                if channel is None or not channel.is_open:
                    channel = await connection.channel()
                try:
                    await step.run(channel, connection)
                except ChannelClosed as exc:
                    if not connection.is_open:
                        raise
                    error = refusal(exc, step.describe(), vhost)
                    if strict:
                        raise error from None
                    failed.append(step)
                    if step.queue_name is not None:
                        refused_queues.add(step.queue_name)
                    elif isinstance(entity, Exchange):
                        refused_exchanges.add(entity.name)
                    logger.error("%s; the rest goes on, and this is retried", error)
        finally:
            if channel is not None and channel.is_open:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await channel.close()
        return failed

    def for_queue(self, name: str) -> Callable[[Connection], Awaitable[None]] | None:
        """What declares queue ``name`` again with what it needs (the exchanges it
        names, its bindings), or None if this topology does not declare it.

        A consumer runs it before consuming again once its queue was found
        missing (deleted while the App runs); a refusal raises ``TopologyError``.
        """
        steps = [
            step
            for step in self.steps
            if step.queue_name == name
            or step.queue == name
            or (isinstance(step.entity, Exchange) and step.entity in self._exchanges_of(name))
        ]
        if not any(step.queue_name == name for step in steps):
            return None

        async def redeclare(connection: Connection) -> None:
            await self._run(connection, steps, strict=True)

        return redeclare

    def _exchanges_of(self, name: str) -> tuple[Exchange, ...]:
        queue = self.topology.queue(name)
        return () if queue is None else queue.exchanges()

    async def retry(
        self,
        connection: Connection,
        failed: list[Step],
        *,
        delay: Callable[[int], float],
        stop: trio.Event,
        on_declared: Callable[[str], None],
    ) -> None:
        """Declare ``failed`` again, ``delay(attempt)`` seconds apart, until all are declared.

        ``on_declared(queue)`` is called for each queue once it is declared
        (the supervisor starts its consumer then).  Returns once everything
        is declared, the connection closed, or the App stops.
        """
        attempt = 0
        while failed and connection.is_open and not stop.is_set():
            await sleep_unless(stop, delay(attempt))
            attempt += 1
            if stop.is_set() or not connection.is_open:
                return
            try:
                still = await self._run(connection, failed, strict=False)
            except (ChannelClosed, ConnectionClosed):
                return  # the connection went down: the supervisor reconnects, and declares again
            for step in failed:
                name = step.queue_name
                if step not in still and name is not None:
                    logger.info(
                        "declared queue %r in vhost %r: consuming it", name, self.topology.vhost
                    )
                    on_declared(name)
            failed = still


async def declare_on_channel(channel: Channel, topology: Topology) -> None:
    """Declare ``topology`` (exchanges, queues, bindings) on ``channel``, in order.

    For a topology of ``Queue``/``Exchange`` records only (``App.declare_queue``
    of a ``Queue``): the first refusal raises its ``TopologyError`` (the
    broker closed ``channel`` then).
    """
    if topology.ensured:
        raise ValueError("declare_on_channel() declares records, not queues by name")
    for step in Declarer(topology).steps:
        try:
            await step.run(channel)
        except ChannelClosed as exc:
            raise refusal(exc, step.describe(), topology.vhost) from None


async def declare_topology(
    connector: Callable[[ConnectionParams], AbstractAsyncContextManager[Connection]],
    params: ConnectionParams,
    topology: Topology,
) -> list[str]:
    """Declare ``topology`` on a connection of its own to ``params`` (its vhost), then close it.

    What ``App.declare_topology()`` runs per vhost: the first refusal raises
    its ``TopologyError``.  Returns what was declared, one description each
    (``queue 'orders'``); an empty topology opens no connection.
    """
    if not topology:
        return []
    declarer = Declarer(topology)
    async with connector(params) as connection:
        await declarer.declare(connection, strict=True)
    return [step.describe() for step in declarer.steps]
