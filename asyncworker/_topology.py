"""Topology as code: the ``Exchange``, ``Queue`` and ``Binding`` records, and a vhost's set.

The records are what users write (``Queue("orders", "quorum",
delivery_limit=5, bindings=[Binding(events, "order.*")])``): frozen, typed,
comparable and hashable, validated when they are built against what RabbitMQ
3.10 accepts, so that a queue it would refuse (a classic queue with
``delivery_limit``, a quorum queue with ``max_priority``, ...) is a
``ValueError`` in the code that wrote it, not a 406 at deploy time.  Each
knows the AMQP arguments it declares (``amqp_arguments()``).

``Topology`` is the set of one vhost, as the App collects it from its routes
and ``App.declare()``: exchanges, queues and the bindings of those queues,
in declaration order, with a clear ``ValueError`` for two different records
under one name.  ``dead_letter_queue`` and ``delay_queue`` derive the queues
``Retry`` needs from the queue it serves (a quorum queue gets quorum
siblings).

A leaf: nothing here touches a connection.  ``_declare`` declares a
``Topology`` on a channel; ``_config`` checks what routes and
``App.declare()`` register; docs/topology.md says which argument each option
sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final

__all__ = [
    "Arguments",
    "Binding",
    "Exchange",
    "Queue",
    "Topology",
    "dead_letter_queue",
    "delay_queue",
]

#: The exchanges every RabbitMQ vhost has, and their types: declaring one of
#: them with its own type is fine, any other ``amq.`` name is refused (403).
PREDECLARED: Final = {
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.topic": "topic",
    "amq.headers": "headers",
    "amq.match": "headers",
}
_EXCHANGE_TYPES: Final = ("direct", "fanout", "topic", "headers")
_QUEUE_TYPES: Final = ("classic", "quorum")
_X_MATCH: Final = ("all", "any", "all-with-x", "any-with-x")


class Arguments(Mapping[str, Any]):
    """A read-only, hashable copy of an AMQP argument table (``queue.arguments``).

    It compares equal to any mapping with the same items, so
    ``queue.arguments == {"x-overflow": "reject-publish"}`` reads naturally.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        data = dict(items or {})
        for key in data:
            if not isinstance(key, str) or not key:
                raise TypeError(f"argument names must be non-empty strings, got {key!r}")
        self._items = data

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Arguments):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        # Values may be lists (a headers binding's): hash the names only, which
        # equal tables share.
        return hash(tuple(sorted(self._items)))

    def __repr__(self) -> str:
        return repr(self._items)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} name must be a non-empty string, got {value!r}")
    if len(value.encode()) > 255:
        raise ValueError(f"{what} name {value[:40]!r}... is longer than 255 bytes (AMQP's limit)")
    return value


def _flag(value: object, what: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")


def _count(value: object, what: str, minimum: int = 0, maximum: int | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{what} must be {bounds}, got {value}")


@dataclass(frozen=True, slots=True)
class Exchange:
    """An exchange the App declares: ``Exchange("events", "topic")``.

    Args:
        name: its name.
        type: ``"direct"`` (the default), ``"fanout"``, ``"topic"`` or
            ``"headers"``; a plugin's type (``"x-delayed-message"``, ...) is
            passed as it is.
        durable: survives a broker restart (the default).
        auto_delete: deleted by the broker once its last binding is removed.
        arguments: more ``exchange.declare`` arguments (``alternate-exchange``, ...).

    Declaring an existing exchange with another type, durability or
    ``alternate-exchange`` fails with 406 PRECONDITION_FAILED (see
    docs/topology.md).  The pre-declared ``amq.*`` exchanges may be named with
    their own type; any other name starting with ``amq.`` is reserved.
    """

    name: str
    type: str = "direct"
    _: KW_ONLY
    durable: bool = True
    auto_delete: bool = False
    arguments: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _name(self.name, "an exchange")
        if not isinstance(self.type, str) or not (
            self.type in _EXCHANGE_TYPES or self.type.startswith("x-")
        ):
            raise ValueError(
                f"exchange {self.name!r}: type must be one of {', '.join(_EXCHANGE_TYPES)} (or a "
                f"plugin's x-... type), got {self.type!r}"
            )
        predeclared = PREDECLARED.get(self.name)
        if predeclared is not None and self.type != predeclared:
            raise ValueError(
                f"exchange {self.name!r} is pre-declared by RabbitMQ as a {predeclared} exchange: "
                f"use Exchange({self.name!r}, {predeclared!r}), or bind to it by name"
            )
        if predeclared is None and self.name.startswith("amq."):
            raise ValueError(
                f"exchange name {self.name!r}: names starting with 'amq.' are reserved by "
                "RabbitMQ (it refuses to declare them: 403 ACCESS_REFUSED); choose another name"
            )
        _flag(self.durable, f"exchange {self.name!r}: durable")
        _flag(self.auto_delete, f"exchange {self.name!r}: auto_delete")
        object.__setattr__(self, "arguments", Arguments(self.arguments))

    def amqp_arguments(self) -> dict[str, Any]:
        """The arguments of its ``exchange.declare``."""
        return dict(self.arguments or {})


@dataclass(frozen=True, slots=True)
class Binding:
    """A binding of the queue it is given to (``Queue(..., bindings=[...])``) to an exchange.

    ``Binding(events, "order.*")`` binds to the ``Exchange`` ``events``,
    which the App then declares too; ``Binding("amq.topic", "order.*")``
    binds to an exchange by name, which must exist.

    Args:
        exchange: an ``Exchange``, or the name of one that exists.
        routing_key: the binding key (a topic pattern on a topic exchange;
            ignored by fanout and headers exchanges).
        arguments: the binding's arguments: on a headers exchange, the
            headers to match and ``x-match`` (``all``, the default, ``any``,
            ``all-with-x`` or ``any-with-x``).
    """

    exchange: Exchange | str
    routing_key: str = ""
    arguments: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.exchange, str):
            if self.exchange == "":
                raise ValueError(
                    "a queue cannot be bound to the default exchange '' (RabbitMQ refuses it: "
                    "every queue already receives what is published to '' with its name)"
                )
            _name(self.exchange, "an exchange")
        elif not isinstance(self.exchange, Exchange):
            raise TypeError(
                f"Binding(exchange) must be an Exchange or an exchange name, got {self.exchange!r}"
            )
        if not isinstance(self.routing_key, str):
            raise TypeError(f"Binding(routing_key) must be a string, got {self.routing_key!r}")
        if len(self.routing_key.encode()) > 255:
            raise ValueError("Binding(routing_key) is longer than 255 bytes (AMQP's limit)")
        arguments = Arguments(self.arguments)
        mode = arguments.get("x-match")
        if mode is not None and mode not in _X_MATCH:
            raise ValueError(
                f"Binding to {self.exchange_name!r}: x-match must be one of "
                f"{', '.join(_X_MATCH)}, got {mode!r} (RabbitMQ refuses it: 406)"
            )
        object.__setattr__(self, "arguments", arguments)

    @property
    def exchange_name(self) -> str:
        """The name of the exchange it binds to."""
        return self.exchange.name if isinstance(self.exchange, Exchange) else self.exchange


# How each option of Queue is written as an argument (its name, and the
# value it sets from the option's); checked against ``arguments=`` for conflicts.
_OPTION_ARGUMENTS: Final = (
    ("delivery_limit", "x-delivery-limit"),
    ("dead_letter_exchange", "x-dead-letter-exchange"),
    ("dead_letter_routing_key", "x-dead-letter-routing-key"),
    ("message_ttl", "x-message-ttl"),
    ("max_length", "x-max-length"),
    ("max_priority", "x-max-priority"),
    ("single_active_consumer", "x-single-active-consumer"),
)


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue the App declares: ``Queue("orders", "quorum", delivery_limit=5)``.

    Every option left at its default sets no argument, so ``Queue("orders")``
    declares exactly what ``route(declare=True)`` always did (a durable
    classic queue).  docs/topology.md lists the argument each option sets.

    Args:
        name: its name.
        type: ``"classic"`` (the default) or ``"quorum"`` (``x-queue-type``:
            replicated, durable; it cannot be exclusive, auto-delete or
            non-durable).
        durable: survives a broker restart (the default; a quorum queue always is).
        exclusive: owned by the App's connection and deleted with it (classic only).
        auto_delete: deleted once its last consumer leaves (classic only).
        delivery_limit: ``x-delivery-limit``, quorum queues only: a message
            returned more times than this is dead-lettered (or dropped).
        dead_letter_exchange: ``x-dead-letter-exchange``: an ``Exchange``
            (declared with the queue) or the name of one; ``""`` is the default exchange.
        dead_letter_routing_key: ``x-dead-letter-routing-key`` (needs
            ``dead_letter_exchange``).
        message_ttl: ``x-message-ttl``, in seconds (sent in milliseconds).
        max_length: ``x-max-length``: ready messages at most.
        max_priority: ``x-max-priority`` (1 to 255; classic queues only in
            RabbitMQ 3.10): messages' ``priority`` is honoured up to it.
        single_active_consumer: ``x-single-active-consumer``: one consumer
            gets the messages, the next takes over when it leaves.
        arguments: any other ``queue.declare`` argument, passed as it is
            (``x-overflow``, ``x-max-length-bytes``, ...).
        bindings: ``Binding``\\ s of this queue; the exchanges they name as
            ``Exchange`` objects are declared with it.

    Raises ``ValueError`` (or ``TypeError``) for what RabbitMQ 3.10 would
    refuse, and for an argument given twice with two values (say
    ``message_ttl=5`` and ``arguments={"x-message-ttl": 1000}``).
    """

    name: str
    type: str = "classic"
    _: KW_ONLY
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    delivery_limit: int | None = None
    dead_letter_exchange: Exchange | str | None = None
    dead_letter_routing_key: str | None = None
    message_ttl: float | None = None
    max_length: int | None = None
    max_priority: int | None = None
    single_active_consumer: bool = False
    arguments: Mapping[str, Any] | None = None
    bindings: Sequence[Binding] = field(default=())

    def __post_init__(self) -> None:
        name = _name(self.name, "a queue")
        where = f"queue {name!r}"
        if name.startswith("amq."):
            raise ValueError(
                f"{where}: names starting with 'amq.' are reserved by RabbitMQ (403 "
                "ACCESS_REFUSED); choose another name"
            )
        if self.type == "stream":
            raise ValueError(
                f"{where}: streams are not supported (consuming one needs an offset and "
                "different acknowledgements); use 'classic' or 'quorum'"
            )
        if self.type not in _QUEUE_TYPES:
            raise ValueError(f"{where}: type must be 'classic' or 'quorum', got {self.type!r}")
        for option in ("durable", "exclusive", "auto_delete", "single_active_consumer"):
            _flag(getattr(self, option), f"{where}: {option}")
        _count(self.delivery_limit, f"{where}: delivery_limit")
        _count(self.max_length, f"{where}: max_length")
        _count(self.max_priority, f"{where}: max_priority", 1, 255)
        ttl = self.message_ttl
        if ttl is not None and (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not math.isfinite(ttl)
            or ttl < 0
        ):
            raise ValueError(f"{where}: message_ttl must be a number of seconds >= 0, got {ttl!r}")
        dlx = self.dead_letter_exchange
        if dlx is not None and not isinstance(dlx, Exchange | str):
            raise TypeError(
                f"{where}: dead_letter_exchange must be an Exchange or an exchange name, got "
                f"{dlx!r}"
            )
        dlrk = self.dead_letter_routing_key
        if dlrk is not None and not isinstance(dlrk, str):
            raise TypeError(f"{where}: dead_letter_routing_key must be a string, got {dlrk!r}")
        if isinstance(self.bindings, str | Binding) or not isinstance(self.bindings, Iterable):
            raise TypeError(f"{where}: bindings must be a list of Binding, got {self.bindings!r}")
        bindings = tuple(self.bindings)
        for binding in bindings:
            if not isinstance(binding, Binding):
                raise TypeError(f"{where}: bindings must be Binding(...) objects, got {binding!r}")
        object.__setattr__(self, "bindings", bindings)
        object.__setattr__(self, "arguments", Arguments(self.arguments))
        _check_queue_arguments(self, where)

    def _option_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.type != "classic":
            args["x-queue-type"] = self.type
        if self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        dlx = self.dead_letter_exchange
        if dlx is not None:
            args["x-dead-letter-exchange"] = dlx.name if isinstance(dlx, Exchange) else dlx
        if self.dead_letter_routing_key is not None:
            args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.message_ttl is not None:
            args["x-message-ttl"] = round(self.message_ttl * 1000)
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        if self.max_priority is not None:
            args["x-max-priority"] = self.max_priority
        # Only when on: RabbitMQ compares an explicit false with an absent
        # argument as different (406 on a queue declared without it).
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        return args

    def amqp_arguments(self) -> dict[str, Any]:
        """The arguments of its ``queue.declare``: ``arguments``, plus what the options set."""
        return {**(self.arguments or {}), **self._option_arguments()}

    def exchanges(self) -> tuple[Exchange, ...]:
        """The ``Exchange`` objects it names (dead-letter exchange, bindings), each once."""
        found: dict[str, Exchange] = {}
        if isinstance(self.dead_letter_exchange, Exchange):
            found[self.dead_letter_exchange.name] = self.dead_letter_exchange
        for binding in self.bindings:
            if isinstance(binding.exchange, Exchange):
                found.setdefault(binding.exchange.name, binding.exchange)
        return tuple(found.values())


def _check_queue_arguments(queue: Queue, where: str) -> None:
    """What RabbitMQ 3.10 would refuse in the arguments a queue declares, and conflicts."""
    given = queue.arguments or {}
    options = queue._option_arguments()  # noqa: SLF001 — its own module
    for option, argument in (("type", "x-queue-type"), *_OPTION_ARGUMENTS):
        if argument in given:
            mine = options.get(argument, "classic" if argument == "x-queue-type" else None)
            if mine is not None and given[argument] != mine:
                raise ValueError(
                    f"{where}: arguments[{argument!r}]={given[argument]!r} conflicts with "
                    f"{option}={getattr(queue, option)!r} ({argument} {mine!r}); give it once, "
                    f"as {option}="
                )
    effective = queue.amqp_arguments()
    quorum = effective.get("x-queue-type", "classic") == "quorum"
    if quorum:
        for flag, prop in (
            (not queue.durable, "non-durable"),
            (queue.exclusive, "exclusive"),
            (queue.auto_delete, "auto-delete"),
        ):
            if flag:
                raise ValueError(
                    f"{where}: a quorum queue cannot be {prop} (RabbitMQ refuses it: 406 "
                    "PRECONDITION_FAILED); use a classic queue, or drop that option"
                )
        for argument, instead in (
            ("x-max-priority", "use a classic queue for priorities"),
            ("x-queue-mode", "quorum queues keep their messages on disk anyway"),
        ):
            if argument in effective:
                raise ValueError(
                    f"{where}: RabbitMQ 3.10's quorum queues refuse {argument} (406 "
                    f"PRECONDITION_FAILED, 'invalid arg'); {instead}"
                )
    elif "x-delivery-limit" in effective:
        raise ValueError(
            f"{where}: delivery_limit (x-delivery-limit) is a quorum queue feature: RabbitMQ 3.10 "
            "refuses it on a classic queue (406 PRECONDITION_FAILED); use type='quorum', or the "
            "Retry middleware to bound the attempts on a classic queue"
        )
    if "x-dead-letter-routing-key" in effective and "x-dead-letter-exchange" not in effective:
        raise ValueError(
            f"{where}: dead_letter_routing_key needs a dead_letter_exchange (RabbitMQ refuses "
            "it alone: 406); for the default exchange, pass dead_letter_exchange=''"
        )


class Topology:
    """The exchanges, queues and bindings one vhost of an App declares, in order.

    ``add()`` takes ``Exchange`` and ``Queue`` records (a queue brings the
    exchanges it names); the same record twice is kept once, and two
    different records under one name are a ``ValueError`` naming both.
    ``ensure(name)`` records a queue that is only declared when missing
    (``route([...], declare=True)`` with names).  The records are frozen;
    the set is built while the App is registered, then only read.
    """

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[str, Queue] = {}
        self._ensured: dict[str, None] = {}

    def __bool__(self) -> bool:
        return bool(self._exchanges or self._queues or self._ensured)

    def __repr__(self) -> str:
        return (
            f"<Topology vhost={self.vhost!r} exchanges={list(self._exchanges)} "
            f"queues={list(self._queues)} ensured={list(self._ensured)}>"
        )

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        """The exchanges, in the order they were added."""
        return tuple(self._exchanges.values())

    @property
    def queues(self) -> tuple[Queue, ...]:
        """The queues, in the order they were added."""
        return tuple(self._queues.values())

    @property
    def ensured(self) -> tuple[str, ...]:
        """Queues declared (durable, classic) only if missing, by name."""
        return tuple(name for name in self._ensured if name not in self._queues)

    def queue(self, name: str) -> Queue | None:
        """The ``Queue`` declared under ``name``, or None."""
        return self._queues.get(name)

    def add(self, entity: Exchange | Queue) -> None:
        """Add a record (checked against those already there)."""
        if isinstance(entity, Exchange):
            self._add_exchange(entity)
        elif isinstance(entity, Queue):
            self._check(self._queues, entity, "queue")
            for exchange in entity.exchanges():
                self._check(self._exchanges, exchange, "exchange")
            for exchange in entity.exchanges():
                self._exchanges.setdefault(exchange.name, exchange)
            self._queues.setdefault(entity.name, entity)
        else:
            raise TypeError(
                f"declare() takes Exchange and Queue objects, got {entity!r} (a Binding goes in "
                "Queue(..., bindings=[...]))"
            )

    def ensure(self, name: str) -> None:
        """Declare queue ``name`` if it is missing (durable, classic), as ``declare=True`` does."""
        self._ensured.setdefault(name, None)

    @classmethod
    def by_vhost(cls, entries: Mapping[str | None, Topology], default: str) -> dict[str, Topology]:
        """One ``Topology`` per vhost from ``entries``, keyed by vhost or None.

        None stands for ``default`` (the vhost of the App's URL as it serves);
        what it holds joins what ``default`` holds by name, checked as ``add``
        checks (``ValueError`` for two different records under one name).
        Empty sets are left out.
        """
        merged: dict[str, Topology] = {}
        for key, topology in entries.items():
            vhost = default if key is None else key
            target = merged.setdefault(vhost, cls(vhost))
            for exchange in topology.exchanges:
                target.add(exchange)
            for queue in topology.queues:
                target.add(queue)
            for name in topology._ensured:  # noqa: SLF001 — its own class
                target.ensure(name)
        return {vhost: topology for vhost, topology in merged.items() if topology}

    def copy(self) -> Topology:
        """A copy to add to (``route()`` checks a new route's records on one)."""
        other = Topology(self.vhost)
        other._exchanges = dict(self._exchanges)
        other._queues = dict(self._queues)
        other._ensured = dict(self._ensured)
        return other

    def _add_exchange(self, exchange: Exchange) -> None:
        self._check(self._exchanges, exchange, "exchange")
        self._exchanges.setdefault(exchange.name, exchange)

    def _check(self, known: Mapping[str, Any], entity: Exchange | Queue, kind: str) -> None:
        existing = known.get(entity.name)
        if existing is not None and existing != entity:
            raise ValueError(
                f"{kind} {entity.name!r} in vhost {self.vhost!r} is declared twice, "
                f"differently: {existing!r} and {entity!r}; declare one {type(entity).__name__} "
                "object and use it everywhere"
            )


def dead_letter_queue(served: Queue | None, name: str) -> Queue:
    """The queue ``Retry`` dead-letters the messages of queue ``name`` into: ``<name>.dlq``.

    Of the type of ``served`` (the ``Queue`` the App declares for ``name``, if
    any): a quorum queue gets a quorum dead-letter queue; otherwise a durable
    classic one, as before (an existing ``<name>.dlq`` of another type is used
    as it is: see ``Retry``).
    """
    return Queue(f"{name}.dlq", served.type if served is not None else "classic")


def delay_queue(served: Queue | None, name: str, delay_ms: int) -> Queue:
    """The queue where ``Retry`` parks a message of ``name`` for ``delay_ms`` milliseconds.

    ``<name>.retry.<delay_ms>``: a message expires there after the delay and
    is dead-lettered back into ``name`` through the default exchange.  Of the
    type of ``served``, as ``dead_letter_queue``.
    """
    return Queue(
        f"{name}.retry.{delay_ms}",
        served.type if served is not None else "classic",
        message_ttl=delay_ms / 1000,
        dead_letter_exchange="",
        dead_letter_routing_key=name,
    )
