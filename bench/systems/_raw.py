"""The hand-written pamqp client pieces shared by the "ceiling" runners (``*_pamqp_raw.py``).

Runs in ``bench/.venvs/pamqp-raw`` (pamqp and trio only).  No framework, no channel
abstraction: a frame reader over a trio socket stream, and :func:`open_channel`,
which does the AMQP handshake and opens channel 1.
"""

from __future__ import annotations

import argparse
from typing import Any

import trio
from pamqp import commands, frame, header

FRAME_END = 8  # 7-byte frame header + 1-byte frame-end octet


def marshal(value: Any, channel: int = 0) -> bytes:
    return frame.marshal(value, channel)


class Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.backlog: list[Any] = []  # frames parsed by expect() but not yet used

    def frames(self) -> list[Any]:
        """Every complete frame in the buffer (consumed from it)."""
        out = []
        buf = self.buf
        pos = 0
        n = len(buf)
        while n - pos >= 7:
            size = int.from_bytes(buf[pos + 3 : pos + 7], "big") + FRAME_END
            if n - pos < size:
                break
            _consumed, _ch, value = frame.unmarshal(bytes(buf[pos : pos + size]))
            out.append(value)
            pos += size
        del buf[:pos]
        return out

    async def fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("broker closed the socket")
        self.buf += data

    async def expect(self, kind: type) -> Any:
        while True:
            self.backlog += self.frames()
            while self.backlog:
                value = self.backlog.pop(0)
                if isinstance(value, kind):
                    return value
                if isinstance(value, commands.Connection.Close | commands.Channel.Close):
                    raise RuntimeError(f"broker closed: {value.reply_text}")
            await self.fill()


async def open_channel(args: argparse.Namespace) -> tuple[trio.SocketStream, Reader]:
    """Connect, authenticate, open the vhost and channel 1 (heartbeats off)."""
    stream = await trio.open_tcp_stream(args.host, args.port)
    reader = Reader(stream)
    await stream.send_all(marshal(header.ProtocolHeader()))
    await reader.expect(commands.Connection.Start)
    await stream.send_all(
        marshal(
            commands.Connection.StartOk(
                client_properties={"product": "pamqp-raw-bench"},
                mechanism="PLAIN",
                response=f"\0{args.user}\0{args.password}",
                locale="en_US",
            )
        )
    )
    tune = await reader.expect(commands.Connection.Tune)
    await stream.send_all(
        marshal(commands.Connection.TuneOk(tune.channel_max, min(131072, tune.frame_max), 0))
        + marshal(commands.Connection.Open(virtual_host=args.vhost))
    )
    await reader.expect(commands.Connection.OpenOk)
    await stream.send_all(marshal(commands.Channel.Open(), 1))
    await reader.expect(commands.Channel.OpenOk)
    return stream, reader
