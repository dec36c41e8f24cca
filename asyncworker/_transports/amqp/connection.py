"""The AMQP connection: reader/writer/heartbeat tasks, ``connect``.

This is the ``amqp://`` / ``amqps://`` implementation of the transport seam
(``asyncworker._transports.base``), a trio-native AMQP 0-9-1 client on
pamqp's codec.  ``connect`` opens the stream and runs the handshake
(``handshake``), then builds the ``AMQPConnection`` from what was negotiated.
One connection runs three background tasks:

* the **reader** receives large chunks and parses every complete frame in
  them.  The hot frames (``basic.deliver``, content header, content body,
  heartbeat, ``basic.ack``) are decoded by hand (``codec``); everything else
  goes through pamqp.  Delivery callbacks are called synchronously from the
  reader, through the ``AMQPChannel`` (``channel``) the frame is for.
* the **writer** sends everything queued since its last wake-up in one
  ``send_all``.  Callers never write to the socket: they append already
  marshalled frames to ``out`` and wake the writer, so an ``ack`` costs a
  ``struct.pack`` and a list append, and a burst of acks becomes one write.
* the **heartbeater** (only if a heartbeat was negotiated) sends heartbeats
  when the connection is idle and declares it dead when the broker has been
  silent for 1.5 intervals, unless bytes wait unread in the socket: then
  this process was blocked, not the broker.

Background tasks never raise: a failure is recorded as the connection's
``close_reason``, every channel is marked closed with it, and everything that
waits is woken up.

The names the reader's per-frame loop uses (frame types, decoders, and the
struct methods ``codec`` exports already bound, see there why) are imported
into this module's globals, so that moving them to ``codec`` added no
attribute lookup per frame.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio
from pamqp import commands
from pamqp import frame as pframe
from pamqp.base import Frame as _PamqpMethod
from pamqp.constants import (
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    REPLY_SUCCESS,
)

from ..._exceptions import ChannelClosed, ConnectError, ConnectionClosed
from ..base import CloseOnce, fresh
from ..params import ConnectionParams
from .channel import HIGH_WATER, AMQPChannel
from .codec import (
    BASIC_ACK,
    BASIC_DELIVER,
    HEARTBEAT_FRAME,
    ProtocolError,
    decode_properties,
    method_frame,
    parse_deliver,
    unpack_content_head,
    unpack_frame_head,
    unpack_u32,
    unpack_u64_bits,
)
from .handshake import EOF, Tuned, handshake, open_stream, os_reason

if TYPE_CHECKING:
    from ..base import Connection

__all__ = ["AMQPConnection", "connect"]

log = logging.getLogger("asyncworker.amqp")

#: How many bytes the reader asks for per ``receive_some``.  Large enough to
#: hold hundreds of small deliveries, small enough to stay below glibc's mmap
#: threshold so that every receive is a cheap heap allocation.
_RECEIVE_SIZE: Final = 65536
#: Successful reads in a row before the reader yields to the other tasks.
_READS_BEFORE_YIELD: Final = 4
#: A read shorter than this means the socket was (almost surely) emptied.
_SMALL_READ: Final = 16384
#: How long leaving the connection waits for ``connection.close-ok``.
_CLOSE_TIMEOUT: Final = 3.0


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """An ``AMQPConnection``'s channels, from ``AMQPConnection.statistics()``."""

    #: The numbers of the channels in use (open, or closing until close-ok), ascending.
    channels: tuple[int, ...]


class AMQPConnection(CloseOnce):
    """A connection to one vhost of an AMQP 0-9-1 broker (implements ``Connection``).

    Created by :func:`connect`; not meant to be instantiated directly.
    """

    _closed_error = ConnectionClosed
    _what = "connection"

    def __init__(self, params: ConnectionParams, stream: trio.abc.Stream, tuned: Tuned) -> None:
        super().__init__()
        self._params = params
        self._stream = stream
        # On plain TCP the reader and writer use the socket's file descriptor
        # directly (see _receive/_send_all): trio's stream methods add a
        # scheduler pass to every successful call, which at moderate message
        # rates is a large part of the cost of a message.  TLS uses the stream.
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        # The socket under TLS too: the heartbeater looks for unread bytes in it.
        self._socket_fd = self.fd
        if isinstance(stream, trio.SSLStream) and isinstance(
            stream.transport_stream, trio.SocketStream
        ):
            self._socket_fd = stream.transport_stream.socket.fileno()
        self._reads_in_a_row = 0
        self._read_was_small = False
        self._frame_max = tuned.frame_max
        self._channel_max = tuned.channel_max
        self._heartbeat = tuned.heartbeat
        self._channels: dict[int, AMQPChannel] = {}
        self._consumer_seq = 0
        self._close_ok = trio.Event()
        self._bg_scope: trio.CancelScope | None = None
        #: Set while the broker has blocked publishing (connection.blocked).
        self.blocked: str | None = None
        # Outgoing frames and the writer's wake-up event (None while it runs).
        self.out: list[bytes | memoryview] = []
        self.out_size = 0  # only maintained for publishes (back-pressure)
        self.wake: trio.Event | None = None
        self._drained: trio.Event | None = None
        # trio.current_time() without its layers of indirection (on the hot path).
        self.now = trio.lowlevel.current_clock().current_time
        self.last_send = self._last_recv = self.now()
        self._leftover = tuned.leftover  # what the handshake read past open-ok

    def __repr__(self) -> str:
        return f"<AMQPConnection {self._params.display} {self._state()}>"

    # -- state

    @property
    def params(self) -> ConnectionParams:
        """The parameters this connection was opened with."""
        return self._params

    @property
    def frame_max(self) -> int:
        """The negotiated maximum frame size."""
        return self._frame_max

    @property
    def heartbeat(self) -> int:
        """The negotiated heartbeat interval in seconds (0: none)."""
        return self._heartbeat

    def statistics(self) -> ConnectionStatistics:
        """The channel numbers in use, as of now."""
        return ConnectionStatistics(tuple(sorted(self._channels)))

    def _fail(self, reason: BaseException, *, grace: float = 0.0) -> None:
        """Mark the connection and its channels closed and stop the background.

        The first reason wins.  ``grace`` leaves the writer that long to flush
        (e.g. a close-ok); each call may shorten the background's deadline.
        """
        if self.mark_closed(reason) and not self._closing:
            log.warning("%s: %s", self._params.display, reason)
        if self._bg_scope is not None:
            if grace:
                self._bg_scope.deadline = min(self._bg_scope.deadline, trio.current_time() + grace)
            else:
                self._bg_scope.cancel()

    def _on_closed(self, reason: BaseException) -> None:
        """Close every channel with ``reason`` and wake every task that waits."""
        for channel in list(self._channels.values()):
            channel.mark_closed(reason)
        self._close_ok.set()
        if self.wake is not None:
            self.wake_writer()
        if self._drained is not None:
            self._drained.set()

    # -- channels

    async def channel(self) -> AMQPChannel:
        """Open a new channel."""
        self.check_open()
        channel_id = 1
        while channel_id in self._channels:
            channel_id += 1
        if channel_id > self._channel_max:
            raise ChannelClosed(f"no free channel number (channel_max is {self._channel_max})")
        ch = AMQPChannel(self, channel_id)
        self._channels[channel_id] = ch
        # Sent at once (a new channel has no other request to wait for), so
        # that an opener cancelled from here on knows channel.open went out.
        rpc = ch.request(
            method_frame(channel_id, commands.Channel.Open()), (commands.Channel.OpenOk,)
        )
        try:
            await rpc.event.wait()
        except BaseException:
            # Given up (cancelled): the broker opens the channel anyway, or
            # already has.  Close it right behind the open; its close-ok
            # frees the number.
            ch.abandon()
            raise
        if rpc.error is not None:
            raise fresh(rpc.error)
        return ch

    def release(self, channel_id: int) -> None:
        self._channels.pop(channel_id, None)

    def new_consumer_tag(self, channel_id: int) -> str:
        self._consumer_seq += 1
        return f"asyncworker.{channel_id}.{self._consumer_seq}"

    # -- closing

    async def aclose(self) -> None:
        """Close the connection (``connection.close``), waiting a few seconds at most."""
        if self._reason is None and not self._closing:
            self._closing = True
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                self.push(
                    method_frame(
                        0,
                        commands.Connection.Close(
                            reply_code=REPLY_SUCCESS,
                            reply_text="Normal shutdown",
                            class_id=0,
                            method_id=0,
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

    def wake_writer(self) -> None:
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake.set()

    def push(self, frame: bytes) -> None:
        self.out.append(frame)
        if self.wake is not None:
            self.wake_writer()

    def push_many(self, frames: list[bytes | memoryview]) -> None:
        # One extend: the frames of one message are never interleaved with
        # another message's (every frame of the list goes out in one write).
        self.out.extend(frames)
        self.out_size += sum(map(len, frames))
        if self.wake is not None:
            self.wake_writer()

    async def wait_drained(self) -> None:
        while self.out_size > HIGH_WATER and self._reason is None:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    async def _send_all(self, data: bytes | memoryview) -> None:
        fd = self.fd
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
        fd = self.fd
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
                if not self.out:
                    if self._reason is not None:
                        return
                    wake = self.wake = trio.Event()
                    await wake.wait()
                    continue
                out = self.out
                self.out = []
                data = b"".join(out) if len(out) > 1 else out[0]
                await self._send_all(data)
                self.last_send = self.now()
                if self.out_size:
                    self.out_size = 0 if not self.out else sum(map(len, self.out))
                    if self._drained is not None and self.out_size <= HIGH_WATER:
                        self._drained.set()
                        self._drained = None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(_lost(exc))
        except Exception as exc:
            log.exception("%s: writer failed", self._params.display)
            self._fail(ConnectionClosed(f"writer failed: {exc!r}"))

    # -- heartbeats

    async def _heartbeater(self) -> None:
        # RabbitMQ looks every half interval whether it sent anything since it
        # last looked, and sends a heartbeat if not: a healthy broker is silent
        # for up to one interval.  Half an interval more is the margin for a
        # busy broker (the old rule, two intervals, noticed a hung node late).
        interval = self._heartbeat / 2
        dead_after = self._heartbeat * 1.5
        try:
            while self._reason is None:
                now = trio.current_time()
                if now - self._last_recv > dead_after:
                    if _readable(self._socket_fd):
                        # Bytes wait in the socket, unread: the broker spoke and
                        # this process did not listen (a handler blocked the event
                        # loop longer than the interval).  The reader reads them
                        # as soon as it runs; count from now.
                        self._last_recv = now
                        continue
                    self._fail(
                        ConnectionClosed(
                            f"missed heartbeats: nothing received from the broker for "
                            f"{dead_after:g} s (heartbeat {self._heartbeat} s)"
                        )
                    )
                    return
                if now - self.last_send >= interval:
                    self.push(HEARTBEAT_FRAME)
                    self.last_send = now  # do not queue another before the writer ran
                wake_at = min(self.last_send + interval, self._last_recv + dead_after + 0.01)
                with trio.move_on_at(wake_at):
                    await self._closed_event.wait()
        except Exception as exc:  # pragma: no cover - defensive
            log.exception("%s: heartbeat task failed", self._params.display)
            self._fail(ConnectionClosed(f"heartbeat task failed: {exc!r}"))

    # -- reading

    async def _reader(self) -> None:
        data = self._leftover  # whatever the handshake read past open-ok
        self._leftover = b""
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
                            need = 8 + unpack_frame_head(leftover)[2] - len(leftover)
                chunk = await self._receive(max(_RECEIVE_SIZE, need))
                if not chunk:
                    raise EOF
                self._last_recv = self.now()
                data = leftover + chunk if leftover else chunk
        except EOF:
            self._fail(ConnectionClosed("connection lost: the broker closed the socket"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(_lost(exc))
        except Exception as exc:
            log.exception("%s: protocol error", self._params.display)
            self._fail(ConnectionClosed(f"protocol error: {exc!r}"))

    # One flat loop on purpose: a helper call per frame kind would add a
    # Python call to every frame of the hottest path (see bench/README.md).
    def _process(self, data: bytes) -> int:  # noqa: C901
        """Handle every complete frame in ``data``; return the bytes consumed."""
        n = len(data)
        pos = 0
        channels = self._channels
        unpack_head = unpack_frame_head  # locals: read per frame
        unpack_index = unpack_u32
        while n - pos >= 8:
            ftype, channel_id, size = unpack_head(data, pos)
            end = pos + 7 + size
            if end >= n:
                break
            if data[end] != FRAME_END:
                raise ProtocolError(f"bad frame end octet {data[end]:#x}")
            start = pos + 7
            pos = end + 1
            if ftype == FRAME_METHOD:
                index = unpack_index(data, start)[0]
                if index == BASIC_DELIVER:
                    ch = channels.get(channel_id)
                    if ch is None:
                        continue
                    content = parse_deliver(data, start + 4)
                    # Fast path: the content header and a single body frame
                    # follow in this buffer (the usual case for small
                    # messages): decode all three at once, without storing
                    # per-channel assembly state.
                    if n - pos >= 30:
                        htype, hch, hsize = unpack_head(data, pos)
                        hend = pos + 7 + hsize
                        if htype == FRAME_HEADER and hch == channel_id and hend + 8 < n:
                            _c, _w, body_size, flags = unpack_content_head(data, pos + 7)
                            btype, bch, bsize = unpack_head(data, hend + 1)
                            bend = hend + 8 + bsize
                            if (
                                btype == FRAME_BODY
                                and bch == channel_id
                                and bsize == body_size
                                and bend < n
                                and not flags & 1
                                and data[hend] == FRAME_END
                                and data[bend] == FRAME_END
                            ):
                                ch.deliver(
                                    content,
                                    data[hend + 8 : bend],
                                    decode_properties(data, pos + 21, flags),
                                )
                                pos = bend + 1
                                continue
                    ch.start_content(content)
                elif index == BASIC_ACK:
                    ch = channels.get(channel_id)
                    if ch is not None:
                        tag, bits = unpack_u64_bits(data, start + 4)
                        ch.on_confirm(tag, bool(bits & 1), False)
                else:
                    method = pframe.unmarshal(data[start - 7 : end + 1])[2]
                    assert isinstance(method, _PamqpMethod)
                    if channel_id == 0:
                        self._on_connection_method(method)
                    else:
                        self._on_channel_method(channel_id, method)
            elif ftype == FRAME_BODY:
                ch = channels.get(channel_id)
                if ch is not None:
                    ch.on_body(data, start, end)
            elif ftype == FRAME_HEADER:
                ch = channels.get(channel_id)
                if ch is not None:
                    ch.on_header(data, start)
            elif ftype != FRAME_HEARTBEAT:
                raise ProtocolError(f"unknown frame type {ftype}")
        return pos

    def _on_connection_method(self, method: _PamqpMethod) -> None:
        if isinstance(method, commands.Connection.Close):
            self.push(method_frame(0, commands.Connection.CloseOk()))
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
        ch.on_method(method)

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


def _readable(fd: int) -> bool:
    """Whether bytes (or the end of the stream) wait unread on socket ``fd``; never reads."""
    if fd < 0:
        return False
    try:
        if hasattr(select, "poll"):  # not on Windows; select() is limited to FD_SETSIZE
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):  # closed under us: the reader reports why
        return False


def _lost(exc: BaseException) -> ConnectionClosed:
    cause = exc.__cause__ or exc
    err = ConnectionClosed(f"connection lost: {cause}")
    err.__cause__ = exc
    return err


# --------------------------------------------------------------------------
# Opening


@asynccontextmanager
async def _connect(params: ConnectionParams) -> AsyncIterator[AMQPConnection]:
    display = params.display
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(params.connect_timeout):
            stream = await open_stream(params)
            conn = AMQPConnection(params, stream, await handshake(stream, params))
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
            raise ConnectError(f"cannot connect to {display}: {os_reason(reason or exc)}") from exc
        if isinstance(exc, EOF):
            raise ConnectError(
                f"cannot connect to {display}: the server closed the socket"
            ) from None
        if isinstance(exc, Exception):
            raise ConnectError(f"cannot connect to {display}: {exc!r}") from exc
        raise
    log.debug(
        "%s: connected (frame_max %d, heartbeat %d s)", display, conn.frame_max, conn.heartbeat
    )
    body_exc: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(conn._run_background)  # noqa: SLF001 — connect() is its constructor
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

    def _implements(conn: AMQPConnection) -> Connection:
        return conn
