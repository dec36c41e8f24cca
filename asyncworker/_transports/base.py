"""The transport seam: everything the runtime needs from a broker connection.

The records (``Properties``, ``Delivery``, ``QueueInfo``), the callback
types and the ``Channel``/``Connection`` protocols that both transports
implement: ``amqp`` (a trio-native AMQP 0-9-1 client on pamqp's codec, for
``amqp://`` and ``amqps://``) and ``memory`` (the embedded in-memory broker,
for ``memory://``).  The rest of asyncworker only sees what is defined here
and in ``params``, and only the exceptions of ``asyncworker._exceptions``;
``asyncworker._transports.connect()`` picks the implementation.

It also holds ``CloseOnce``, the open/closed state every connection and
channel of both transports shares: closed once, with one reason, which every
waiter is failed with.

A leaf: it imports only the standard library, trio, ``asyncworker._exceptions``
and its sibling ``params`` (itself a leaf).  The implementations import it;
it never imports them.

Rules every transport follows:

* ``connect(params)`` is an async context manager.  Its background tasks
  (reader, writer, heartbeats, timers) never raise into the caller: when the
  connection dies, ``Connection.closed`` is set, every channel is marked
  closed with the cause, pending operations raise ``ConnectionClosed`` /
  ``ChannelClosed``, and ``wait_closed()`` returns.  Leaving the context closes
  the connection (shielded, with a short deadline).
* Delivery callbacks (``on_delivery``) are plain functions that must not
  block; the transport calls them from its reader task, in delivery order.
* Settlement (``ack``/``reject``/``nack``) is synchronous: it queues the frame
  for the writer, which coalesces every frame queued since its last wake-up
  into one socket write.  It raises ``ChannelClosed`` if the channel is closed
  (a delivery tag is only meaningful on the channel that delivered it).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import trio

from .._exceptions import ChannelClosed, ConnectionClosed
from .params import ConnectionParams

__all__ = [
    "CancelCallback",
    "Channel",
    "CloseOnce",
    "Connection",
    "Delivery",
    "DeliveryCallback",
    "Properties",
    "QueueInfo",
    "fresh",
]


@dataclass(slots=True)
class Properties:
    """The AMQP basic properties of a message (all optional)."""

    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime.datetime | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None


@dataclass(slots=True)
class Delivery:
    """One message as delivered by ``basic.deliver`` or ``basic.get-ok``."""

    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    body: bytes
    properties: Properties
    #: Messages left in the queue (``basic.get`` only, else -1).
    message_count: int = -1


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """The answer to ``queue.declare``."""

    name: str
    message_count: int
    consumer_count: int


#: Called with each delivery, from the transport's reader task.  Must not block.
DeliveryCallback = Callable[[Delivery], None]
#: Called with the consumer tag when the broker cancels a consumer (queue deleted).
CancelCallback = Callable[[str], None]


class Channel(Protocol):
    """One AMQP channel."""

    @property
    def channel_id(self) -> int: ...

    @property
    def is_open(self) -> bool: ...

    @property
    def close_reason(self) -> BaseException | None:
        """Why the channel closed (a ``ChannelClosed`` or ``ConnectionClosed``), or None."""
        ...

    async def wait_closed(self) -> None:
        """Return once the channel is closed, for whatever reason."""
        ...

    async def qos(self, prefetch_count: int) -> None: ...

    async def consume(
        self,
        queue: str,
        on_delivery: DeliveryCallback,
        on_cancel: CancelCallback | None = None,
        *,
        consumer_tag: str = "",
        exclusive: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        """Start a consumer; return its tag.  Raises ``QueueNotFound`` (and the
        channel is closed) if the queue does not exist."""
        ...

    async def cancel(self, consumer_tag: str) -> None:
        """``basic.cancel``; returns once the broker answered ``cancel-ok``.
        Deliveries already in flight may still arrive before that."""
        ...

    def ack(self, delivery_tag: int, multiple: bool = False) -> None: ...

    def reject(self, delivery_tag: int, requeue: bool = True) -> None: ...

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None: ...

    async def confirm_select(self) -> None:
        """Turn on publisher confirms for this channel."""
        ...

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> None:
        """Publish a message.  In confirm mode, return once the broker confirmed
        it; raise ``PublishNacked`` on a nack and ``Unroutable`` if a mandatory
        message was returned.  Without confirms, return once it is queued."""
        ...

    async def get(self, queue: str, *, no_ack: bool = False) -> Delivery | None:
        """``basic.get``: one message, or None if the queue is empty."""
        ...

    async def queue_declare(
        self,
        queue: str,
        *,
        passive: bool = False,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> QueueInfo: ...

    async def queue_delete(
        self, queue: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int: ...

    async def queue_purge(self, queue: str) -> int: ...

    async def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None: ...

    async def queue_unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Remove a binding (``queue.unbind``); removing one that does not exist is no error."""
        ...

    async def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        *,
        passive: bool = False,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> None: ...

    async def exchange_delete(self, exchange: str) -> None: ...

    async def close(self) -> None:
        """Close the channel; the broker requeues its unacknowledged deliveries."""
        ...


class Connection(Protocol):
    """One connection to one vhost."""

    @property
    def params(self) -> ConnectionParams: ...

    @property
    def is_open(self) -> bool: ...

    @property
    def close_reason(self) -> BaseException | None: ...

    @property
    def blocked(self) -> str | None:
        """Why the broker is not reading what this connection publishes
        (``connection.blocked``: low on memory or disk), or None."""
        ...

    async def wait_closed(self) -> None: ...

    async def channel(self) -> Channel:
        """Open a new channel."""
        ...

    async def aclose(self) -> None: ...


def fresh(exc: BaseException) -> BaseException:
    """A new instance of a stored close reason, so that raising it from many
    places does not pile every raise site onto one shared traceback."""
    if isinstance(exc, ChannelClosed | ConnectionClosed):
        new = type(exc)(exc.reply_text, exc.reply_code)
        new.__cause__ = exc.__cause__
        return new
    return exc


class CloseOnce:
    """The open/closed state of a connection or channel: it closes once.

    As aiormq's ``Base``: ``mark_closed(reason)`` records why the object
    closed (the first reason wins; later calls change nothing), calls the
    subclass's ``_on_closed(reason)``, which fails every waiter it keeps
    (pending requests, unconfirmed publishes, channels of a connection) with
    that reason, and then wakes every task in ``wait_closed()``.  Operations
    call ``check_open()``, which raises a fresh copy of the reason.

    ``_closing`` is set by a subclass while a close it asked for is under
    way (``channel.close`` sent, no ``close-ok`` yet): the object no longer
    counts as open, ``check_open()`` raises ``_closed_error`` naming
    ``_what``, and the reason comes with ``mark_closed`` once the close
    completes.  The attributes are read directly on the hot paths (``ack``
    tests ``_reason`` and ``_closing`` itself before calling anything).
    """

    #: What ``check_open`` raises while a close is under way, and what is closing.
    _closed_error: ClassVar[type[ChannelClosed | ConnectionClosed]]
    _what: ClassVar[str]

    def __init__(self) -> None:
        self._reason: BaseException | None = None
        self._closing = False
        self._closed_event = trio.Event()

    def _state(self) -> str:
        """``open`` or ``closed (reason)``, for ``__repr__``."""
        return "open" if self.is_open else f"closed ({self._reason})"

    @property
    def is_open(self) -> bool:
        """True until closed, or until a close was asked for."""
        return self._reason is None and not self._closing

    @property
    def close_reason(self) -> BaseException | None:
        """Why it closed (a ``ChannelClosed`` or ``ConnectionClosed``), or None while open."""
        return self._reason

    async def wait_closed(self) -> None:
        """Return once it is closed, for whatever reason."""
        await self._closed_event.wait()

    def check_open(self) -> None:
        """Raise a fresh copy of the close reason if it is closed (or closing)."""
        if self._reason is not None:
            raise fresh(self._reason)
        if self._closing:
            raise self._closed_error(f"the {self._what} is closing")

    def mark_closed(self, reason: BaseException) -> bool:
        """Close with ``reason`` and fail every waiter; False if it was closed already."""
        if self._reason is not None:
            return False
        self._reason = reason
        self._on_closed(reason)
        self._closed_event.set()
        return True

    def _on_closed(self, reason: BaseException) -> None:
        """Fail whatever waits on this object with ``reason`` (called once)."""
