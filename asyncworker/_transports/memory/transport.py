"""The memory transport's connections: ``connect()``, ``MemoryConnection``, its dispatcher.

This is the ``memory://`` implementation of the transport seam
(``asyncworker._transports.base``): ``connect(params)`` opens a connection to
one vhost of a ``MemoryBroker`` (``broker``), the one given as ``broker=`` or
else the one registered under ``params.host``.  Channels are
``channel.MemoryChannel``.

Deliveries are never made re-entrantly: routing and settlement only append to
the connection's outbox (``post``), and a dispatcher task in the nursery of
``connect()`` calls the ``on_delivery``/``on_cancel`` callbacks in order, so a
handler's ``ack()`` cannot recurse into the consumer.  The same nursery may
host the broker's TTL timer (``MemoryBroker._attach``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio
from pamqp.constants import REPLY_SUCCESS

from ..._exceptions import ConnectError, ConnectionClosed
from ..base import CloseOnce
from ..params import ConnectionParams
from .broker import MemoryBroker, get_broker
from .channel import MemoryChannel
from .model import Queue, VHost

if TYPE_CHECKING:
    from ..base import Connection

__all__ = ["MemoryConnection", "connect"]

logger = logging.getLogger("asyncworker.memory")

# How many callbacks the dispatcher runs before it lets other tasks run.
_DISPATCH_BATCH: Final = 256


class MemoryConnection(CloseOnce):
    """A connection to one vhost of a ``MemoryBroker``; implements ``Connection``.

    Its dispatcher task (in the nursery of ``connect()``) calls the delivery
    and cancel callbacks of all its channels, in order.  Closed
    (``base.CloseOnce``) by the client, by a connection-level error, or when
    ``connect()``'s context ends; it is open exactly while ``_reason`` is None.
    """

    _closed_error = ConnectionClosed
    _what = "connection"

    def __init__(
        self,
        broker: MemoryBroker,
        vhost: VHost,
        params: ConnectionParams,
    ) -> None:
        super().__init__()
        self._broker = broker
        #: The vhost the connection is open on.
        self.vhost = vhost
        self._params = params
        self._channels: dict[int, MemoryChannel] = {}
        self._next_channel = 1
        #: Exclusive queues declared on this connection, deleted with it.
        self.exclusive_queues: list[Queue] = []
        self._outbox: deque[tuple[MemoryChannel, Callable[[Any], None], Any]] = deque()
        self._wake: trio.Event | None = None
        self._posted = 0
        self._done = 0
        self._progress: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<MemoryConnection {self._params.display} {self._state()}>"

    @property
    def params(self) -> ConnectionParams:
        """The parameters this connection was opened with."""
        return self._params

    @property
    def broker(self) -> MemoryBroker:
        """The broker this connection belongs to."""
        return self._broker

    @property
    def blocked(self) -> str | None:
        """Always None: the in-memory broker never blocks publishers."""
        return None

    async def channel(self) -> MemoryChannel:
        """Open a new channel."""
        await trio.lowlevel.checkpoint()
        self.check_open()
        channel = MemoryChannel(self, self._next_channel)
        self._channels[self._next_channel] = channel
        self._next_channel += 1
        return channel

    async def aclose(self) -> None:
        """Close the connection; unacknowledged deliveries are requeued."""
        self.mark_closed(ConnectionClosed("Normal shutdown", REPLY_SUCCESS))
        await trio.lowlevel.cancel_shielded_checkpoint()

    # -- internals ------------------------------------------------------------

    def force_close(self, reply_code: int, reply_text: str) -> None:
        """Close the connection from the broker's side (``MemoryBroker.close_connections``)."""
        self.mark_closed(ConnectionClosed(reply_text, reply_code))

    def fail(self, reply_code: int, reply_text: str) -> NoReturn:
        """Close the connection as the broker would (a connection exception), and raise."""
        self.mark_closed(ConnectionClosed(reply_text, reply_code))
        raise ConnectionClosed(reply_text, reply_code)

    def release(self, channel_id: int) -> None:
        """Forget channel ``channel_id`` (closed): its number may be used again."""
        self._channels.pop(channel_id, None)

    def _on_closed(self, reason: BaseException) -> None:
        """Close every channel, requeue their unacked messages, drop exclusive queues."""
        # Close every channel before requeueing anything, so that a message
        # returned by one channel is not delivered to (and returned by)
        # another channel of this connection, which would count twice.
        channels = [c for c in list(self._channels.values()) if c.mark_closed(reason)]
        for channel in channels:
            channel.requeue_unacked()
        for queue in self.exclusive_queues:
            queue.vhost.delete_queue(queue)
        self.exclusive_queues.clear()
        self._outbox.clear()
        self._wake_dispatcher()
        self._notify_progress()
        self._broker._detach(self)  # noqa: SLF001 — as broker._vhost in _connect()
        self.vhost.changed()

    def post(self, channel: MemoryChannel, callback: Callable[[Any], None], arg: Any) -> None:
        """Queue a callback for the dispatcher (never call it from here: no re-entrancy)."""
        self._outbox.append((channel, callback, arg))
        self._posted += 1
        if self._wake is not None:
            self._wake_dispatcher()

    def _wake_dispatcher(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def _notify_progress(self) -> None:
        progress = self._progress
        if progress is not None:
            self._progress = None
            progress.set()

    async def flush(self) -> None:
        """Wait until the dispatcher ran every callback posted so far."""
        target = self._posted
        while self._reason is None and self._done < target:
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()

    async def _run_dispatcher(self) -> None:
        outbox = self._outbox
        try:
            while self._reason is None:
                if not outbox:
                    wake = self._wake = trio.Event()
                    await wake.wait()
                    continue
                for _ in range(_DISPATCH_BATCH):
                    if not outbox:
                        break
                    channel, callback, arg = outbox.popleft()
                    self._done += 1
                    # Deliveries of a closed channel were requeued already.
                    if channel.close_reason is None:
                        callback(arg)
                self._notify_progress()
                if outbox:
                    await trio.lowlevel.checkpoint()
        except Exception as exc:
            # The seam forbids callbacks to raise; treat it like a dead reader task.
            logger.exception("memory broker: a delivery callback raised; closing the connection")
            self.mark_closed(ConnectionClosed(f"a delivery callback raised {exc!r}"))


@asynccontextmanager
async def _connect(
    params: ConnectionParams, broker: MemoryBroker | None
) -> AsyncIterator[MemoryConnection]:
    if broker is None:
        broker = get_broker(params.host)
    # The broker's hooks for this adapter (see broker.py), not for its users:
    vhost = broker._vhost(params.vhost)  # noqa: SLF001
    if vhost is None:
        raise ConnectError(
            f"cannot connect to {params.display}: vhost {params.vhost!r} does not exist "
            f"(NOT_ALLOWED - vhost {params.vhost} not found); create it with "
            "MemoryBroker.add_vhost()"
        )
    await trio.lowlevel.checkpoint()
    body_exc: BaseException | None = None
    async with trio.open_nursery() as nursery:
        connection = MemoryConnection(broker, vhost, params)
        nursery.start_soon(connection._run_dispatcher)  # noqa: SLF001 — this module's class
        broker._attach(connection, nursery)  # noqa: SLF001 — as broker._vhost above
        try:
            yield connection
        except BaseException as exc:
            # Re-raised outside the nursery, as the AMQP transport does: an
            # error of the caller's code is not wrapped in an ExceptionGroup.
            body_exc = exc
        finally:
            connection.mark_closed(ConnectionClosed("Normal shutdown", REPLY_SUCCESS))
            nursery.cancel_scope.cancel()
    if body_exc is not None:
        try:
            raise body_exc
        finally:
            body_exc = None


def connect(
    params: ConnectionParams, *, broker: MemoryBroker | None = None
) -> AbstractAsyncContextManager[Connection]:
    """Open a connection to vhost ``params.vhost`` of a memory broker.

    The broker is ``broker`` if given (it need not be registered under any
    name), else the one registered as ``params.host`` (``memory://NAME``),
    created on first use.  Raises ``ConnectError`` naming the vhost if it
    does not exist.  Leaving the context closes the connection and requeues
    its unacked messages.
    """
    return _connect(params, broker)


if TYPE_CHECKING:

    def _implements(connection: MemoryConnection) -> Connection:
        return connection
