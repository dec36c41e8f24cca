"""Publisher runner for ``faststream[rabbit]==0.7.*``: a ``broker.publisher(queue)`` object.

Runs in ``bench/.venvs/faststream``.  FastStream's channels have publisher confirms
on by default (``Channel(publisher_confirms=True)``), so ``await
publisher.publish(body)`` returns once the broker confirmed the message.
``persist=True`` makes the messages persistent; FastStream publishes with
``mandatory=True`` by default (every message here is routable).  ``--inflight K``
asyncio tasks publish one after another.
"""

from __future__ import annotations

import asyncio

from _common import BODY, Meter, amqp_url, parse_args
from faststream.rabbit import RabbitBroker

args = parse_args("faststream")
meter = Meter(args)


async def main() -> None:
    url = amqp_url(args)
    broker = RabbitBroker(url, logger=None)
    publisher = broker.publisher(args.queue, persist=True)
    warm_up = broker.publisher(args.aux, persist=True)
    worker = meter.publisher(lambda: publisher.publish(BODY))

    async with broker:
        await broker.start()
        await warm_up.publish(BODY)
        await asyncio.gather(*(worker() for _ in range(args.inflight)))
    meter.report()


asyncio.run(main())
