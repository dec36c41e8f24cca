"""Publisher runner for ``aio-pika==10.*``: ``exchange.publish`` on a confirm channel.

Runs in ``bench/.venvs/aio-pika``.  ``connection.channel()`` enables publisher
confirms by default, so ``await channel.default_exchange.publish(...)`` returns once
the broker confirmed the message.  ``--inflight K`` asyncio tasks publish one after
another (K publishes awaited at once); messages are persistent.
"""

from __future__ import annotations

import asyncio

import aio_pika
from _common import BODY, Meter, amqp_url, parse_args

args = parse_args("aio-pika")
meter = Meter(args)


async def main() -> None:
    url = amqp_url(args)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()  # publisher_confirms=True by default
        exchange = channel.default_exchange
        queue = args.queue

        def message() -> aio_pika.Message:
            return aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        worker = meter.publisher(lambda: exchange.publish(message(), routing_key=queue))
        await exchange.publish(message(), routing_key=args.aux)  # warm-up
        await asyncio.gather(*(worker() for _ in range(args.inflight)))
    meter.report()


asyncio.run(main())
