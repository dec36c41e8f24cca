"""Opening an AMQP connection: the TCP (or TLS) stream and the handshake.

``open_stream(params)`` opens the socket; ``handshake(stream, params)`` runs
the AMQP 0-9-1 handshake on it (protocol header, ``start``/``start-ok``,
``tune``/``tune-ok``, ``open``/``open-ok``) and returns what was negotiated
as a ``Tuned`` record, with the bytes it read past ``open-ok``.
``connection.connect`` calls both, then builds the ``AMQPConnection`` from
the record: the connection object never exists half-negotiated.

Every failure here is a ``ConnectError`` naming the host, port and vhost
(``AuthenticationError`` for refused credentials), never the password, or
a ``ProtocolError``/``EOF`` that ``connect`` turns into one.
"""

from __future__ import annotations

import platform
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

import trio
from pamqp import commands
from pamqp import frame as pframe
from pamqp.base import Frame as _PamqpMethod
from pamqp.constants import AMQP, FRAME_HEARTBEAT
from pamqp.exceptions import AMQPAccessRefused, AMQPNotAllowed
from pamqp.header import ProtocolHeader

from ..._exceptions import AuthenticationError, ConnectError
from ..params import ConnectionParams
from .codec import ProtocolError, method_frame, unpack_frame_head

__all__ = ["EOF", "Tuned", "handshake", "negotiate", "open_stream", "os_reason"]

_VERSION: Final = "0.1.0"

#: How many bytes the handshake asks for per ``receive_some``.
_RECEIVE_SIZE: Final = 65536

#: What the client announces in start-ok.  ``authentication_failure_close``
#: makes RabbitMQ refuse credentials with ``connection.close`` 403 instead of
#: dropping the socket: the handshake tells bad credentials (final) from a
#: lost connection (retried) by it.
_CAPABILITIES: Final[dict[str, Any]] = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "exchange_exchange_bindings": True,
}


class EOF(Exception):
    """The socket was closed by the peer."""


@dataclass(frozen=True, slots=True)
class Tuned:
    """What the handshake negotiated, and what it read past ``connection.open-ok``."""

    frame_max: int
    channel_max: int
    #: Seconds (0: no heartbeats).
    heartbeat: int
    #: Bytes received after open-ok: the first frames of the reader.
    leftover: bytes


def negotiate(ours: int, theirs: int) -> int:
    """The smaller of two limits, where 0 means "no limit"."""
    if ours and theirs:
        return min(ours, theirs)
    return ours or theirs


async def open_stream(params: ConnectionParams) -> trio.abc.Stream:
    """The TCP stream to the broker (TLS over it when ``params.ssl`` is set)."""
    if params.ssl is not None:
        return await trio.open_ssl_over_tcp_stream(params.host, params.port, ssl_context=params.ssl)
    return await trio.open_tcp_stream(params.host, params.port)


def os_reason(exc: BaseException) -> str:
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


class _Handshake:
    """One handshake on ``stream``: a read buffer and the steps."""

    def __init__(self, stream: trio.abc.Stream, params: ConnectionParams) -> None:
        self._stream = stream
        self._params = params
        self._buf = bytearray()

    async def read_method(self) -> _PamqpMethod:
        """Read the next method frame on channel 0."""
        buf = self._buf
        while True:
            if len(buf) >= 8 and buf[:4] == AMQP:
                raise ConnectError(
                    f"cannot connect to {self._params.display}: the server does not "
                    "speak AMQP 0-9-1"
                )
            if len(buf) >= 7:
                ftype, _ch, size = unpack_frame_head(buf)
                if len(buf) >= 8 + size:
                    frame = bytes(buf[: 8 + size])
                    del buf[: 8 + size]
                    if ftype == FRAME_HEARTBEAT:
                        continue
                    value = pframe.unmarshal(frame)[2]
                    if not isinstance(value, _PamqpMethod):
                        raise ProtocolError(f"unexpected {type(value).__name__} frame")
                    return value
            chunk = await self._stream.receive_some(_RECEIVE_SIZE)
            if not chunk:
                raise EOF
            buf += chunk

    async def send_close_ok(self) -> None:
        with trio.move_on_after(1):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stream.send_all(method_frame(0, commands.Connection.CloseOk()))

    async def run(self) -> Tuned:
        params = self._params
        display = params.display
        await self._stream.send_all(ProtocolHeader().marshal())
        try:
            start = await self.read_method()
        except EOF:
            raise ConnectError(
                f"cannot connect to {display}: the server closed the socket (not an AMQP broker?)"
            ) from None
        if not isinstance(start, commands.Connection.Start):
            raise ProtocolError(f"expected connection.start, got {start.name}")
        await self._start_ok(start)
        try:
            tune = await self.read_method()
        except (EOF, trio.BrokenResourceError, OSError):
            # We announce authentication_failure_close, so a broker that
            # refuses the credentials says so with connection.close 403
            # (below).  A bare EOF here is the connection lost: a
            # ConnectError, which reconnecting and publishing retry (an
            # AuthenticationError is final).  Only a broker that ignores the
            # capability drops the socket on bad credentials: the hint says so.
            raise ConnectError(
                f"cannot connect to {display}: the connection was lost during "
                "authentication (if this repeats against a broker that does not support "
                "authentication_failure_close, check the user and password)"
            ) from None
        if isinstance(tune, commands.Connection.Close):
            await self.send_close_ok()
            if tune.reply_code == AMQPAccessRefused.value:
                raise AuthenticationError(
                    f"cannot connect to {display}: access refused for user "
                    f"{params.user!r} (wrong user or password?)"
                )
            raise ConnectError(
                f"cannot connect to {display}: {tune.reply_text} ({tune.reply_code})"
            )
        if not isinstance(tune, commands.Connection.Tune):
            raise ProtocolError(f"expected connection.tune, got {tune.name}")
        frame_max = negotiate(params.frame_max, tune.frame_max)
        channel_max = negotiate(params.channel_max, tune.channel_max)
        # heartbeat=0 asks for none: the broker's proposal is only an upper bound.
        heartbeat = 0 if params.heartbeat == 0 else negotiate(params.heartbeat, tune.heartbeat)
        await self._stream.send_all(
            method_frame(
                0,
                commands.Connection.TuneOk(
                    channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat
                ),
            )
            + method_frame(0, commands.Connection.Open(virtual_host=params.vhost))
        )
        await self._open_ok()
        return Tuned(frame_max, channel_max, heartbeat, bytes(self._buf))

    async def _start_ok(self, start: commands.Connection.Start) -> None:
        params = self._params
        display = params.display
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
            method_frame(
                0,
                commands.Connection.StartOk(
                    client_properties=client_properties,
                    mechanism="PLAIN",
                    response=f"\0{params.user}\0{params.password}",
                    locale="en_US",
                ),
            )
        )

    async def _open_ok(self) -> None:
        params = self._params
        display = params.display
        try:
            opened = await self.read_method()
        except EOF:
            raise ConnectError(
                f"cannot connect to {display}: the broker closed the socket while opening the vhost"
            ) from None
        if isinstance(opened, commands.Connection.Close):
            await self.send_close_ok()
            if opened.reply_code == AMQPNotAllowed.value:
                raise ConnectError(
                    f"cannot connect to {display}: vhost {params.vhost!r} does not exist or "
                    f"user {params.user!r} has no access to it ({opened.reply_text})"
                )
            if opened.reply_code == AMQPAccessRefused.value:
                raise AuthenticationError(f"cannot connect to {display}: {opened.reply_text}")
            raise ConnectError(
                f"cannot connect to {display}: {opened.reply_text} ({opened.reply_code})"
            )
        if not isinstance(opened, commands.Connection.OpenOk):
            raise ProtocolError(f"expected connection.open-ok, got {opened.name}")


async def handshake(stream: trio.abc.Stream, params: ConnectionParams) -> Tuned:
    """Run the AMQP handshake on ``stream``; return what was negotiated.

    Raises ``ConnectError`` (``AuthenticationError`` for refused
    credentials), ``ProtocolError`` for a server that answers out of turn,
    and ``EOF`` or the stream's errors for a connection that drops (which
    ``connect`` words as a ``ConnectError``).
    """
    return await _Handshake(stream, params).run()
