"""A small fake AMQP server for tests: plain sockets on 127.0.0.1, one thread per client.

The tests drive what a real broker will not do on demand (cut the socket at
a chosen point of the handshake, send a malformed frame, stall) with a
*script*: a function called with a ``Peer`` for every accepted connection, in
a thread of its own, so that the server answers (or stays silent) whatever
the client's event loop is doing::

    def cut_after_start_ok(peer: Peer) -> None:
        peer.read_protocol_header()
        peer.send_method(0, connection_start())
        peer.read_method()  # connection.start-ok
        peer.close()

    with FakeAMQPServer(cut_after_start_ok) as server:
        ...  # connect to server.port

``Peer`` reads and writes whole frames with pamqp's codec (``read_frame``,
``read_method``, ``send_method``, ``send``) and answers a whole handshake
(``open_connection``).  ``Peer.connect(host, port)``
opens a connection to a real broker as a ``Peer`` too, and ``splice`` joins
two peers: a script can relay the first frames of a connection between the
client and a real broker, tamper with them or cut there, and let the broker
do the rest.  What the
scripts raise is kept in ``FakeAMQPServer.errors`` (a test can assert it is
empty); a script that returns closes its connection.

It is shared by the suite: extend it (more frame helpers, canned
handshakes) rather than writing another one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from pamqp import commands
from pamqp import frame as pframe
from pamqp.base import Frame as PamqpMethod

__all__ = ["FakeAMQPServer", "Peer", "connection_start"]

#: How long a script's read waits before giving up (seconds): a test never hangs on it.
READ_TIMEOUT = 10.0


def connection_start() -> commands.Connection.Start:
    """A ``connection.start`` as RabbitMQ sends it (PLAIN, and the capabilities it honours)."""
    return commands.Connection.Start(
        server_properties={
            "product": "fakeamqp",
            "capabilities": {
                "publisher_confirms": True,
                "basic.nack": True,
                "consumer_cancel_notify": True,
                "connection.blocked": True,
                "authentication_failure_close": True,
            },
        },
        mechanisms="PLAIN AMQPLAIN",
        locales="en_US",
    )


class Peer:
    """One client connection, as a script sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    # -- reading

    def _fill(self, size: int) -> bool:
        """Read until ``size`` bytes are buffered; False at EOF."""
        while len(self._buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read_protocol_header(self) -> bytes:
        """The 8 bytes the client opens with (``AMQP\\x00\\x00\\x09\\x01``)."""
        if not self._fill(8):
            raise EOFError("the client closed before sending the protocol header")
        header = bytes(self._buffer[:8])
        del self._buffer[:8]
        return header

    def read_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame as (type, channel, whole frame bytes), or None at EOF."""
        if not self._fill(7):
            return None
        ftype, channel, size = struct.unpack_from(">BHI", self._buffer)
        if not self._fill(8 + size):
            return None
        frame = bytes(self._buffer[: 8 + size])
        del self._buffer[: 8 + size]
        return ftype, channel, frame

    def read_method(self) -> PamqpMethod:
        """The next method frame's method (heartbeats are skipped); EOFError at EOF."""
        while True:
            read = self.read_frame()
            if read is None:
                raise EOFError("the client closed the connection")
            ftype, _channel, frame = read
            if ftype == 8:  # heartbeat
                continue
            value = pframe.unmarshal(frame)[2]
            if not isinstance(value, PamqpMethod):
                raise AssertionError(f"expected a method frame, got {value!r}")
            return value

    def open_connection(self, *, heartbeat: int = 0) -> None:
        """Answer the client's handshake as a broker does, proposing ``heartbeat``
        seconds; return once ``connection.open-ok`` is sent."""
        self.read_protocol_header()
        self.send_method(0, connection_start())
        self.read_method()  # connection.start-ok
        self.send_method(
            0, commands.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=heartbeat)
        )
        self.read_method()  # connection.tune-ok
        self.read_method()  # connection.open
        self.send_method(0, commands.Connection.OpenOk())

    # -- writing

    def send(self, data: bytes) -> None:
        """Send raw bytes (a malformed frame, half a frame, ...)."""
        self.sock.sendall(data)

    def send_method(self, channel: int, method: PamqpMethod) -> None:
        """Send one method frame."""
        self.sock.sendall(pframe.marshal(method, channel))

    def close(self) -> None:
        """Close the socket (the client sees EOF)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # -- handing over to a real broker

    @classmethod
    def connect(cls, host: str, port: int) -> Peer:
        """A ``Peer`` for a connection *to* ``host:port`` (a real broker), to relay frames to."""
        return cls(socket.create_connection((host, port), timeout=READ_TIMEOUT))

    def splice(self, other: Peer) -> None:
        """Forward everything between this connection and ``other`` until either closes.

        What either side has buffered (read but not consumed) goes first.
        """
        for sock in (self.sock, other.sock):
            sock.settimeout(None)
        other.sock.sendall(bytes(self._buffer))
        self.sock.sendall(bytes(other._buffer))
        self._buffer.clear()
        other._buffer.clear()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(other.sock, self.sock), daemon=True)
        back.start()
        pump(self.sock, other.sock)
        back.join(READ_TIMEOUT)
        other.close()


Script = Callable[[Peer], Any]


class FakeAMQPServer:
    """Accepts connections on 127.0.0.1 and runs ``script(peer)`` for each, in a thread.

    Use it as a context manager; ``port`` is the port it listens on,
    ``connections`` how many it accepted, ``errors`` what the scripts raised
    (EOF and socket errors caused by the client going away included).
    """

    def __init__(self, script: Script) -> None:
        self._script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FakeAMQPServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed = True
        # Wake the acceptor: a connection to ourselves, then the listener closes.
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._acceptor.join(READ_TIMEOUT)
        self._listener.close()
        for thread in self._threads:
            thread.join(READ_TIMEOUT)

    @property
    def url(self) -> str:
        """An ``amqp://`` URL to this server (guest/guest, vhost ``/``)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _accept(self) -> None:
        while True:
            try:
                sock, _address = self._listener.accept()
            except OSError:
                return
            if self._closed:
                sock.close()
                return
            self.connections += 1
            sock.settimeout(READ_TIMEOUT)
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket) -> None:
        peer = Peer(sock)
        try:
            self._script(peer)
        except BaseException as exc:  # reported to the test through `errors`
            self.errors.append(exc)
        finally:
            peer.close()
