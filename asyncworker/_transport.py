"""The transport seam: everything the runtime needs from a broker connection.

Two transports implement it: ``_amqp`` (a trio-native AMQP 0-9-1 client on
pamqp's codec, for ``amqp://`` and ``amqps://``) and ``_memory`` (the embedded
in-memory broker, for ``memory://``).  The rest of asyncworker only sees the
records and protocols defined here, and only the exceptions of
``asyncworker._exceptions``.

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
import re
import ssl as _ssl
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "Channel",
    "Connection",
    "ConnectionParams",
    "Delivery",
    "Properties",
    "QueueInfo",
    "connect",
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


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    """Where and how to connect.  ``repr`` never shows the password."""

    scheme: str = "amqp"  # "amqp", "amqps" or "memory"
    host: str = "127.0.0.1"
    port: int = 5672
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    heartbeat: int = 60
    ssl: _ssl.SSLContext | None = None
    connect_timeout: float = 10.0
    frame_max: int = 131072
    client_name: str = "asyncworker"

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> ConnectionParams:
        """Parse ``amqp://user:pass@host:port/vhost``, ``amqps://...`` or ``memory://name``.

        An empty path means vhost ``/``; ``%2F`` encodes a ``/`` in a vhost name.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("amqp", "amqps", "memory"):
            raise ValueError(
                f"unsupported URL scheme {parts.scheme!r} in {redact_url(url)!r}: "
                "use amqp://, amqps:// or memory://"
            )
        if scheme == "memory":
            return cls(scheme="memory", host=parts.netloc or "default", port=0, **overrides)
        userinfo = url.partition("://")[2].rpartition("@")[0]
        if any(char in userinfo for char in "/?#"):
            # urlsplit would cut the password there and connect elsewhere.
            raise ValueError(
                f"cannot parse {redact_url(url)!r}: percent-encode '/', '?' and '#' in the "
                "user name and password (as %2F, %3F and %23)"
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid port in {redact_url(url)!r}") from exc
        values: dict[str, Any] = {
            "scheme": scheme,
            "host": parts.hostname or "127.0.0.1",
            "port": port or (5671 if scheme == "amqps" else 5672),
            "vhost": unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        }
        if parts.username is not None:
            values["user"] = unquote(parts.username)
        if parts.password is not None:
            values["password"] = unquote(parts.password)
        if scheme == "amqps" and "ssl" not in overrides:
            values["ssl"] = _ssl.create_default_context()
        values.update(overrides)
        return cls(**values)

    @property
    def display(self) -> str:
        """``user@host:port/vhost`` for logs and errors, without the password."""
        if self.scheme == "memory":
            return f"memory://{self.host} vhost {self.vhost!r}"
        return f"{self.scheme}://{self.user}@{self.host}:{self.port} vhost {self.vhost!r}"

    def url(self) -> str:
        """The URL of these parameters, with the password replaced by ``***``."""
        if self.scheme == "memory":
            return f"memory://{self.host}"
        return (
            f"{self.scheme}://{quote(self.user, safe='')}:***@{self.host}:{self.port}/"
            f"{quote(self.vhost, safe='')}"
        )


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):.*@")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Textual, up to the last ``@``: it also hides a password holding
    characters that should have been percent-encoded (``/``, ``#``, ``?``),
    which a URL parser would split elsewhere.
    """
    return _USERINFO.sub(r"\1:***@", url, count=1)


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


def connect(params: ConnectionParams) -> AbstractAsyncContextManager[Connection]:
    """Open a connection with the transport that ``params.scheme`` selects.

    Raises ``ConnectError`` (or ``AuthenticationError``) with a message naming
    the host, port and vhost if the connection cannot be opened.
    """
    if params.scheme == "memory":
        from . import _memory

        return _memory.connect(params)
    from . import _amqp

    return _amqp.connect(params)
