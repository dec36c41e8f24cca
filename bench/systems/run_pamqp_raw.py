"""The "ceiling": a minimal hand-written trio consumer on ``pamqp`` over a raw socket.

Runs in ``bench/.venvs/pamqp-raw``.  No framework, no channel abstraction: 64 KiB
reads, ``pamqp.frame.unmarshal`` for every frame, and all acks produced while
handling one read are coalesced into a single send.  With D=0 the handler runs
inline in the reader; with D>0 each message gets its own trio task and a writer task
sends the acks that completed since its last send in one write.
"""

from __future__ import annotations

from typing import Any

import trio
from _common import Meter, parse_args
from pamqp import body as pbody
from pamqp import commands, frame, header

args = parse_args("pamqp-raw")
meter = Meter(args)
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


async def main() -> None:
    done = trio.Event()
    delay = args.delay
    want_latency = args.latency
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
    await stream.send_all(marshal(commands.Basic.Qos(prefetch_count=256), 1))
    await reader.expect(commands.Basic.QosOk)
    await stream.send_all(marshal(commands.Basic.Consume(queue=args.queue), 1))
    await reader.expect(commands.Basic.ConsumeOk)

    pending_acks: list[int] = []
    wake = trio.Event()
    all_handled = False

    async def writer() -> None:
        nonlocal wake
        while True:
            await wake.wait()
            wake = trio.Event()
            if pending_acks:
                tags = pending_acks.copy()
                pending_acks.clear()
                await stream.send_all(b"".join(marshal(commands.Basic.Ack(t), 1) for t in tags))
            if all_handled and not pending_acks:
                done.set()  # only once the last acks are written

    async def slow_handler(body: bytes, tag: int) -> None:
        nonlocal all_handled
        meter.enter(body if want_latency else None)
        await trio.sleep(delay)
        finished = meter.leave()
        pending_acks.append(tag)
        wake.set()
        if finished:
            all_handled = True

    async def consume(nursery: trio.Nursery) -> None:
        tag = 0
        size = 0
        parts: list[bytes] = []
        first = True
        while True:
            if first:  # deliveries that arrived together with Basic.ConsumeOk
                frames, reader.backlog, first = reader.backlog + reader.frames(), [], False
            else:
                await reader.fill()
                frames = reader.frames()
            acks: list[bytes] = []
            finished = False
            for value in frames:
                if isinstance(value, commands.Basic.Deliver):
                    tag = value.delivery_tag
                    parts = []
                    continue
                elif isinstance(value, header.ContentHeader):
                    size = value.body_size
                    if size:
                        continue
                    body = b""
                elif isinstance(value, pbody.ContentBody):
                    parts.append(value.value)
                    body = parts[0] if len(parts) == 1 else b"".join(parts)
                    if len(body) < size:
                        continue
                else:
                    continue
                # a complete message
                if delay:
                    nursery.start_soon(slow_handler, body, tag)
                else:
                    meter.enter(body if want_latency else None)
                    finished = meter.leave() or finished
                    acks.append(marshal(commands.Basic.Ack(tag), 1))
            if acks:
                await stream.send_all(b"".join(acks))
            if finished:
                done.set()  # only once the last acks are written

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(consume, nursery)
        await done.wait()
        meter.report()
        nursery.cancel_scope.cancel()
    await stream.aclose()


trio.run(main)
