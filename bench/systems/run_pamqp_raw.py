"""The "ceiling": a minimal hand-written trio consumer on ``pamqp`` over a raw socket.

Runs in ``bench/.venvs/pamqp-raw``, on the pieces of ``_raw.py``.  No framework, no
channel abstraction: 64 KiB reads, ``pamqp.frame.unmarshal`` for every frame, and
all acks produced while handling one read are coalesced into a single send.  With
D=0 the handler runs inline in the reader; with D>0 each message gets its own trio
task and a writer task sends the acks that completed since its last send in one
write.
"""

from __future__ import annotations

import trio
from _common import Meter, parse_args
from _raw import marshal, open_channel
from pamqp import body as pbody
from pamqp import commands, header

args = parse_args("pamqp-raw")
meter = Meter(args)


# The ceiling is one hand-written loop, its closures inline: splitting it
# into helpers would add calls to the very path it measures.
async def main() -> None:  # noqa: C901
    done = trio.Event()
    delay = args.delay
    want_latency = args.latency
    stream, reader = await open_channel(args)
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
