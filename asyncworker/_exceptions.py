"""Exceptions raised by asyncworker.

The hierarchy::

    AsyncWorkerError                 base of everything asyncworker raises on purpose
    ├── ConnectError                 could not open a connection (broker down, bad login, no vhost)
    │   └── AuthenticationError      the broker refused the user or password
    ├── ConnectionClosed             an open connection was lost or closed by the broker
    ├── ChannelClosed                the broker closed a channel (reply_code / reply_text say why)
    │   ├── QueueNotFound            a queue that was used does not exist (404)
    │   ├── ExchangeNotFound         an exchange that was used does not exist (404)
    │   └── TopologyError            the broker refused to declare an exchange, queue or binding
    ├── PublishError                 a publish was not accepted
    │   ├── PublishNacked            the broker answered basic.nack to a confirmed publish
    │   ├── Unroutable               a mandatory publish was returned: no queue was bound
    │   └── PublishTimeout           no confirmation came within the publish timeout
    ├── MessageDecodeError           a message body could not be decoded (``Message.json()``)
    ├── StartupError                 a startup hook failed, or the health server could not bind
    └── HandlerTimeout               a handler ran longer than its ``Timeout`` middleware allows

Errors from the AMQP client are translated into these at the transport seam,
so user code never needs to import the client's own exceptions.  No message
here ever contains a password.
"""

from __future__ import annotations

__all__ = [
    "AsyncWorkerError",
    "AuthenticationError",
    "ChannelClosed",
    "ConnectError",
    "ConnectionClosed",
    "ExchangeNotFound",
    "HandlerTimeout",
    "MessageDecodeError",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "QueueNotFound",
    "StartupError",
    "TopologyError",
    "Unroutable",
]


class AsyncWorkerError(Exception):
    """Base class of every error asyncworker raises on purpose."""


class ConnectError(AsyncWorkerError):
    """A connection to the broker could not be opened.

    The message names the host, port and vhost and what went wrong, never the
    password.
    """


class AuthenticationError(ConnectError):
    """The broker refused the credentials."""


class ConnectionClosed(AsyncWorkerError):
    """The connection was lost, or closed by the broker or by us.

    Attributes:
        reply_code: the AMQP reply code when the broker closed it, else 0.
        reply_text: the broker's reason, or a description of the local error.
    """

    def __init__(self, reply_text: str, reply_code: int = 0) -> None:
        super().__init__(
            f"connection closed: {reply_text}" + (f" ({reply_code})" if reply_code else "")
        )
        self.reply_code = reply_code
        self.reply_text = reply_text


class ChannelClosed(AsyncWorkerError):
    """The broker closed a channel, or the channel went down with its connection.

    Attributes:
        reply_code: the AMQP reply code (404 not found, 406 precondition failed, ...), or 0.
        reply_text: the broker's reason.
    """

    def __init__(self, reply_text: str, reply_code: int = 0) -> None:
        super().__init__(
            f"channel closed: {reply_text}" + (f" ({reply_code})" if reply_code else "")
        )
        self.reply_code = reply_code
        self.reply_text = reply_text


class QueueNotFound(ChannelClosed):
    """A queue that was used does not exist (AMQP 404 NOT_FOUND).

    Raised by consuming, ``basic.get``, a passive declaration, or a binding
    of a queue that does not exist.  A missing exchange is an
    ``ExchangeNotFound``.
    """


class ExchangeNotFound(ChannelClosed):
    """An exchange that was used does not exist (AMQP 404 NOT_FOUND).

    Raised by a publish to a missing exchange, a binding to one, or a passive
    declaration of one.  Declare it (``Exchange(...)`` in a ``Binding``, or
    ``App.declare``), or fix its name.
    """


class TopologyError(ChannelClosed):
    """The broker refused to declare part of an App's topology: ``serve()`` did not start.

    Most often a 406 PRECONDITION_FAILED: the exchange or queue exists with
    other arguments than the App declares (RabbitMQ never changes an
    existing queue's arguments).  Also a 403 (no permission to declare) or a
    404 (a binding to an exchange that does not exist).  The message is one
    line naming the entity, the argument and both values when the broker
    gave them, and what to do.

    Attributes:
        reply_code: the AMQP reply code (406, 403, 404).
        reply_text: the broker's own reason.
        entity: what was declared, e.g. ``queue 'orders'``.
        vhost: its vhost.
        argument: on a 406 conflict, the argument that differs (``x-queue-type``), else None.
        received: on a 406 conflict, the value the App declared, as the broker wrote it.
        current: on a 406 conflict, the value on the broker, as the broker wrote it.
    """

    def __init__(
        self,
        reply_text: str,
        reply_code: int = 0,
        *,
        entity: str = "",
        vhost: str = "",
        message: str = "",
        argument: str | None = None,
        received: str | None = None,
        current: str | None = None,
    ) -> None:
        super().__init__(reply_text, reply_code)
        if message:
            self.args = (message,)
        self.entity = entity
        self.vhost = vhost
        self.argument = argument
        self.received = received
        self.current = current


class PublishError(AsyncWorkerError):
    """A publish was not accepted by the broker."""


class PublishNacked(PublishError):
    """The broker answered ``basic.nack`` to a confirmed publish."""


class PublishTimeout(PublishError):
    """No confirmation came from the broker within the publish timeout.

    The message may or may not have reached its queue: publishing it again
    can make a duplicate (consumers should be idempotent, see the reliability
    guide).
    """


class Unroutable(PublishError):
    """A ``mandatory`` publish was returned because no queue was bound to receive it.

    Attributes:
        reply_code: the AMQP reply code (312 NO_ROUTE).
        reply_text: the broker's reason.
    """

    def __init__(self, exchange: str, routing_key: str, reply_text: str, reply_code: int) -> None:
        super().__init__(
            f"message to exchange {exchange!r} with routing key {routing_key!r} was "
            f"returned as unroutable: {reply_text} ({reply_code}); bind a queue to it "
            "or publish with mandatory=False"
        )
        self.reply_code = reply_code
        self.reply_text = reply_text


class MessageDecodeError(AsyncWorkerError, ValueError):
    """A message body could not be decoded as requested.

    Raised by ``Message.json()`` and ``Message.text``; the message names the
    queue and delivery tag so that the poison message can be found.
    """


class StartupError(AsyncWorkerError):
    """A startup hook raised, or the health server could not bind: ``serve()`` did not start.

    The message names the hook (or the address) and the error; the error is
    chained as ``__cause__``.
    """


class HandlerTimeout(AsyncWorkerError):
    """A handler ran longer than the ``Timeout`` middleware of its route allows.

    Raised by ``asyncworker.middlewares.Timeout`` once it has cancelled the
    rest of the chain; the settlement policy then requeues (or rejects) the
    message and logs this error.  Raise the timeout, or make the handler
    faster, if it fires on messages that should succeed.

    Attributes:
        queue: the queue the message came from.
        delivery_tag: the delivery tag of the message.
        seconds: the time limit that was exceeded.
    """

    def __init__(self, queue: str, delivery_tag: int, seconds: float) -> None:
        super().__init__(
            f"handler of message {delivery_tag} from queue {queue!r} did not finish "
            f"within {seconds:g} s and was cancelled; raise Timeout(seconds) if it "
            "needs more time"
        )
        self.queue = queue
        self.delivery_tag = delivery_tag
        self.seconds = seconds

    def __reduce__(self) -> tuple[type[HandlerTimeout], tuple[str, int, float]]:
        return (type(self), (self.queue, self.delivery_tag, self.seconds))
