"""Runner for ``aio-pika==10.*``: ``queue.consume(callback, no_ack=False)``, one ack per message.

Runs in ``bench/.venvs/aio-pika``.  aio-pika (via aiormq) runs each delivery's callback
as its own asyncio task, so up to ``prefetch_count`` handlers run concurrently.
"""

from __future__ import annotations

import asyncio

import aio_pika
from _common import Meter, amqp_url, parse_args

args = parse_args("aio-pika")
meter = Meter(args)


async def main() -> None:
    done = asyncio.Event()
    delay = args.delay
    want_latency = args.latency
    url = amqp_url(args)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(args.queue, durable=True, passive=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            meter.enter(message.body if want_latency else None)
            if delay:
                await asyncio.sleep(delay)
            finished = meter.leave()
            await message.ack()
            if finished:
                done.set()

        tag = await queue.consume(on_message, no_ack=False)
        await done.wait()
        await queue.cancel(tag)
    meter.report()


asyncio.run(main())
