"""A trio-native AMQP 0-9-1 client, built on pamqp's codec.

This is the ``amqp://`` / ``amqps://`` implementation of the transport seam
(``asyncworker._transport``).  One connection runs three background tasks:

* the **reader** receives large chunks and parses every complete frame in
  them.  The hot frames (``basic.deliver``, content header, content body,
  heartbeat, ``basic.ack``) are decoded by hand; everything else goes through
  pamqp.  Delivery callbacks are called synchronously from the reader.
* the **writer** sends everything queued since its last wake-up in one
  ``send_all``.  Callers never write to the socket: they append already
  marshalled frames to ``_out`` and wake the writer, so an ``ack`` costs a
  ``struct.pack`` and a list append, and a burst of acks becomes one write.
* the **heartbeater** (only if a heartbeat was negotiated) sends heartbeats
  when the connection is idle and declares it dead when the broker is silent.

Background tasks never raise: a failure is recorded as the connection's
``close_reason``, every channel is marked closed with it, and everything that
waits is woken up.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import os
import platform
import struct
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio
from pamqp import commands
from pamqp import frame as pframe
from pamqp.base import Frame as _PamqpMethod
from pamqp.header import ProtocolHeader

from ._exceptions import (
    AuthenticationError,
    ChannelClosed,
    ConnectError,
    ConnectionClosed,
    PublishNacked,
    QueueNotFound,
    Unroutable,
)
from ._transport import (
    CancelCallback,
    ConnectionParams,
    Delivery,
    DeliveryCallback,
    Properties,
    QueueInfo,
)

if TYPE_CHECKING:
    from ._transport import Channel, Connection

__all__ = ["AMQPChannel", "AMQPConnection", "connect"]

log = logging.getLogger("asyncworker.amqp")

_VERSION: Final = "0.1.0"

# Frame types and the frame-end octet (AMQP 0-9-1 section 4.2.3).
_FRAME_METHOD: Final = 1
_FRAME_HEADER: Final = 2
_FRAME_BODY: Final = 3
_FRAME_HEARTBEAT: Final = 8
_FRAME_END: Final = 0xCE

# Method indexes (class_id << 16 | method_id) of the hand-coded methods.
_BASIC_PUBLISH: Final = 0x003C0028
_BASIC_DELIVER: Final = 0x003C003C
_BASIC_ACK: Final = 0x003C0050
_BASIC_REJECT: Final = 0x003C005A
_BASIC_NACK: Final = 0x003C0078
_BASIC_CONSUME: Final = 0x003C0014
_QUEUE_DECLARE: Final = 0x0032000A
_QUEUE_BIND: Final = 0x00320014
_EXCHANGE_DECLARE: Final = 0x0028000A

#: How many bytes the reader asks for per ``receive_some``.  Large enough to
#: hold hundreds of small deliveries, small enough to stay below glibc's mmap
#: threshold so that every receive is a cheap heap allocation.
_RECEIVE_SIZE: Final = 65536
#: An ack is written at once, without waking the writer, when nothing was
#: written for this long (seconds); below that, acks share the writer's writes.
_INLINE_SEND_GAP: Final = 0.0005
#: Successful reads in a row before the reader yields to the other tasks.
_READS_BEFORE_YIELD: Final = 4
#: A read shorter than this means the socket was (almost surely) emptied.
_SMALL_READ: Final = 16384
#: ``publish`` waits for the writer once this many bytes are queued, so that a
#: fast publisher cannot grow the outgoing buffer without bound.
_HIGH_WATER: Final = 4 * 1024 * 1024
#: How long leaving the connection waits for ``connection.close-ok``.
_CLOSE_TIMEOUT: Final = 3.0

_frame_head = struct.Struct(">BHI")
_u32 = struct.Struct(">I")
_u8 = struct.Struct(">B")
_u16 = struct.Struct(">H")
_deliver_mid = struct.Struct(">QB")  # delivery-tag, redelivered
_content_head = struct.Struct(">HHQH")  # class-id, weight, body-size, property flags
_u64_bits = struct.Struct(">QB")  # basic.ack: delivery-tag, multiple
#: A complete settlement frame: basic.ack, basic.reject and basic.nack all
#: carry a 64-bit delivery tag and one octet of bits (13 payload bytes).
_settle_frame = struct.Struct(">BHIIQBB")
_content_frame_head = struct.Struct(">BHIHHQ")  # frame head + class, weight, body size
_HEARTBEAT_FRAME: Final = bytes((_FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, _FRAME_END))
_FRAME_END_BYTE: Final = bytes((_FRAME_END,))

_CAPABILITIES: Final[dict[str, Any]] = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "exchange_exchange_bindings": True,
}

# Property flags of the content header (AMQP 0-9-1 section 4.2.6.1).
_P_CONTENT_TYPE: Final = 0x8000
_P_CONTENT_ENCODING: Final = 0x4000
_P_HEADERS: Final = 0x2000
_P_DELIVERY_MODE: Final = 0x1000
_P_PRIORITY: Final = 0x0800
_P_CORRELATION_ID: Final = 0x0400
_P_REPLY_TO: Final = 0x0200
_P_EXPIRATION: Final = 0x0100
_P_MESSAGE_ID: Final = 0x0080
_P_TIMESTAMP: Final = 0x0040
_P_TYPE: Final = 0x0020
_P_USER_ID: Final = 0x0010
_P_APP_ID: Final = 0x0008
_P_CLUSTER_ID: Final = 0x0004

_M = TypeVar("_M", bound=_PamqpMethod)

# Kinds of content a channel can be assembling (what the method frame was).
_DELIVER: Final = 0
_GET_OK: Final = 1
_RETURN: Final = 2


class _ProtocolError(Exception):
    """The broker sent something this client cannot make sense of."""


class _EOF(Exception):
    """The socket was closed by the peer."""


# --------------------------------------------------------------------------
# Encoding helpers


def _method_frame(channel_id: int, method: _PamqpMethod) -> bytes:
    return pframe.marshal(method, channel_id)


def _arguments_frame(
    channel_id: int,
    index: int,
    names: tuple[str, ...],
    flags: tuple[bool, ...],
    arguments: Mapping[str, Any] | None,
) -> bytes:
    """A method frame laid out as ``reserved-1 (short), shortstr..., bits, arguments``.

    ``basic.consume``, ``queue.declare``, ``queue.bind`` and
    ``exchange.declare`` all have this layout; ``index`` is
    ``class_id << 16 | method_id``, ``flags`` are the bit fields in the
    spec's order (the first is the lowest bit).  Encoded here rather than by
    pamqp so that the arguments go through :func:`_field_table`: an argument
    that cannot be encoded raises before anything is sent.
    """
    bits = 0
    for i, flag in enumerate(flags):
        bits |= flag << i
    payload = b"".join(
        (
            _u32.pack(index),
            b"\x00\x00",  # reserved-1 (ticket)
            *(_shortstr(name) for name in names),
            _u8.pack(bits),
            _field_table(arguments or {}),
        )
    )
    return _frame_head.pack(_FRAME_METHOD, channel_id, len(payload)) + payload + _FRAME_END_BYTE


def _close_frame(channel_id: int) -> bytes:
    """``channel.close`` for a normal shutdown."""
    return _method_frame(
        channel_id,
        commands.Channel.Close(
            reply_code=200, reply_text="Normal shutdown", class_id=0, method_id=0
        ),
    )


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return _u8.pack(len(raw)) + raw


_i32 = struct.Struct(">i")
_i64 = struct.Struct(">q")
_u64 = struct.Struct(">Q")
_f64 = struct.Struct(">d")


def _field_table(table: Mapping[str, Any]) -> bytes:
    """Encode an AMQP field table (headers, arguments).

    Ours rather than pamqp's: pamqp 3.3 packs ints in -128..-1 as an unsigned
    octet (``struct.error``), encodes floats as 32-bit (losing precision),
    refuses ``bytes`` and turns small decimals such as ``Decimal("1E-7")``
    into 0.  Ints go out as signed 32 or 64 bits, floats as doubles,
    bytes-like values as byte arrays.  A value that cannot be encoded raises
    ``TypeError`` (``ValueError`` for a too long key or string) naming the key.
    """
    parts = []
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"AMQP table keys must be str, got {key!r}")
        parts.append(_shortstr(key))
        try:
            parts.append(_field_value(value))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"cannot encode header/argument {key!r}: {exc}") from None
    raw = b"".join(parts)
    return _u32.pack(len(raw)) + raw


def _field_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + _i32.pack(value)
        if -(2**63) <= value < 2**63:
            return b"l" + _i64.pack(value)
        raise TypeError(f"integer {value} does not fit in 64 bits")
    if isinstance(value, str):
        raw = value.encode()
        return b"S" + _u32.pack(len(raw)) + raw
    if isinstance(value, float):
        return b"d" + _f64.pack(value)
    if isinstance(value, decimal.Decimal):
        return b"D" + _decimal(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"x" + _u32.pack(len(value)) + bytes(value)
    if isinstance(value, datetime.datetime):
        return b"T" + _timestamp(value)
    if isinstance(value, Mapping):
        return b"F" + _field_table(value)
    if isinstance(value, (list, tuple)):
        raw = b"".join(_field_value(item) for item in value)
        return b"A" + _u32.pack(len(raw)) + raw
    if value is None:
        return b"V"
    raise TypeError(
        f"unsupported type {type(value).__name__}; use bool, int, float, str, bytes, "
        "Decimal, datetime, dict, list or None"
    )


def _decimal(value: decimal.Decimal) -> bytes:
    """An AMQP decimal: a scale octet (decimal places) and a signed 32-bit integer."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise TypeError(f"decimal {value} is not a finite number")
    scale = max(0, -exponent)
    raw = int(value.scaleb(scale))
    if scale > 255 or not -(2**31) <= raw < 2**31:
        raise TypeError(
            f"decimal {value} does not fit in an AMQP decimal (a signed 32-bit integer "
            "and at most 255 decimal places): send it as a string"
        )
    return _u8.pack(scale) + _i32.pack(raw)


def _timestamp(value: datetime.datetime) -> bytes:
    """An AMQP timestamp: unsigned seconds since the epoch (naive datetimes are UTC)."""
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=datetime.UTC)
    seconds = int(value.timestamp())
    if seconds < 0:
        raise TypeError(f"timestamp {value.isoformat()} is before 1970: AMQP cannot encode it")
    return _u64.pack(seconds)


def _to_datetime(seconds: int) -> datetime.datetime | None:
    """An AMQP timestamp as an aware UTC datetime; None if it is out of range."""
    # As pamqp does: values beyond 2106 are taken for milliseconds (some
    # clients send those).
    value = seconds / 1000.0 if seconds > 0xFFFFFFFF else seconds
    try:
        return datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None


#: Field value types of fixed size (RabbitMQ's 0-9-1 errata, plus 'L').
_FIXED_FIELDS: Final[dict[int, struct.Struct]] = {
    ord("b"): struct.Struct(">b"),
    ord("B"): struct.Struct(">B"),
    ord("s"): struct.Struct(">h"),
    ord("u"): struct.Struct(">H"),
    ord("I"): struct.Struct(">i"),
    ord("i"): struct.Struct(">I"),
    ord("l"): struct.Struct(">q"),
    ord("L"): struct.Struct(">Q"),
    ord("f"): struct.Struct(">f"),
    ord("d"): struct.Struct(">d"),
}


def _decode_table(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """Decode the field table at ``pos``; return it and the position after it.

    Ours rather than pamqp's: pamqp 3.3 reads a decimal's value as unsigned
    (``-1.5`` comes back as ``429496728.1``), re-slices its input at every
    value and fails on timestamps out of datetime's range.
    """
    end = pos + 4 + _u32.unpack_from(data, pos)[0]
    pos += 4
    table: dict[str, Any] = {}
    while pos < end:
        n = data[pos]
        key = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        table[key], pos = _decode_value(data, pos + 1 + n)
    return table, end


def _decode_value(data: bytes, pos: int) -> tuple[Any, int]:
    kind = data[pos]
    pos += 1
    fixed = _FIXED_FIELDS.get(kind)
    if fixed is not None:
        return fixed.unpack_from(data, pos)[0], pos + fixed.size
    if kind == 0x53:  # S: long string; bytes if it is not UTF-8 (as pamqp does)
        end = pos + 4 + _u32.unpack_from(data, pos)[0]
        raw = data[pos + 4 : end]
        try:
            return raw.decode(), end
        except UnicodeDecodeError:
            return bytes(raw), end
    if kind == 0x74:  # t: boolean
        return data[pos] != 0, pos + 1
    if kind == 0x46:  # F: nested table
        return _decode_table(data, pos)
    if kind == 0x41:  # A: array
        end = pos + 4 + _u32.unpack_from(data, pos)[0]
        pos += 4
        items = []
        while pos < end:
            item, pos = _decode_value(data, pos)
            items.append(item)
        return items, end
    if kind == 0x54:  # T: timestamp (the raw number if datetime cannot hold it)
        seconds = _u64.unpack_from(data, pos)[0]
        when = _to_datetime(seconds)
        return (seconds if when is None else when), pos + 8
    if kind == 0x44:  # D: decimal (scale octet, signed 32-bit value)
        return decimal.Decimal(_i32.unpack_from(data, pos + 1)[0]).scaleb(-data[pos]), pos + 5
    if kind == 0x78:  # x: byte array
        end = pos + 4 + _u32.unpack_from(data, pos)[0]
        return bytes(data[pos + 4 : end]), end
    if kind == 0x56 or kind == 0:  # V: void (and 0, seen in the wild)
        return None, pos
    raise _ProtocolError(f"unknown field value type {kind:#04x} in a table")


def _encode_properties(p: Properties) -> bytes:
    """Encode the property flags and list of a content header."""
    flags = 0
    parts: list[bytes] = []
    if p.content_type is not None:
        flags |= _P_CONTENT_TYPE
        parts.append(_shortstr(p.content_type))
    if p.content_encoding is not None:
        flags |= _P_CONTENT_ENCODING
        parts.append(_shortstr(p.content_encoding))
    if p.headers is not None:
        flags |= _P_HEADERS
        parts.append(_field_table(p.headers))
    if p.delivery_mode is not None:
        flags |= _P_DELIVERY_MODE
        parts.append(_u8.pack(p.delivery_mode))
    if p.priority is not None:
        flags |= _P_PRIORITY
        parts.append(_u8.pack(p.priority))
    if p.correlation_id is not None:
        flags |= _P_CORRELATION_ID
        parts.append(_shortstr(p.correlation_id))
    if p.reply_to is not None:
        flags |= _P_REPLY_TO
        parts.append(_shortstr(p.reply_to))
    if p.expiration is not None:
        flags |= _P_EXPIRATION
        parts.append(_shortstr(p.expiration))
    if p.message_id is not None:
        flags |= _P_MESSAGE_ID
        parts.append(_shortstr(p.message_id))
    if p.timestamp is not None:
        flags |= _P_TIMESTAMP
        parts.append(_timestamp(p.timestamp))
    if p.type is not None:
        flags |= _P_TYPE
        parts.append(_shortstr(p.type))
    if p.user_id is not None:
        flags |= _P_USER_ID
        parts.append(_shortstr(p.user_id))
    if p.app_id is not None:
        flags |= _P_APP_ID
        parts.append(_shortstr(p.app_id))
    return flags.to_bytes(2, "big") + b"".join(parts)


def _decode_properties(data: bytes, pos: int, flags: int) -> Properties:
    """Decode the property list of a content header starting at ``pos``.

    Only the properties that are present are touched: the common case (a
    couple of flags, or none) costs a few slices.  It never fails on what a
    foreign publisher may send (invalid UTF-8, absurd timestamps): an error
    here would close the connection, and every reconnection would meet the
    same message again.
    """
    if not flags:
        return Properties()
    if flags == _P_DELIVERY_MODE:  # the most common case: only persistence
        return Properties(delivery_mode=data[pos])
    p = Properties()
    if flags & _P_CONTENT_TYPE:
        n = data[pos]
        p.content_type = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_CONTENT_ENCODING:
        n = data[pos]
        p.content_encoding = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_HEADERS:
        size = _u32.unpack_from(data, pos)[0]
        try:
            p.headers = _decode_table(data, pos)[0]
        except (_ProtocolError, struct.error, IndexError) as exc:
            # The table's size is known: skip it rather than kill the connection
            # (and the next one, which the same message would reach again).
            log.warning("ignoring the undecodable headers table of a message: %s", exc)
            p.headers = {}
        pos += 4 + size
    if flags & _P_DELIVERY_MODE:
        p.delivery_mode = data[pos]
        pos += 1
    if flags & _P_PRIORITY:
        p.priority = data[pos]
        pos += 1
    if flags & _P_CORRELATION_ID:
        n = data[pos]
        p.correlation_id = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_REPLY_TO:
        n = data[pos]
        p.reply_to = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_EXPIRATION:
        n = data[pos]
        p.expiration = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_MESSAGE_ID:
        n = data[pos]
        p.message_id = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_TIMESTAMP:
        p.timestamp = _to_datetime(_u64.unpack_from(data, pos)[0])
        pos += 8
    if flags & _P_TYPE:
        n = data[pos]
        p.type = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_USER_ID:
        n = data[pos]
        p.user_id = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    if flags & _P_APP_ID:
        n = data[pos]
        p.app_id = data[pos + 1 : pos + 1 + n].decode("utf-8", "replace")
        pos += 1 + n
    # cluster-id (deprecated) is ignored.
    return p


_NO_PROPERTIES: Final = b"\x00\x00"


def _channel_error(reply_text: str, reply_code: int) -> ChannelClosed:
    if reply_code == 404:
        return QueueNotFound(reply_text, reply_code)
    return ChannelClosed(reply_text, reply_code)


def _fresh(exc: BaseException) -> BaseException:
    """A new instance of a stored close reason, so that raising it from many
    places does not pile every raise site onto one shared traceback."""
    if isinstance(exc, ChannelClosed | ConnectionClosed):
        new = type(exc)(exc.reply_text, exc.reply_code)
        new.__cause__ = exc.__cause__
        return new
    return exc


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

    __slots__ = ("body", "error", "event", "exchange", "mandatory", "routing_key")

    def __init__(self, exchange: str, routing_key: str, body: bytes, mandatory: bool) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.mandatory = mandatory


# --------------------------------------------------------------------------
# Channel


class AMQPChannel:
    """One AMQP channel of an :class:`AMQPConnection` (implements ``Channel``).

    Synchronous methods (declarations, ``qos``, ``consume``, ...) are serialised
    by a lock: AMQP allows one outstanding synchronous request per channel.
    """

    def __init__(self, connection: AMQPConnection, channel_id: int) -> None:
        self._conn = connection
        self._id = channel_id
        self._lock = trio.Lock()
        self._rpcs: deque[_Rpc] = deque()
        self._reason: BaseException | None = None
        self._closing = False
        self._closed_event = trio.Event()
        self._consumers: dict[str, tuple[DeliveryCallback, CancelCallback | None]] = {}
        self._confirm = False
        self._next_seq = 1
        self._unconfirmed: dict[int, _Confirm] = {}
        # Content being assembled: the method's fields, then the properties and
        # body parts as the header and body frames arrive.
        self._content: tuple[Any, ...] | None = None
        self._props: Properties | None = None
        self._body_size = 0
        self._body_received = 0
        self._body_parts: list[memoryview] = []

    def __repr__(self) -> str:
        state = "open" if self.is_open else f"closed ({self._reason})"
        return f"<AMQPChannel {self._id} {state}>"

    # -- state

    @property
    def channel_id(self) -> int:
        """The channel number."""
        return self._id

    @property
    def is_open(self) -> bool:
        """True until the channel is closed (or is closing)."""
        return self._reason is None and not self._closing

    @property
    def close_reason(self) -> BaseException | None:
        """Why the channel closed (a ``ChannelClosed`` or ``ConnectionClosed``), or None."""
        return self._reason

    async def wait_closed(self) -> None:
        """Return once the channel is closed, for whatever reason."""
        await self._closed_event.wait()

    def _check_open(self) -> None:
        if self._reason is not None:
            raise _fresh(self._reason)
        if self._closing:
            raise ChannelClosed("the channel is closing")

    def _mark_closed(self, reason: BaseException) -> None:
        """Record why the channel closed and fail everything that waits on it."""
        if self._reason is not None:
            return
        self._reason = reason
        self._content = None
        self._body_parts = []
        while self._rpcs:
            rpc = self._rpcs.popleft()
            rpc.error = reason
            rpc.event.set()
        for confirm in self._unconfirmed.values():
            confirm.error = reason
            confirm.event.set()
        self._unconfirmed.clear()
        self._consumers.clear()
        self._closed_event.set()

    def _abandon(self) -> None:
        """Close this channel without waiting: its opener gave up after channel.open."""
        if self._reason is not None or self._closing:
            return
        self._closing = True
        self._conn._push(_close_frame(self._id))

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
            frame = _method_frame(self._id, method)
        async with self._lock:
            self._check_open()
            self._conn._check_open()
            rpc = self._request(frame, expect)
            await rpc.event.wait()
        if rpc.error is not None:
            raise _fresh(rpc.error)
        return rpc.result

    def _request(self, frame: bytes, expect: tuple[type[Any], ...]) -> _Rpc:
        """Queue a waiter for the reply, then send ``frame``.

        The waiter stays queued even if its caller gives up: replies arrive in
        request order, so an abandoned waiter must still absorb its reply
        instead of letting the next request take it.
        """
        rpc = _Rpc(expect)
        self._rpcs.append(rpc)
        self._conn._push(frame)
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
        tag = consumer_tag or self._conn._new_consumer_tag(self._id)
        if tag in self._consumers:
            raise ValueError(f"consumer tag {tag!r} is already in use on this channel")
        self._consumers[tag] = (on_delivery, on_cancel)
        try:
            # no-local, no-ack, exclusive, no-wait
            flags = (False, False, exclusive, False)
            frame = _arguments_frame(self._id, _BASIC_CONSUME, (queue, tag), flags, arguments)
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
            self._check_open()
        conn = self._conn
        frame = _settle_frame.pack(
            _FRAME_METHOD, self._id, 13, _BASIC_ACK, delivery_tag, multiple, _FRAME_END
        )
        if conn._wake is not None:
            # The writer is idle: send at once if nothing was sent lately
            # (a moderate rate, where waking the writer would cost a whole
            # scheduler pass per message); at high rates, leave it to the
            # writer, which sends all the acks of a pass in one write.
            if conn._fd >= 0 and not conn._out:
                now = conn._now()
                if now - conn._last_send > _INLINE_SEND_GAP:
                    try:
                        sent = os.write(conn._fd, frame)
                    except OSError:
                        sent = 0  # the writer will meet the error and fail the connection
                    conn._last_send = now
                    if sent == len(frame):
                        return
                    frame = frame[sent:]
            conn._out.append(frame)
            conn._wake_writer()
        else:
            conn._out.append(frame)

    def reject(self, delivery_tag: int, requeue: bool = True) -> None:
        """Reject a delivery, requeueing it or not (dead-lettering it if configured)."""
        self._check_open()
        self._conn._push(
            _settle_frame.pack(
                _FRAME_METHOD, self._id, 13, _BASIC_REJECT, delivery_tag, requeue, _FRAME_END
            )
        )

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """Negatively acknowledge one delivery (or all up to it, with ``multiple``)."""
        self._check_open()
        self._conn._push(
            _settle_frame.pack(
                _FRAME_METHOD,
                self._id,
                13,
                _BASIC_NACK,
                delivery_tag,
                multiple | (requeue << 1),
                _FRAME_END,
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
        self._check_open()
        conn = self._conn
        conn._check_open()
        if conn._out_size > _HIGH_WATER:
            await conn._wait_drained()
            self._check_open()
            conn._check_open()
        frames = conn._encode_publish(self._id, body, exchange, routing_key, properties, mandatory)
        if not self._confirm:
            conn._push_many(frames)
            await trio.lowlevel.checkpoint()
            return
        confirm = _Confirm(exchange, routing_key, body, mandatory)
        # Sequence numbers count publishes in wire order, and the frames are
        # queued synchronously right here, so the two cannot diverge.
        self._unconfirmed[self._next_seq] = confirm
        self._next_seq += 1
        conn._push_many(frames)
        await confirm.event.wait()
        if confirm.error is not None:
            raise _fresh(confirm.error)

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
        frame = _arguments_frame(self._id, _QUEUE_DECLARE, (queue,), flags, arguments)
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
        frame = _arguments_frame(self._id, _QUEUE_BIND, names, (False,), arguments)  # no-wait
        await self._rpc(frame, commands.Queue.BindOk)

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
        frame = _arguments_frame(
            self._id, _EXCHANGE_DECLARE, (exchange, exchange_type), flags, arguments
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
                if self._reason is not None:
                    return
                self._conn._check_open()
                # From here on, deliveries are dropped (the broker requeues
                # them) and settlements raise: the broker ignores them anyway.
                self._closing = True
                rpc = self._request(_close_frame(self._id), (commands.Channel.CloseOk,))
                await rpc.event.wait()
        except (ChannelClosed, ConnectionClosed):
            pass  # already gone: that is what was asked for
        if self._reason is None:
            self._mark_closed(reason)
            self._conn._release(self._id)

    # -- reader callbacks (called synchronously from the reader task)

    def _start_content(self, content: tuple[Any, ...]) -> None:
        self._content = content
        self._props = None
        self._body_size = 0
        self._body_received = 0

    def _on_header(self, data: bytes, start: int) -> None:
        if self._content is None:
            raise _ProtocolError(f"content header without a method on channel {self._id}")
        _cls, _weight, size, flags = _content_head.unpack_from(data, start)
        pos = start + 14
        word = flags
        while word & 1:
            # More property-flag words follow (no basic property uses them,
            # but the grammar allows it): skip them.
            word = _u16.unpack_from(data, pos)[0]
            pos += 2
        self._props = _decode_properties(data, pos, flags & 0xFFFE)
        self._body_size = size
        if size == 0:
            self._complete(b"")

    def _on_body(self, data: bytes, start: int, end: int) -> None:
        if self._props is None:
            raise _ProtocolError(f"content body without a header on channel {self._id}")
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
        if kind == _DELIVER:
            self._deliver(content, body, props)
        elif kind == _GET_OK:
            _, tag, redelivered, exchange, routing_key, count = content
            self._on_reply(
                None, Delivery("", tag, redelivered, exchange, routing_key, body, props, count)
            )
        else:
            _, code, text, exchange, routing_key = content
            self._on_return(code, text, exchange, routing_key, body)

    def _deliver(self, content: tuple[Any, ...], body: bytes, props: Properties) -> None:
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

    def _on_return(
        self, reply_code: int, reply_text: str, exchange: str, routing_key: str, body: bytes
    ) -> None:
        # basic.return does not carry the publish sequence number: match the
        # oldest unconfirmed mandatory publish with the same destination and body.
        for confirm in self._unconfirmed.values():
            if (
                confirm.mandatory
                and confirm.error is None
                and confirm.routing_key == routing_key
                and confirm.exchange == exchange
                and confirm.body == body
            ):
                confirm.error = Unroutable(exchange, routing_key, reply_text, reply_code)
                return
        log.warning(
            "channel %d: message to exchange %r with routing key %r was returned: %s (%d)",
            self._id,
            exchange,
            routing_key,
            reply_text,
            reply_code,
        )

    def _on_confirm(self, delivery_tag: int, multiple: bool, nacked: bool) -> None:
        unconfirmed = self._unconfirmed
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


# --------------------------------------------------------------------------
# Connection


class AMQPConnection:
    """A connection to one vhost of an AMQP 0-9-1 broker (implements ``Connection``).

    Created by :func:`connect`; not meant to be instantiated directly.
    """

    def __init__(self, params: ConnectionParams, stream: trio.abc.Stream) -> None:
        self._params = params
        self._stream = stream
        # On plain TCP the reader and writer use the socket's file descriptor
        # directly (see _receive/_send_all): trio's stream methods add a
        # scheduler pass to every successful call, which at moderate message
        # rates is a large part of the cost of a message.  TLS uses the stream.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._reads_in_a_row = 0
        self._read_was_small = False
        self._frame_max = params.frame_max
        self._channel_max = 2047
        self._heartbeat = 0
        self._channels: dict[int, AMQPChannel] = {}
        self._consumer_seq = 0
        self._reason: BaseException | None = None
        self._closing = False
        self._closed_event = trio.Event()
        self._close_ok = trio.Event()
        self._bg_scope: trio.CancelScope | None = None
        #: Set while the broker has blocked publishing (connection.blocked).
        self.blocked: str | None = None
        # Outgoing frames and the writer's wake-up event (None while it runs).
        self._out: list[bytes | memoryview] = []
        self._out_size = 0  # only maintained for publishes (back-pressure)
        self._wake: trio.Event | None = None
        self._drained: trio.Event | None = None
        self._last_send = 0.0
        self._last_recv = 0.0
        # trio.current_time() without its layers of indirection (on the hot path).
        self._now = trio.lowlevel.current_clock().current_time
        self._inbuf = bytearray()  # handshake reads; the leftover goes to the reader

    def __repr__(self) -> str:
        state = "open" if self.is_open else f"closed ({self._reason})"
        return f"<AMQPConnection {self._params.display} {state}>"

    # -- state

    @property
    def params(self) -> ConnectionParams:
        """The parameters this connection was opened with."""
        return self._params

    @property
    def is_open(self) -> bool:
        """True until the connection is closed (or is closing)."""
        return self._reason is None and not self._closing

    @property
    def close_reason(self) -> BaseException | None:
        """Why the connection closed (a ``ConnectionClosed``), or None while open."""
        return self._reason

    @property
    def frame_max(self) -> int:
        """The negotiated maximum frame size."""
        return self._frame_max

    @property
    def heartbeat(self) -> int:
        """The negotiated heartbeat interval in seconds (0: none)."""
        return self._heartbeat

    async def wait_closed(self) -> None:
        """Return once the connection is closed, for whatever reason."""
        await self._closed_event.wait()

    def _check_open(self) -> None:
        if self._reason is not None:
            raise _fresh(self._reason)
        if self._closing:
            raise ConnectionClosed("the connection is closing")

    def _fail(self, reason: BaseException, *, grace: float = 0.0) -> None:
        """Mark the connection and its channels closed and stop the background.

        ``grace`` leaves the writer that long to flush (e.g. a close-ok).
        """
        if self._reason is None:
            self._reason = reason
            if not self._closing:
                log.warning("%s: %s", self._params.display, reason)
        for channel in list(self._channels.values()):
            channel._mark_closed(self._reason)
        self._closed_event.set()
        self._close_ok.set()
        if self._wake is not None:
            self._wake_writer()
        if self._drained is not None:
            self._drained.set()
        if self._bg_scope is not None:
            if grace:
                self._bg_scope.deadline = min(self._bg_scope.deadline, trio.current_time() + grace)
            else:
                self._bg_scope.cancel()

    # -- channels

    async def channel(self) -> AMQPChannel:
        """Open a new channel."""
        self._check_open()
        channel_id = 1
        while channel_id in self._channels:
            channel_id += 1
        if channel_id > self._channel_max:
            raise ChannelClosed(f"no free channel number (channel_max is {self._channel_max})")
        ch = AMQPChannel(self, channel_id)
        self._channels[channel_id] = ch
        # Sent at once (a new channel has no other request to wait for), so
        # that an opener cancelled from here on knows channel.open went out.
        rpc = ch._request(
            _method_frame(channel_id, commands.Channel.Open()), (commands.Channel.OpenOk,)
        )
        try:
            await rpc.event.wait()
        except BaseException:
            # Given up (cancelled): the broker opens the channel anyway, or
            # already has.  Close it right behind the open; its close-ok
            # frees the number.
            ch._abandon()
            raise
        if rpc.error is not None:
            raise _fresh(rpc.error)
        return ch

    def _release(self, channel_id: int) -> None:
        self._channels.pop(channel_id, None)

    def _new_consumer_tag(self, channel_id: int) -> str:
        self._consumer_seq += 1
        return f"asyncworker.{channel_id}.{self._consumer_seq}"

    # -- closing

    async def aclose(self) -> None:
        """Close the connection (``connection.close``), waiting a few seconds at most."""
        if self._reason is None and not self._closing:
            self._closing = True
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                self._push(
                    _method_frame(
                        0,
                        commands.Connection.Close(
                            reply_code=200, reply_text="Normal shutdown", class_id=0, method_id=0
                        ),
                    )
                )
                await self._close_ok.wait()
        elif self._reason is None:
            # Another task is closing: wait for it (bounded as well).
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await self._closed_event.wait()
        self._fail(ConnectionClosed("closed by the client"), grace=0.5)
        await trio.lowlevel.checkpoint()

    # -- writing

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def _push(self, frame: bytes) -> None:
        self._out.append(frame)
        if self._wake is not None:
            self._wake_writer()

    def _push_many(self, frames: list[bytes | memoryview]) -> None:
        # One extend: the frames of one message are never interleaved with
        # another message's (every frame of the list goes out in one write).
        self._out.extend(frames)
        self._out_size += sum(map(len, frames))
        if self._wake is not None:
            self._wake_writer()

    async def _wait_drained(self) -> None:
        while self._out_size > _HIGH_WATER and self._reason is None:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    def _encode_publish(
        self,
        channel_id: int,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: Properties | None,
        mandatory: bool,
    ) -> list[bytes | memoryview]:
        ex = exchange.encode()
        rk = routing_key.encode()
        if len(ex) > 255 or len(rk) > 255:
            raise ValueError("exchange and routing key must be at most 255 bytes")
        method = b"".join(
            (
                _frame_head.pack(_FRAME_METHOD, channel_id, 9 + len(ex) + len(rk)),
                b"\x00\x3c\x00\x28\x00\x00",  # basic.publish, reserved-1
                _u8.pack(len(ex)),
                ex,
                _u8.pack(len(rk)),
                rk,
                b"\x01" if mandatory else b"\x00",
                _FRAME_END_BYTE,
            )
        )
        props = _NO_PROPERTIES if properties is None else _encode_properties(properties)
        size = len(body)
        header = (
            _content_frame_head.pack(_FRAME_HEADER, channel_id, 12 + len(props), 60, 0, size)
            + props
            + _FRAME_END_BYTE
        )
        if len(header) > self._frame_max:
            # Properties cannot span frames: the broker would close the whole
            # connection (501 FRAME_ERROR), every consumer on it included.
            raise ValueError(
                f"the message properties take {len(props)} bytes encoded, more than fit "
                f"in one frame (frame_max {self._frame_max}): move large headers into the body"
            )
        chunk = self._frame_max - 8
        if size == 0:
            return [method, header]
        if size <= chunk:
            return [
                method,
                header,
                _frame_head.pack(_FRAME_BODY, channel_id, size),
                body,
                _FRAME_END_BYTE,
            ]
        frames: list[bytes | memoryview] = [method, header]
        view = memoryview(body)
        for offset in range(0, size, chunk):
            piece = view[offset : offset + chunk]
            frames.append(_frame_head.pack(_FRAME_BODY, channel_id, len(piece)))
            frames.append(piece)
            frames.append(_FRAME_END_BYTE)
        return frames

    async def _send_all(self, data: bytes | memoryview) -> None:
        fd = self._fd
        if fd < 0:
            await self._stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            view = view[sent:]

    async def _receive(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" at EOF.  Waits only when nothing is there."""
        fd = self._fd
        if fd < 0:
            chunk = await self._stream.receive_some(size)
            # Body parts keep views of received chunks: they must be immutable.
            return chunk if type(chunk) is bytes else bytes(chunk)
        if self._reads_in_a_row >= _READS_BEFORE_YIELD:
            # Data keeps coming: let the workers and the writer run.
            self._reads_in_a_row = 0
            await trio.lowlevel.checkpoint()
        elif self._read_was_small:
            # The last read found little (one message at a moderate rate):
            # the socket is almost surely empty, so wait first rather than pay
            # for a read that fails with EAGAIN, its exception, then the wait.
            await trio.lowlevel.wait_readable(fd)
        while True:
            try:
                chunk = os.read(fd, size)
            except BlockingIOError:
                self._reads_in_a_row = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            self._reads_in_a_row += 1
            self._read_was_small = len(chunk) < _SMALL_READ
            return chunk

    async def _writer(self) -> None:
        try:
            while True:
                if not self._out:
                    if self._reason is not None:
                        return
                    wake = self._wake = trio.Event()
                    await wake.wait()
                    continue
                out = self._out
                self._out = []
                data = b"".join(out) if len(out) > 1 else out[0]
                await self._send_all(data)
                self._last_send = self._now()
                if self._out_size:
                    self._out_size = 0 if not self._out else sum(map(len, self._out))
                    if self._drained is not None and self._out_size <= _HIGH_WATER:
                        self._drained.set()
                        self._drained = None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(_lost(exc))
        except Exception as exc:
            log.exception("%s: writer failed", self._params.display)
            self._fail(ConnectionClosed(f"writer failed: {exc!r}"))

    # -- heartbeats

    async def _heartbeater(self) -> None:
        interval = self._heartbeat / 2
        dead_after = self._heartbeat * 2
        try:
            while self._reason is None:
                now = trio.current_time()
                if now - self._last_recv > dead_after:
                    self._fail(
                        ConnectionClosed(
                            f"missed heartbeats: nothing received from the broker for "
                            f"{dead_after} s"
                        )
                    )
                    return
                if now - self._last_send >= interval:
                    self._push(_HEARTBEAT_FRAME)
                    self._last_send = now  # do not queue another before the writer ran
                wake_at = min(self._last_send + interval, self._last_recv + dead_after + 0.01)
                with trio.move_on_at(wake_at):
                    await self._closed_event.wait()
        except Exception as exc:  # pragma: no cover - defensive
            log.exception("%s: heartbeat task failed", self._params.display)
            self._fail(ConnectionClosed(f"heartbeat task failed: {exc!r}"))

    # -- reading

    async def _reader(self) -> None:
        data = bytes(self._inbuf)  # whatever the handshake read past open-ok
        self._inbuf = bytearray()
        try:
            while True:
                leftover = b""
                need = 0
                if data:
                    pos = self._process(data)
                    if self._reason is not None:
                        return
                    if pos < len(data):
                        leftover = data[pos:]
                        if len(leftover) >= 7:
                            # Ask for the rest of a big frame in one receive.
                            need = 8 + _frame_head.unpack_from(leftover)[2] - len(leftover)
                chunk = await self._receive(max(_RECEIVE_SIZE, need))
                if not chunk:
                    raise _EOF
                self._last_recv = self._now()
                data = leftover + chunk if leftover else chunk
        except _EOF:
            self._fail(ConnectionClosed("connection lost: the broker closed the socket"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(_lost(exc))
        except Exception as exc:
            log.exception("%s: protocol error", self._params.display)
            self._fail(ConnectionClosed(f"protocol error: {exc!r}"))

    def _process(self, data: bytes) -> int:
        """Handle every complete frame in ``data``; return the bytes consumed."""
        n = len(data)
        pos = 0
        channels = self._channels
        unpack_head = _frame_head.unpack_from
        unpack_u32 = _u32.unpack_from
        while n - pos >= 8:
            ftype, channel_id, size = unpack_head(data, pos)
            end = pos + 7 + size
            if end >= n:
                break
            if data[end] != _FRAME_END:
                raise _ProtocolError(f"bad frame end octet {data[end]:#x}")
            start = pos + 7
            pos = end + 1
            if ftype == _FRAME_METHOD:
                index = unpack_u32(data, start)[0]
                if index == _BASIC_DELIVER:
                    ch = channels.get(channel_id)
                    if ch is None:
                        continue
                    content = _parse_deliver(data, start + 4)
                    # Fast path: the content header and a single body frame
                    # follow in this buffer (the usual case for small
                    # messages): decode all three at once, without storing
                    # per-channel assembly state.
                    if n - pos >= 30:
                        htype, hch, hsize = unpack_head(data, pos)
                        hend = pos + 7 + hsize
                        if htype == _FRAME_HEADER and hch == channel_id and hend + 8 < n:
                            _c, _w, body_size, flags = _content_head.unpack_from(data, pos + 7)
                            btype, bch, bsize = unpack_head(data, hend + 1)
                            bend = hend + 8 + bsize
                            if (
                                btype == _FRAME_BODY
                                and bch == channel_id
                                and bsize == body_size
                                and bend < n
                                and not flags & 1
                                and data[hend] == _FRAME_END
                                and data[bend] == _FRAME_END
                            ):
                                ch._deliver(
                                    content,
                                    data[hend + 8 : bend],
                                    _decode_properties(data, pos + 21, flags),
                                )
                                pos = bend + 1
                                continue
                    ch._start_content(content)
                elif index == _BASIC_ACK:
                    ch = channels.get(channel_id)
                    if ch is not None:
                        tag, bits = _u64_bits.unpack_from(data, start + 4)
                        ch._on_confirm(tag, bool(bits & 1), False)
                else:
                    method = pframe.unmarshal(data[start - 7 : end + 1])[2]
                    assert isinstance(method, _PamqpMethod)
                    if channel_id == 0:
                        self._on_connection_method(method)
                    else:
                        self._on_channel_method(channel_id, method)
            elif ftype == _FRAME_BODY:
                ch = channels.get(channel_id)
                if ch is not None:
                    ch._on_body(data, start, end)
            elif ftype == _FRAME_HEADER:
                ch = channels.get(channel_id)
                if ch is not None:
                    ch._on_header(data, start)
            elif ftype != _FRAME_HEARTBEAT:
                raise _ProtocolError(f"unknown frame type {ftype}")
        return pos

    def _on_connection_method(self, method: _PamqpMethod) -> None:
        if isinstance(method, commands.Connection.Close):
            self._push(_method_frame(0, commands.Connection.CloseOk()))
            self._fail(
                ConnectionClosed(
                    method.reply_text or "closed by the broker", method.reply_code or 0
                ),
                grace=1.0,
            )
        elif isinstance(method, commands.Connection.CloseOk):
            self._close_ok.set()
            self._fail(ConnectionClosed("closed by the client"), grace=0.5)
        elif isinstance(method, commands.Connection.Blocked):
            self.blocked = method.reason or "blocked"
            log.warning("%s: the broker blocked publishing: %s", self._params.display, self.blocked)
        elif isinstance(method, commands.Connection.Unblocked):
            self.blocked = None
            log.warning("%s: the broker unblocked publishing", self._params.display)
        else:
            log.warning("%s: ignoring unexpected %s", self._params.display, method.name)

    def _on_channel_method(self, channel_id: int, method: _PamqpMethod) -> None:
        ch = self._channels.get(channel_id)
        if ch is None:
            log.debug("ignoring %s on unknown channel %d", method.name, channel_id)
            return
        if isinstance(method, commands.Basic.Nack):
            ch._on_confirm(method.delivery_tag, method.multiple, True)
        elif isinstance(method, commands.Basic.Ack):
            ch._on_confirm(method.delivery_tag, method.multiple, False)
        elif isinstance(method, commands.Basic.GetOk):
            ch._start_content(
                (
                    _GET_OK,
                    method.delivery_tag,
                    method.redelivered,
                    method.exchange,
                    method.routing_key,
                    method.message_count,
                )
            )
        elif isinstance(method, commands.Basic.GetEmpty):
            ch._on_reply(method, None)
        elif isinstance(method, commands.Basic.Return):
            ch._start_content(
                (_RETURN, method.reply_code, method.reply_text, method.exchange, method.routing_key)
            )
        elif isinstance(method, commands.Basic.Cancel):
            # The broker cancelled a consumer (e.g. its queue was deleted).
            if not method.nowait:
                self._push(
                    _method_frame(
                        channel_id, commands.Basic.CancelOk(consumer_tag=method.consumer_tag)
                    )
                )
            ch._on_cancel(method.consumer_tag or "")
        elif isinstance(method, commands.Channel.Close):
            self._push(_method_frame(channel_id, commands.Channel.CloseOk()))
            ch._mark_closed(_channel_error(method.reply_text or "", method.reply_code or 0))
            if not ch._closing:
                self._release(channel_id)
            # else: both sides closed at once and the broker will still answer
            # our channel.close; keep the number until it did, so that the
            # stray close-ok cannot reach a new channel with the same number.
        elif isinstance(method, commands.Channel.CloseOk):
            if ch._rpcs:
                ch._on_reply(method, None)
            ch._mark_closed(ChannelClosed("closed by the client"))
            self._release(channel_id)
        elif isinstance(method, commands.Channel.Flow):
            self._push(_method_frame(channel_id, commands.Channel.FlowOk(active=method.active)))
        else:
            ch._on_reply(method, method)

    # -- handshake

    async def _read_method(self) -> _PamqpMethod:
        """Read the next method frame on channel 0 (handshake only)."""
        buf = self._inbuf
        while True:
            if len(buf) >= 8 and buf[:4] == b"AMQP":
                raise ConnectError(
                    f"cannot connect to {self._params.display}: the server does not "
                    "speak AMQP 0-9-1"
                )
            if len(buf) >= 7:
                ftype, _ch, size = _frame_head.unpack_from(buf)
                if len(buf) >= 8 + size:
                    frame = bytes(buf[: 8 + size])
                    del buf[: 8 + size]
                    if ftype == _FRAME_HEARTBEAT:
                        continue
                    value = pframe.unmarshal(frame)[2]
                    if not isinstance(value, _PamqpMethod):
                        raise _ProtocolError(f"unexpected {type(value).__name__} frame")
                    return value
            chunk = await self._stream.receive_some(_RECEIVE_SIZE)
            if not chunk:
                raise _EOF
            buf += chunk

    async def _handshake(self) -> None:
        params = self._params
        display = params.display
        await self._stream.send_all(ProtocolHeader().marshal())
        try:
            start = await self._read_method()
        except _EOF:
            raise ConnectError(
                f"cannot connect to {display}: the server closed the socket (not an AMQP broker?)"
            ) from None
        if not isinstance(start, commands.Connection.Start):
            raise _ProtocolError(f"expected connection.start, got {start.name}")
        mechanisms = start.mechanisms.split()
        if "PLAIN" not in mechanisms:
            raise ConnectError(
                f"cannot connect to {display}: the broker does not offer PLAIN "
                f"authentication (offers {start.mechanisms})"
            )
        try:
            f"{params.user}{params.password}".encode()
        except UnicodeEncodeError:
            # Checked here: the codec's error would quote the whole PLAIN
            # response, password included.
            raise AuthenticationError(
                f"cannot connect to {display}: the user name or password is not valid "
                "UTF-8 text (read from bytes in another encoding?)"
            ) from None
        client_properties: dict[str, Any] = {
            "product": "asyncworker",
            "version": _VERSION,
            "platform": f"Python {platform.python_version()}",
            "information": "https://github.com/asyncworker",
            "connection_name": params.client_name,
            "capabilities": dict(_CAPABILITIES),
        }
        await self._stream.send_all(
            _method_frame(
                0,
                commands.Connection.StartOk(
                    client_properties=client_properties,
                    mechanism="PLAIN",
                    response=f"\0{params.user}\0{params.password}",
                    locale="en_US",
                ),
            )
        )
        try:
            tune = await self._read_method()
        except (_EOF, trio.BrokenResourceError, OSError):
            # Brokers without authentication_failure_close just drop the socket.
            raise AuthenticationError(
                f"cannot connect to {display}: the broker closed the connection during "
                "authentication (wrong user or password?)"
            ) from None
        if isinstance(tune, commands.Connection.Close):
            await self._send_close_ok()
            if tune.reply_code == 403:
                raise AuthenticationError(
                    f"cannot connect to {display}: access refused for user "
                    f"{params.user!r} (wrong user or password?)"
                )
            raise ConnectError(
                f"cannot connect to {display}: {tune.reply_text} ({tune.reply_code})"
            )
        if not isinstance(tune, commands.Connection.Tune):
            raise _ProtocolError(f"expected connection.tune, got {tune.name}")
        self._frame_max = _negotiate(params.frame_max, tune.frame_max)
        self._channel_max = _negotiate(2047, tune.channel_max)
        # heartbeat=0 asks for none: the broker's proposal is only an upper bound.
        self._heartbeat = (
            0 if params.heartbeat == 0 else _negotiate(params.heartbeat, tune.heartbeat)
        )
        await self._stream.send_all(
            _method_frame(
                0,
                commands.Connection.TuneOk(
                    channel_max=self._channel_max,
                    frame_max=self._frame_max,
                    heartbeat=self._heartbeat,
                ),
            )
            + _method_frame(0, commands.Connection.Open(virtual_host=params.vhost))
        )
        try:
            opened = await self._read_method()
        except _EOF:
            raise ConnectError(
                f"cannot connect to {display}: the broker closed the socket while opening the vhost"
            ) from None
        if isinstance(opened, commands.Connection.Close):
            await self._send_close_ok()
            if opened.reply_code == 530:
                raise ConnectError(
                    f"cannot connect to {display}: vhost {params.vhost!r} does not exist or "
                    f"user {params.user!r} has no access to it ({opened.reply_text})"
                )
            if opened.reply_code == 403:
                raise AuthenticationError(f"cannot connect to {display}: {opened.reply_text}")
            raise ConnectError(
                f"cannot connect to {display}: {opened.reply_text} ({opened.reply_code})"
            )
        if not isinstance(opened, commands.Connection.OpenOk):
            raise _ProtocolError(f"expected connection.open-ok, got {opened.name}")
        now = trio.current_time()
        self._last_recv = self._last_send = now

    async def _send_close_ok(self) -> None:
        with trio.move_on_after(1):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stream.send_all(_method_frame(0, commands.Connection.CloseOk()))

    async def _run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with trio.CancelScope() as scope:
                self._bg_scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._writer)
                    if self._heartbeat:
                        nursery.start_soon(self._heartbeater)
                    task_status.started()
        finally:
            if self._reason is None:
                self._fail(ConnectionClosed("connection shut down"))
            # Release the socket as soon as the connection is dead, not only
            # when the caller leaves the context.
            await trio.aclose_forcefully(self._stream)


def _negotiate(ours: int, theirs: int) -> int:
    """The smaller of two limits, where 0 means "no limit"."""
    if ours and theirs:
        return min(ours, theirs)
    return ours or theirs


def _parse_deliver(data: bytes, p: int) -> tuple[Any, ...]:
    """Decode the arguments of a basic.deliver method starting at ``p``."""
    n = data[p]
    consumer_tag = data[p + 1 : p + 1 + n].decode("utf-8", "replace")
    p += 1 + n
    delivery_tag, redelivered = _deliver_mid.unpack_from(data, p)
    p += 9
    n = data[p]
    exchange = data[p + 1 : p + 1 + n].decode("utf-8", "replace")
    p += 1 + n
    n = data[p]
    routing_key = data[p + 1 : p + 1 + n].decode("utf-8", "replace")
    return (_DELIVER, consumer_tag, delivery_tag, bool(redelivered & 1), exchange, routing_key)


def _lost(exc: BaseException) -> ConnectionClosed:
    cause = exc.__cause__ or exc
    err = ConnectionClosed(f"connection lost: {cause}")
    err.__cause__ = exc
    return err


# --------------------------------------------------------------------------
# Opening


async def _open_stream(params: ConnectionParams) -> trio.abc.Stream:
    if params.ssl is not None:
        return await trio.open_ssl_over_tcp_stream(params.host, params.port, ssl_context=params.ssl)
    return await trio.open_tcp_stream(params.host, params.port)


def _os_reason(exc: BaseException) -> str:
    """Why a TCP connection failed, in words (trio's open_tcp_stream wraps the
    errors of each address it tried in one OSError)."""
    causes = [exc]
    if isinstance(exc.__cause__, BaseExceptionGroup):
        causes = list(exc.__cause__.exceptions)
    if all(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return "connection refused (is the broker running, and on this port?)"
    first = causes[0]
    if isinstance(first, OSError) and first.strerror:
        return first.strerror.lower()
    return repr(first)


@asynccontextmanager
async def _connect(params: ConnectionParams) -> AsyncIterator[AMQPConnection]:
    display = params.display
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(params.connect_timeout):
            stream = await _open_stream(params)
            conn = AMQPConnection(params, stream)
            await conn._handshake()
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, ConnectError):
            raise
        if isinstance(exc, trio.TooSlowError):
            raise ConnectError(
                f"cannot connect to {display}: timed out after {params.connect_timeout} s"
            ) from None
        if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
            reason = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            raise ConnectError(f"cannot connect to {display}: {_os_reason(reason or exc)}") from exc
        if isinstance(exc, _EOF):
            raise ConnectError(
                f"cannot connect to {display}: the server closed the socket"
            ) from None
        if isinstance(exc, Exception):
            raise ConnectError(f"cannot connect to {display}: {exc!r}") from exc
        raise
    log.debug(
        "%s: connected (frame_max %d, heartbeat %d s)", display, conn._frame_max, conn._heartbeat
    )
    body_exc: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(conn._run_background)
        try:
            yield conn
        except BaseException as exc:
            # Re-raised outside the nursery, so that an error of the caller's
            # code is not wrapped in an ExceptionGroup.
            body_exc = exc
        try:
            await conn.aclose()
        finally:
            nursery.cancel_scope.cancel()
    if body_exc is not None:
        try:
            raise body_exc
        finally:
            body_exc = None


def connect(params: ConnectionParams) -> AbstractAsyncContextManager[AMQPConnection]:
    """Open an AMQP connection; leaving the context closes it.

    Raises ``ConnectError`` (``AuthenticationError`` for refused credentials)
    naming the host, port and vhost, never the password.
    """
    return _connect(params)


if TYPE_CHECKING:

    def _implements(conn: AMQPConnection, ch: AMQPChannel) -> tuple[Connection, Channel]:
        return conn, ch
