"""Runner for ``async-amqp==0.5.5`` under bare trio (no framework on top).

Runs in ``bench/.venvs/async-amqp``.  ``basic_consume`` with a callback; async-amqp
awaits the callback inline in its reader, so the callback starts one trio task per
delivery (handler, then ``basic_client_ack``) to get the same per-message
concurrency as the other systems.
"""

from __future__ import annotations

from typing import Any

import async_amqp
import trio
from _common import Meter, parse_args

args = parse_args("async-amqp")
meter = Meter(args)


async def main() -> None:
    done = trio.Event()
    delay = args.delay
    want_latency = args.latency
    async with (
        async_amqp.connect_amqp(
            host=args.host,
            port=args.port,
            login=args.user,
            password=args.password,
            virtualhost=args.vhost,
        ) as protocol,
        trio.open_nursery() as nursery,
    ):
        channel = await protocol.channel()
        await channel.basic_qos(prefetch_count=256)

        async def handle(chan: Any, body: bytes, tag: int) -> None:
            meter.enter(body if want_latency else None)
            if delay:
                await trio.sleep(delay)
            finished = meter.leave()
            await chan.basic_client_ack(delivery_tag=tag)
            if finished:
                done.set()

        async def on_message(chan: Any, body: bytes, envelope: Any, properties: Any) -> None:
            nursery.start_soon(handle, chan, body, envelope.delivery_tag)

        await channel.basic_consume(on_message, queue_name=args.queue)
        await done.wait()
        meter.report()
        nursery.cancel_scope.cancel()


trio.run(main)
