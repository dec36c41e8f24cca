"""The AMQP 0-9-1 wire format: frames, field tables and content properties.

Pure functions and constants, no I/O and no state: ``connection`` and
``channel`` build every frame they send with these, and decode the hot
incoming frames (``basic.deliver``, content header and body, ``basic.ack``)
with them.  Everything else is encoded and decoded by pamqp, whose frame
types and frame-end octet (``pamqp.constants``) and method indexes
(``pamqp.commands``) are used rather than copies of our own.

Field tables and properties are ours rather than pamqp's: see
``field_table`` and ``decode_table`` for the pamqp 3.3 bugs they avoid.  A
value that cannot be encoded raises before anything is sent; what a foreign
publisher sends is decoded without ever failing the connection.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import struct
from collections.abc import Mapping
from typing import Any, Final

from pamqp import commands
from pamqp import frame as pframe
from pamqp.base import Frame as _PamqpMethod
from pamqp.constants import (
    FRAME_BODY,
    FRAME_END,
    FRAME_END_CHAR,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    REPLY_SUCCESS,
)

from ..base import Properties

__all__ = [
    "BASIC_ACK",
    "BASIC_CONSUME",
    "BASIC_DELIVER",
    "BASIC_NACK",
    "BASIC_REJECT",
    "DELIVER",
    "EXCHANGE_DECLARE",
    "GET_OK",
    "HEARTBEAT_FRAME",
    "QUEUE_BIND",
    "QUEUE_DECLARE",
    "QUEUE_UNBIND",
    "RETURN",
    "ProtocolError",
    "arguments_frame",
    "close_frame",
    "decode_properties",
    "decode_table",
    "encode_properties",
    "encode_publish",
    "field_table",
    "method_frame",
    "pack_settle",
    "parse_deliver",
    "unpack_content_head",
    "unpack_frame_head",
    "unpack_u16",
    "unpack_u32",
    "unpack_u64_bits",
]

log = logging.getLogger("asyncworker.amqp")

# Method indexes (class_id << 16 | method_id) of the hand-coded methods.
BASIC_DELIVER: Final[int] = commands.Basic.Deliver.index
BASIC_ACK: Final[int] = commands.Basic.Ack.index
BASIC_REJECT: Final[int] = commands.Basic.Reject.index
BASIC_NACK: Final[int] = commands.Basic.Nack.index
BASIC_CONSUME: Final[int] = commands.Basic.Consume.index
QUEUE_DECLARE: Final[int] = commands.Queue.Declare.index
QUEUE_BIND: Final[int] = commands.Queue.Bind.index
QUEUE_UNBIND: Final[int] = commands.Queue.Unbind.index
EXCHANGE_DECLARE: Final[int] = commands.Exchange.Declare.index

frame_head = struct.Struct(">BHI")
u32 = struct.Struct(">I")
u8 = struct.Struct(">B")
u16 = struct.Struct(">H")
deliver_mid = struct.Struct(">QB")  # delivery-tag, redelivered
content_head = struct.Struct(">HHQH")  # class-id, weight, body-size, property flags
u64_bits = struct.Struct(">QB")  # basic.ack: delivery-tag, multiple
#: A complete settlement frame: basic.ack, basic.reject and basic.nack all
#: carry a 64-bit delivery tag and one octet of bits (13 payload bytes).
settle_frame = struct.Struct(">BHIIQBB")
content_frame_head = struct.Struct(">BHIHHQ")  # frame head + class, weight, body size

# The struct methods ``channel`` and ``connection`` call per frame, bound here.
# CPython 3.11 compiles ``name.method(...)`` as an attribute load and a call,
# not as a method call, when ``name`` was imported (``from .codec import
# settle_frame``): that costs a bound-method object per call, about 0.1 us
# per ack.  A bound method imported as a plain name is called directly.
pack_settle = settle_frame.pack
unpack_frame_head = frame_head.unpack_from
unpack_u32 = u32.unpack_from
unpack_u16 = u16.unpack_from
unpack_content_head = content_head.unpack_from
unpack_u64_bits = u64_bits.unpack_from
HEARTBEAT_FRAME: Final = bytes((FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END))

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

# Kinds of content a channel can be assembling (what the method frame was).
DELIVER: Final = 0
GET_OK: Final = 1
RETURN: Final = 2


class ProtocolError(Exception):
    """The broker sent something this client cannot make sense of."""


# --------------------------------------------------------------------------
# Encoding


def method_frame(channel_id: int, method: _PamqpMethod) -> bytes:
    return pframe.marshal(method, channel_id)


def arguments_frame(
    channel_id: int,
    index: int,
    names: tuple[str, ...],
    flags: tuple[bool, ...],
    arguments: Mapping[str, Any] | None,
) -> bytes:
    """A method frame laid out as ``reserved-1 (short), shortstr..., bits, arguments``.

    ``basic.consume``, ``queue.declare``, ``queue.bind``, ``queue.unbind``
    and ``exchange.declare`` all have this layout; ``index`` is
    ``class_id << 16 | method_id``, ``flags`` are the bit fields in the
    spec's order (the first is the lowest bit); ``queue.unbind`` has none,
    and no bits octet is written then.  Encoded here rather than by
    pamqp so that the arguments go through :func:`field_table`: an argument
    that cannot be encoded raises before anything is sent.
    """
    bits = 0
    for i, flag in enumerate(flags):
        bits |= flag << i
    payload = b"".join(
        (
            u32.pack(index),
            b"\x00\x00",  # reserved-1 (ticket)
            *(_shortstr(name) for name in names),
            u8.pack(bits) if flags else b"",
            field_table(arguments or {}),
        )
    )
    return frame_head.pack(FRAME_METHOD, channel_id, len(payload)) + payload + FRAME_END_CHAR


def close_frame(channel_id: int) -> bytes:
    """``channel.close`` for a normal shutdown."""
    return method_frame(
        channel_id,
        commands.Channel.Close(
            reply_code=REPLY_SUCCESS, reply_text="Normal shutdown", class_id=0, method_id=0
        ),
    )


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return u8.pack(len(raw)) + raw


_i32 = struct.Struct(">i")
_i64 = struct.Struct(">q")
_u64 = struct.Struct(">Q")
_f64 = struct.Struct(">d")


def field_table(table: Mapping[str, Any]) -> bytes:
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
    return u32.pack(len(raw)) + raw


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
        return b"S" + u32.pack(len(raw)) + raw
    if isinstance(value, float):
        return b"d" + _f64.pack(value)
    if isinstance(value, decimal.Decimal):
        return b"D" + _decimal(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"x" + u32.pack(len(value)) + bytes(value)
    if isinstance(value, datetime.datetime):
        return b"T" + _timestamp(value)
    if isinstance(value, Mapping):
        return b"F" + field_table(value)
    if isinstance(value, (list, tuple)):
        raw = b"".join(_field_value(item) for item in value)
        return b"A" + u32.pack(len(raw)) + raw
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
    return u8.pack(scale) + _i32.pack(raw)


def _timestamp(value: datetime.datetime) -> bytes:
    """An AMQP timestamp: unsigned seconds since the epoch (naive datetimes are UTC)."""
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=datetime.UTC)
    seconds = int(value.timestamp())
    if seconds < 0:
        raise TypeError(f"timestamp {value.isoformat()} is before 1970: AMQP cannot encode it")
    return _u64.pack(seconds)


def encode_properties(p: Properties) -> bytes:
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
        parts.append(field_table(p.headers))
    if p.delivery_mode is not None:
        flags |= _P_DELIVERY_MODE
        parts.append(u8.pack(p.delivery_mode))
    if p.priority is not None:
        flags |= _P_PRIORITY
        parts.append(u8.pack(p.priority))
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


_NO_PROPERTIES: Final = b"\x00\x00"


def encode_publish(
    channel_id: int,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: Properties | None,
    mandatory: bool,
    frame_max: int,
) -> list[bytes | memoryview]:
    """The frames of one ``basic.publish``: method, content header, body frames.

    The body is split into frames of at most ``frame_max`` bytes (views of
    ``body``, not copies).  Raises ``ValueError`` if the names are too long
    or the encoded properties do not fit in one frame.
    """
    ex = exchange.encode()
    rk = routing_key.encode()
    if len(ex) > 255 or len(rk) > 255:
        raise ValueError("exchange and routing key must be at most 255 bytes")
    method = b"".join(
        (
            frame_head.pack(FRAME_METHOD, channel_id, 9 + len(ex) + len(rk)),
            b"\x00\x3c\x00\x28\x00\x00",  # basic.publish, reserved-1
            u8.pack(len(ex)),
            ex,
            u8.pack(len(rk)),
            rk,
            b"\x01" if mandatory else b"\x00",
            FRAME_END_CHAR,
        )
    )
    props = _NO_PROPERTIES if properties is None else encode_properties(properties)
    size = len(body)
    header = (
        content_frame_head.pack(FRAME_HEADER, channel_id, 12 + len(props), 60, 0, size)
        + props
        + FRAME_END_CHAR
    )
    if len(header) > frame_max:
        # Properties cannot span frames: the broker would close the whole
        # connection (501 FRAME_ERROR), every consumer on it included.
        raise ValueError(
            f"the message properties take {len(props)} bytes encoded, more than fit "
            f"in one frame (frame_max {frame_max}): move large headers into the body"
        )
    chunk = frame_max - 8
    if size == 0:
        return [method, header]
    if size <= chunk:
        return [
            method,
            header,
            frame_head.pack(FRAME_BODY, channel_id, size),
            body,
            FRAME_END_CHAR,
        ]
    frames: list[bytes | memoryview] = [method, header]
    view = memoryview(body)
    for offset in range(0, size, chunk):
        piece = view[offset : offset + chunk]
        frames.append(frame_head.pack(FRAME_BODY, channel_id, len(piece)))
        frames.append(piece)
        frames.append(FRAME_END_CHAR)
    return frames


# --------------------------------------------------------------------------
# Decoding


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


def decode_table(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """Decode the field table at ``pos``; return it and the position after it.

    Ours rather than pamqp's: pamqp 3.3 reads a decimal's value as unsigned
    (``-1.5`` comes back as ``429496728.1``), re-slices its input at every
    value and fails on timestamps out of datetime's range.
    """
    end = pos + 4 + u32.unpack_from(data, pos)[0]
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
        end = pos + 4 + u32.unpack_from(data, pos)[0]
        raw = data[pos + 4 : end]
        try:
            return raw.decode(), end
        except UnicodeDecodeError:
            return bytes(raw), end
    if kind == 0x74:  # t: boolean
        return data[pos] != 0, pos + 1
    if kind == 0x46:  # F: nested table
        return decode_table(data, pos)
    if kind == 0x41:  # A: array
        end = pos + 4 + u32.unpack_from(data, pos)[0]
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
        end = pos + 4 + u32.unpack_from(data, pos)[0]
        return bytes(data[pos + 4 : end]), end
    if kind == 0x56 or kind == 0:  # V: void (and 0, seen in the wild)
        return None, pos
    raise ProtocolError(f"unknown field value type {kind:#04x} in a table")


# One branch per AMQP property, inline: it runs for every delivered message.
def decode_properties(data: bytes, pos: int, flags: int) -> Properties:  # noqa: C901
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
        size = u32.unpack_from(data, pos)[0]
        try:
            p.headers = decode_table(data, pos)[0]
        except (ProtocolError, struct.error, IndexError) as exc:
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


def parse_deliver(data: bytes, p: int) -> tuple[Any, ...]:
    """Decode the arguments of a basic.deliver method starting at ``p``."""
    n = data[p]
    consumer_tag = data[p + 1 : p + 1 + n].decode("utf-8", "replace")
    p += 1 + n
    delivery_tag, redelivered = deliver_mid.unpack_from(data, p)
    p += 9
    n = data[p]
    exchange = data[p + 1 : p + 1 + n].decode("utf-8", "replace")
    p += 1 + n
    n = data[p]
    routing_key = data[p + 1 : p + 1 + n].decode("utf-8", "replace")
    return (DELIVER, consumer_tag, delivery_tag, bool(redelivered & 1), exchange, routing_key)
