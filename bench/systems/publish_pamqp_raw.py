"""The publishing "ceiling": a hand-written trio publisher on ``pamqp`` over a raw socket.

Runs in ``bench/.venvs/pamqp-raw``, on the pieces of ``_raw.py``.  It costs the
client next to nothing, so its msg/s is the broker's own limit for this publish on
this machine: the frames of the (constant) message are marshalled once, one
``send`` writes every publish the window allows, and one read handles every
``basic.ack`` it holds (RabbitMQ confirms several publishes with ``multiple=True``).
``--inflight K`` is the window: at most K publishes sent and not yet confirmed.
A ``basic.nack`` fails the run.
"""

from __future__ import annotations

from collections import deque

import trio
from _common import BODY, Meter, parse_args
from _raw import marshal, open_channel
from pamqp import body as pbody
from pamqp import commands, header

args = parse_args("pamqp-raw")
meter = Meter(args)


def frames(queue: str) -> bytes:
    props = commands.Basic.Properties(delivery_mode=2)
    return (
        marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1)
        + marshal(header.ContentHeader(0, len(BODY), props), 1)
        + marshal(pbody.ContentBody(BODY), 1)
    )


async def main() -> None:
    stream, reader = await open_channel(args)
    await stream.send_all(marshal(commands.Confirm.Select(), 1))
    await reader.expect(commands.Confirm.SelectOk)
    await stream.send_all(frames(args.aux))  # warm-up, confirmed as delivery tag 1
    await reader.expect(commands.Basic.Ack)

    one = frames(args.queue)
    total, window = args.messages, args.inflight
    sent = 0
    unconfirmed: deque[int] = deque()  # delivery tags sent and not yet confirmed
    tag = 1
    while sent < total or unconfirmed:
        room = min(window - len(unconfirmed), total - sent)
        if room > 0:
            for _ in range(room):
                meter.enter()
                tag += 1
                unconfirmed.append(tag)
            await stream.send_all(one * room)
            sent += room
        await reader.fill()
        for value in reader.frames():
            if isinstance(value, commands.Basic.Ack):
                if value.multiple:
                    while unconfirmed and unconfirmed[0] <= value.delivery_tag:
                        unconfirmed.popleft()
                        meter.leave()
                else:
                    unconfirmed.remove(value.delivery_tag)
                    meter.leave()
            elif isinstance(value, commands.Basic.Nack):
                raise RuntimeError(f"the broker nacked publish {value.delivery_tag}")
            elif isinstance(value, commands.Connection.Close | commands.Channel.Close):
                raise RuntimeError(f"broker closed: {value.reply_text}")
    meter.report()
    await stream.aclose()


trio.run(main)
