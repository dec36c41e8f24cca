"""Pipeline runner for ``aio-pika==10.*``: consume A, publish to B with confirm, then ack A.

Runs in ``bench/.venvs/aio-pika``.  One channel with ``set_qos(256)`` consumes A;
a second one (with publisher confirms, aio-pika's default) publishes to B through
its default exchange (in a probe, publishing on the consuming channel reached
about 0.6x the msg/s of two channels, at 1.6x the CPU per message); the callback
runs ``async with message.process():``, which acks A's message when the
block ends and rejects it (``requeue=False``: dead-lettered, where A has a
dead-letter exchange) when the publish raises (a nack raises ``DeliveryError``).
"""

from __future__ import annotations

import asyncio

import aio_pika
from _common import Meter, amqp_url, parse_args

args = parse_args("aio-pika")
meter = Meter(args)


async def main() -> None:
    done = asyncio.Event()
    url = amqp_url(args)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(args.queue, durable=True, passive=True)
        publishing = await connection.channel()  # confirms; see the module docstring
        exchange = publishing.default_exchange
        out = args.out

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            copy = aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            async with message.process():
                await meter.measured(exchange.publish(copy, routing_key=out), done.set)

        tag = await queue.consume(on_message, no_ack=False)
        await done.wait()
        await queue.cancel(tag)
        await asyncio.sleep(0.05)  # the acks of the last messages follow their callbacks
    meter.report()


asyncio.run(main())
