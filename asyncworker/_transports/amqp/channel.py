"""One AMQP channel: requests and their replies, consumers, confirms, settlement.

``AMQPChannel`` implements the seam's ``Channel`` for the AMQP client.  It
never touches the socket: what it sends goes, already encoded by ``codec``,
into its connection's outgoing list for the writer task, and the reader task
of ``connection`` calls its ``_on_*`` methods with what arrives for it: the
hot frames decoded by hand, every other method frame through ``on_method``.

What it uses of its connection is spelt out by ``_Connection`` below: the
connection module imports this one, never the other way round.  The hot
settlement path (``ack``) works on the connection's writer state directly,
as it did when both lived in one module: no call is added per message.

Closing is ``base.CloseOnce``'s: ``mark_closed(reason)`` runs once and
``_on_closed`` fails every waiting request and unconfirmed publish with the
reason; later operations raise a fresh copy of it (``ChannelClosed``, or
``ConnectionClosed`` when the connection died).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import trio
from pamqp import commands
from pamqp.base import Frame as _PamqpMethod
from pamqp.constants import FRAME_END, FRAME_METHOD
from pamqp.exceptions import AMQPNotFound

from ..._exceptions import (
    ChannelClosed,
    ConnectionClosed,
    ExchangeNotFound,
    PublishNacked,
    QueueNotFound,
    Unroutable,
)
from ..base import (
    CancelCallback,
    CloseOnce,
    Delivery,
    DeliveryCallback,
    Properties,
    QueueInfo,
    fresh,
)
from .codec import (
    BASIC_ACK,
    BASIC_CONSUME,
    BASIC_NACK,
    BASIC_REJECT,
    DELIVER,
    EXCHANGE_DECLARE,
    GET_OK,
    QUEUE_BIND,
    QUEUE_DECLARE,
    QUEUE_UNBIND,
    RETURN,
    ProtocolError,
    arguments_frame,
    close_frame,
    decode_properties,
    encode_publish,
    method_frame,
    pack_settle,
    unpack_content_head,
    unpack_u16,
)

if TYPE_CHECKING:
    from ..base import Channel

__all__ = ["HIGH_WATER", "AMQPChannel"]

log = logging.getLogger("asyncworker.amqp")

#: An ack is written at once, without waking the writer, when nothing was
#: written for this long (seconds); below that, acks share the writer's writes.
_INLINE_SEND_GAP: Final = 0.0005
#: ``publish`` waits for the writer once this many bytes are queued, so that a
#: fast publisher cannot grow the outgoing buffer without bound.
HIGH_WATER: Final = 4 * 1024 * 1024

_M = TypeVar("_M", bound=_PamqpMethod)


class _Connection(Protocol):
    """What a channel uses of its connection (``connection.AMQPConnection``).

    The writer's state is read and written directly by ``AMQPChannel.ack``
    and ``publish``: ``out`` (frames waiting for the writer), ``out_size``
    (publish bytes in it, for back-pressure), ``wake`` (set while the
    writer sleeps), ``fd`` (the socket, or -1 on TLS), ``last_send`` and
    ``now`` (the clock of the inline-ack decision).
    """

    fd: int
    out: list[bytes | memoryview]
    out_size: int
    wake: trio.Event | None
    last_send: float
    now: Callable[[], float]

    @property
    def frame_max(self) -> int: ...

    def check_open(self) -> None: ...

    def push(self, frame: bytes) -> None: ...

    def push_many(self, frames: list[bytes | memoryview]) -> None: ...

    def wake_writer(self) -> None: ...

    async def wait_drained(self) -> None: ...

    def new_consumer_tag(self, channel_id: int) -> str: ...

    def release(self, channel_id: int) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """What an ``AMQPChannel`` is waiting for, from ``AMQPChannel.statistics()``."""

    #: Consumers registered on the channel.
    consumers: int
    #: Synchronous requests sent and not answered yet.
    requests_waiting: int
    #: Publishes sent in confirm mode and not confirmed yet.
    unconfirmed: int


#: The methods whose 404 means a missing exchange, by ``class_id << 16 | method_id``
#: (``channel.close`` names the method that failed): publishing to it, declaring or
#: deleting it.  The queue methods (consume, get, declare, purge, delete) mean a
#: missing queue; a binding can miss either, and there only the broker's text says which.
_EXCHANGE_METHODS: Final = frozenset(
    {
        commands.Basic.Publish.index,
        commands.Exchange.Declare.index,
        commands.Exchange.Delete.index,
    }
)
_BINDING_METHODS: Final = frozenset({commands.Queue.Bind.index, commands.Queue.Unbind.index})


def channel_error(
    reply_text: str, reply_code: int, class_id: int = 0, method_id: int = 0
) -> ChannelClosed:
    """The exception for a ``channel.close`` from the broker.

    A 404 is a ``QueueNotFound`` or an ``ExchangeNotFound``, told apart by
    the method the broker names as the one that failed (``class_id``,
    ``method_id``); only for a binding, which names both, by its text.
    """
    if reply_code == AMQPNotFound.value:
        index = class_id << 16 | method_id
        if index in _EXCHANGE_METHODS or (
            index in _BINDING_METHODS and "no exchange" in reply_text
        ):
            return ExchangeNotFound(reply_text, reply_code)
        return QueueNotFound(reply_text, reply_code)
    return ChannelClosed(reply_text, reply_code)


# --------------------------------------------------------------------------
# Waiters


class _Rpc:
    """One synchronous request waiting for its reply."""

    __slots__ = ("error", "event", "expect", "result")

    def __init__(self, expect: tuple[type[_PamqpMethod], ...]) -> None:
        self.expect = expect
        self.event = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Confirm:
    """One published message waiting for its ``basic.ack``/``basic.nack``."""

    __slots__ = ("error", "event", "exchange", "routing_key")

    def __init__(self, exchange: str, routing_key: str) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None
        self.exchange = exchange
        self.routing_key = routing_key


# --------------------------------------------------------------------------
# Channel


class AMQPChannel(CloseOnce):
    """One AMQP channel of an ``AMQPConnection`` (implements ``Channel``).

    Synchronous methods (declarations, ``qos``, ``consume``, ...) are serialised
    by a lock: AMQP allows one outstanding synchronous request per channel.
    """

    _closed_error = ChannelClosed
    _what = "channel"

    def __init__(self, connection: _Connection, channel_id: int) -> None:
        super().__init__()
        self._conn = connection
        self._id = channel_id
        # Negotiated before any channel opens; read once, not on every publish.
        self._frame_max = connection.frame_max
        self._lock = trio.Lock()
        self._rpcs: deque[_Rpc] = deque()
        self._consumers: dict[str, tuple[DeliveryCallback, CancelCallback | None]] = {}
        self._confirm = False
        self._next_seq = 1
        self._unconfirmed: dict[int, _Confirm] = {}
        # A basic.return waiting for the ack that follows it (see _on_return):
        # exchange, routing key, reply text, reply code.
        self._returned: tuple[str, str, str, int] | None = None
        # Content being assembled: the method's fields, then the properties and
        # body parts as the header and body frames arrive.
        self._content: tuple[Any, ...] | None = None
        self._props: Properties | None = None
        self._body_size = 0
        self._body_received = 0
        self._body_parts: list[memoryview] = []

    def __repr__(self) -> str:
        return f"<AMQPChannel {self._id} {self._state()}>"

    # -- state

    @property
    def channel_id(self) -> int:
        """The channel number."""
        return self._id

    def statistics(self) -> ChannelStatistics:
        """Consumers, unanswered requests and unconfirmed publishes, as of now."""
        return ChannelStatistics(len(self._consumers), len(self._rpcs), len(self._unconfirmed))

    def _on_closed(self, reason: BaseException) -> None:
        """Fail every waiting request and unconfirmed publish; forget the consumers."""
        self._content = None
        self._body_parts = []
        self._returned = None
        while self._rpcs:
            rpc = self._rpcs.popleft()
            rpc.error = reason
            rpc.event.set()
        for confirm in self._unconfirmed.values():
            confirm.error = reason
            confirm.event.set()
        self._unconfirmed.clear()
        self._consumers.clear()

    def abandon(self) -> None:
        """Close this channel without waiting: its opener gave up after channel.open."""
        if self._reason is not None or self._closing:
            return
        self._closing = True
        self._conn.push(close_frame(self._id))

    # -- synchronous requests

    async def _rpc(self, method: _PamqpMethod | bytes, expect: type[_M]) -> _M:
        result = await self._rpc_any(method, (expect,))
        assert isinstance(result, expect)
        return result

    async def _rpc_any(self, method: _PamqpMethod | bytes, expect: tuple[type[Any], ...]) -> Any:
        """Send ``method`` (a pamqp method, or a method frame encoded by the
        caller) and wait for the reply, which must be one of ``expect``."""
        if isinstance(method, bytes):
            frame = method
            if self._conn.frame_max and len(frame) > self._conn.frame_max:
                raise ValueError(
                    f"method frame of {len(frame)} bytes exceeds frame_max "
                    f"{self._conn.frame_max}: the arguments are too large"
                )
        else:
            frame = method_frame(self._id, method)
        async with self._lock:
            self.check_open()
            self._conn.check_open()
            rpc = self.request(frame, expect)
            await rpc.event.wait()
        if rpc.error is not None:
            raise fresh(rpc.error)
        return rpc.result

    def request(self, frame: bytes, expect: tuple[type[Any], ...]) -> _Rpc:
        """Queue a waiter for the reply, then send ``frame``.

        The waiter stays queued even if its caller gives up: replies arrive in
        request order, so an abandoned waiter must still absorb its reply
        instead of letting the next request take it.
        """
        rpc = _Rpc(expect)
        self._rpcs.append(rpc)
        self._conn.push(frame)
        return rpc

    def _on_reply(self, method: _PamqpMethod | None, result: Any) -> None:
        """Complete the oldest waiting request with ``result``."""
        if not self._rpcs:
            log.warning("channel %d: unexpected %s from the broker", self._id, method)
            return
        rpc = self._rpcs.popleft()
        if method is not None and not isinstance(method, rpc.expect):
            rpc.error = ChannelClosed(
                f"protocol error: expected {'/'.join(t.__name__ for t in rpc.expect)}, "
                f"got {method.name}"
            )
        else:
            rpc.result = result
        rpc.event.set()

    # -- Channel protocol

    async def qos(self, prefetch_count: int) -> None:
        """Set the prefetch count of this channel (``basic.qos``)."""
        await self._rpc(commands.Basic.Qos(prefetch_count=prefetch_count), commands.Basic.QosOk)

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
        """Start a consumer; return its tag.

        Raises ``QueueNotFound`` (and the channel is closed) if the queue does
        not exist.
        """
        # Choose the tag ourselves so that the callback is registered before
        # the first delivery can arrive (deliveries may follow consume-ok in
        # the very same read).
        tag = consumer_tag or self._conn.new_consumer_tag(self._id)
        if tag in self._consumers:
            raise ValueError(f"consumer tag {tag!r} is already in use on this channel")
        self._consumers[tag] = (on_delivery, on_cancel)
        try:
            # no-local, no-ack, exclusive, no-wait
            flags = (False, False, exclusive, False)
            frame = arguments_frame(self._id, BASIC_CONSUME, (queue, tag), flags, arguments)
            await self._rpc(frame, commands.Basic.ConsumeOk)
        except BaseException:
            self._consumers.pop(tag, None)
            raise
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """``basic.cancel``; returns once the broker answered ``cancel-ok``.

        Deliveries already in flight may still arrive before that.
        """
        try:
            await self._rpc(
                commands.Basic.Cancel(consumer_tag=consumer_tag), commands.Basic.CancelOk
            )
        finally:
            self._consumers.pop(consumer_tag, None)

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """Acknowledge a delivery (queued for the writer, no wait)."""
        if self._reason is not None or self._closing:
            self.check_open()
        conn = self._conn
        frame = pack_settle(
            FRAME_METHOD, self._id, 13, BASIC_ACK, delivery_tag, multiple, FRAME_END
        )
        if conn.wake is not None:
            # The writer is idle: send at once if nothing was sent lately
            # (a moderate rate, where waking the writer would cost a whole
            # scheduler pass per message); at high rates, leave it to the
            # writer, which sends all the acks of a pass in one write.
            if conn.fd >= 0 and not conn.out:
                now = conn.now()
                if now - conn.last_send > _INLINE_SEND_GAP:
                    try:
                        sent = os.write(conn.fd, frame)
                    except OSError:
                        sent = 0  # the writer will meet the error and fail the connection
                    conn.last_send = now
                    if sent == len(frame):
                        return
                    frame = frame[sent:]
            conn.out.append(frame)
            conn.wake_writer()
        else:
            conn.out.append(frame)

    def reject(self, delivery_tag: int, requeue: bool = True) -> None:
        """Reject a delivery, requeueing it or not (dead-lettering it if configured)."""
        self.check_open()
        self._conn.push(
            pack_settle(FRAME_METHOD, self._id, 13, BASIC_REJECT, delivery_tag, requeue, FRAME_END)
        )

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """Negatively acknowledge one delivery (or all up to it, with ``multiple``)."""
        self.check_open()
        self._conn.push(
            pack_settle(
                FRAME_METHOD,
                self._id,
                13,
                BASIC_NACK,
                delivery_tag,
                multiple | (requeue << 1),
                FRAME_END,
            )
        )

    async def confirm_select(self) -> None:
        """Turn on publisher confirms for this channel."""
        if self._confirm:
            return
        await self._rpc(commands.Confirm.Select(), commands.Confirm.SelectOk)
        self._confirm = True

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> None:
        """Publish a message.

        In confirm mode, return once the broker confirmed it; raise
        ``PublishNacked`` on a nack and ``Unroutable`` if a mandatory message
        was returned.  Without confirms, return once it is queued.
        """
        self.check_open()
        conn = self._conn
        conn.check_open()
        if conn.out_size > HIGH_WATER:
            await conn.wait_drained()
            self.check_open()
            conn.check_open()
        frames = encode_publish(
            self._id, body, exchange, routing_key, properties, mandatory, self._frame_max
        )
        if not self._confirm:
            conn.push_many(frames)
            await trio.lowlevel.checkpoint()
            return
        confirm = _Confirm(exchange, routing_key)
        # Sequence numbers count publishes in wire order, and the frames are
        # queued synchronously right here, so the two cannot diverge.
        self._unconfirmed[self._next_seq] = confirm
        self._next_seq += 1
        conn.push_many(frames)
        await confirm.event.wait()
        if confirm.error is not None:
            raise fresh(confirm.error)

    async def get(self, queue: str, *, no_ack: bool = False) -> Delivery | None:
        """``basic.get``: one message, or None if the queue is empty."""
        result = await self._rpc_any(
            commands.Basic.Get(queue=queue, no_ack=no_ack),
            (commands.Basic.GetOk, commands.Basic.GetEmpty),
        )
        assert result is None or isinstance(result, Delivery)
        return result

    async def queue_declare(
        self,
        queue: str,
        *,
        passive: bool = False,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> QueueInfo:
        """Declare a queue (``queue.declare``); an empty name lets the broker choose."""
        # passive, durable, exclusive, auto-delete, no-wait
        flags = (passive, durable, exclusive, auto_delete, False)
        frame = arguments_frame(self._id, QUEUE_DECLARE, (queue,), flags, arguments)
        ok = await self._rpc(frame, commands.Queue.DeclareOk)
        return QueueInfo(ok.queue or queue, ok.message_count or 0, ok.consumer_count or 0)

    async def queue_delete(
        self, queue: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """Delete a queue; return how many messages it held."""
        ok = await self._rpc(
            commands.Queue.Delete(queue=queue, if_unused=if_unused, if_empty=if_empty),
            commands.Queue.DeleteOk,
        )
        return ok.message_count or 0

    async def queue_purge(self, queue: str) -> int:
        """Remove every ready message of a queue; return how many were removed."""
        ok = await self._rpc(commands.Queue.Purge(queue=queue), commands.Queue.PurgeOk)
        return ok.message_count or 0

    async def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Bind a queue to an exchange."""
        names = (queue, exchange, routing_key)
        frame = arguments_frame(self._id, QUEUE_BIND, names, (False,), arguments)  # no-wait
        await self._rpc(frame, commands.Queue.BindOk)

    async def queue_unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Remove a binding of a queue to an exchange (a missing binding is no error)."""
        names = (queue, exchange, routing_key)
        frame = arguments_frame(self._id, QUEUE_UNBIND, names, (), arguments)  # no bits
        await self._rpc(frame, commands.Queue.UnbindOk)

    async def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        *,
        passive: bool = False,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Declare an exchange."""
        # passive, durable, auto-delete, internal, no-wait
        flags = (passive, durable, auto_delete, False, False)
        frame = arguments_frame(
            self._id, EXCHANGE_DECLARE, (exchange, exchange_type), flags, arguments
        )
        await self._rpc(frame, commands.Exchange.DeclareOk)

    async def exchange_delete(self, exchange: str) -> None:
        """Delete an exchange."""
        await self._rpc(commands.Exchange.Delete(exchange=exchange), commands.Exchange.DeleteOk)

    async def close(self) -> None:
        """Close the channel; the broker requeues its unacknowledged deliveries."""
        if self._reason is not None or self._closing:
            await self._closed_event.wait()
            return
        reason = ChannelClosed("closed by the client")
        try:
            async with self._lock:
                # Closed while this waited for the lock?  (Through the property:
                # mypy would take ``_reason`` for still None after the check above.)
                if self.close_reason is not None:
                    return
                self._conn.check_open()
                # From here on, deliveries are dropped (the broker requeues
                # them) and settlements raise: the broker ignores them anyway.
                self._closing = True
                rpc = self.request(close_frame(self._id), (commands.Channel.CloseOk,))
                await rpc.event.wait()
        except (ChannelClosed, ConnectionClosed):
            pass  # already gone: that is what was asked for
        if self._reason is None:
            self.mark_closed(reason)
            self._conn.release(self._id)

    # -- reader callbacks (called synchronously from the reader task)

    def on_method(self, method: _PamqpMethod) -> None:
        """Handle a method frame for this channel that ``_process`` did not decode itself."""
        if isinstance(method, commands.Basic.Nack):
            self.on_confirm(method.delivery_tag, method.multiple, True)
        elif isinstance(method, commands.Basic.Ack):
            self.on_confirm(method.delivery_tag, method.multiple, False)
        elif isinstance(method, commands.Basic.GetOk):
            self.start_content(
                (
                    GET_OK,
                    method.delivery_tag,
                    method.redelivered,
                    method.exchange,
                    method.routing_key,
                    method.message_count,
                )
            )
        elif isinstance(method, commands.Basic.GetEmpty):
            self._on_reply(method, None)
        elif isinstance(method, commands.Basic.Return):
            self.start_content(
                (RETURN, method.reply_code, method.reply_text, method.exchange, method.routing_key)
            )
        elif isinstance(method, commands.Basic.Cancel):
            # The broker cancelled a consumer (e.g. its queue was deleted).
            if not method.nowait:
                self._conn.push(
                    method_frame(
                        self._id, commands.Basic.CancelOk(consumer_tag=method.consumer_tag)
                    )
                )
            self._on_cancel(method.consumer_tag or "")
        elif isinstance(method, commands.Channel.Close):
            self._conn.push(method_frame(self._id, commands.Channel.CloseOk()))
            self.mark_closed(
                channel_error(
                    method.reply_text or "",
                    method.reply_code or 0,
                    method.class_id or 0,
                    method.method_id or 0,
                )
            )
            if not self._closing:
                self._conn.release(self._id)
            # else: both sides closed at once and the broker will still answer
            # our channel.close; keep the number until it did, so that the
            # stray close-ok cannot reach a new channel with the same number.
        elif isinstance(method, commands.Channel.CloseOk):
            if self._rpcs:
                self._on_reply(method, None)
            self.mark_closed(ChannelClosed("closed by the client"))
            self._conn.release(self._id)
        elif isinstance(method, commands.Channel.Flow):
            self._conn.push(method_frame(self._id, commands.Channel.FlowOk(active=method.active)))
        else:
            self._on_reply(method, method)

    def start_content(self, content: tuple[Any, ...]) -> None:
        self._content = content
        self._props = None
        self._body_size = 0
        self._body_received = 0

    def on_header(self, data: bytes, start: int) -> None:
        if self._content is None:
            raise ProtocolError(f"content header without a method on channel {self._id}")
        _cls, _weight, size, flags = unpack_content_head(data, start)
        pos = start + 14
        word = flags
        while word & 1:
            # More property-flag words follow (no basic property uses them,
            # but the grammar allows it): skip them.
            word = unpack_u16(data, pos)[0]
            pos += 2
        self._props = decode_properties(data, pos, flags & 0xFFFE)
        self._body_size = size
        if size == 0:
            self._complete(b"")

    def on_body(self, data: bytes, start: int, end: int) -> None:
        if self._props is None:
            raise ProtocolError(f"content body without a header on channel {self._id}")
        n = end - start
        if not self._body_received and n == self._body_size:
            # The common case: the whole body in one frame, one copy.
            self._complete(data[start:end])
            return
        # Keep views of the received chunks (immutable bytes) and copy once.
        self._body_parts.append(memoryview(data)[start:end])
        self._body_received += n
        if self._body_received >= self._body_size:
            body = b"".join(self._body_parts)
            self._body_parts = []
            self._complete(body)

    def _complete(self, body: bytes) -> None:
        content = self._content
        props = self._props
        assert content is not None and props is not None
        self._content = None
        self._props = None
        kind = content[0]
        if kind == DELIVER:
            self.deliver(content, body, props)
        elif kind == GET_OK:
            _, tag, redelivered, exchange, routing_key, count = content
            self._on_reply(
                None, Delivery("", tag, redelivered, exchange, routing_key, body, props, count)
            )
        else:
            _, code, text, exchange, routing_key = content
            self._on_return(code, text, exchange, routing_key)  # the body is not needed

    def deliver(self, content: tuple[Any, ...], body: bytes, props: Properties) -> None:
        consumer = self._consumers.get(content[1])
        if consumer is None or self._closing:
            # Cancelled consumer or closing channel: the broker requeues
            # anything unacknowledged when the channel closes.
            return
        try:
            consumer[0](
                Delivery(content[1], content[2], content[3], content[4], content[5], body, props)
            )
        except Exception:
            log.exception(
                "delivery callback of consumer %r on channel %d failed", content[1], self._id
            )

    def _on_return(self, reply_code: int, reply_text: str, exchange: str, routing_key: str) -> None:
        # basic.return carries no publish sequence number, and neither the
        # destination nor the body tells two publishes apart (a headers
        # exchange routes on the headers; bodies repeat).  RabbitMQ sends a
        # message's return immediately before its basic.ack, on the same
        # channel: the next confirm names the returned publish.
        if self._confirm:
            self._returned = (exchange, routing_key, reply_text, reply_code)
        else:
            self._log_return(exchange, routing_key, reply_text, reply_code)

    def _log_return(self, exchange: str, routing_key: str, reply_text: str, code: int) -> None:
        log.warning(
            "channel %d: message to exchange %r with routing key %r was returned: %s (%d)",
            self._id,
            exchange,
            routing_key,
            reply_text,
            code,
        )

    def on_confirm(self, delivery_tag: int, multiple: bool, nacked: bool) -> None:
        unconfirmed = self._unconfirmed
        returned = self._returned
        if returned is not None:
            # The publish this confirm names is the one returned just before
            # (with multiple=True, the highest of those it confirms).
            self._returned = None
            named = unconfirmed.get(delivery_tag)
            if named is not None and named.error is None:
                named.error = Unroutable(*returned)
            else:
                self._log_return(*returned)
        if multiple:
            done = [seq for seq in unconfirmed if seq <= delivery_tag]
        else:
            done = [delivery_tag] if delivery_tag in unconfirmed else []
        for seq in done:
            confirm = unconfirmed.pop(seq)
            if nacked and confirm.error is None:
                confirm.error = PublishNacked(
                    f"the broker rejected the message published to exchange "
                    f"{confirm.exchange!r} with routing key {confirm.routing_key!r} (basic.nack)"
                )
            confirm.event.set()

    def _on_cancel(self, consumer_tag: str) -> None:
        consumer = self._consumers.pop(consumer_tag, None)
        log.info("channel %d: the broker cancelled consumer %r", self._id, consumer_tag)
        if consumer is not None and consumer[1] is not None:
            try:
                consumer[1](consumer_tag)
            except Exception:
                log.exception("cancel callback of consumer %r failed", consumer_tag)


if TYPE_CHECKING:

    def _implements(ch: AMQPChannel) -> Channel:
        return ch
