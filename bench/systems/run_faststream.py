"""Runner for ``faststream[rabbit]==0.7.*``: one subscriber, default ack policy.

Runs in ``bench/.venvs/faststream``.  The channel gets ``prefetch_count=256``.
FastStream's own per-message INFO logging is switched off (``logger=None``) so the
run measures the framework, not a log line per message written to a pipe.
"""

from __future__ import annotations

import asyncio
from typing import Any

from _common import Meter, amqp_url, parse_args
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

args = parse_args("faststream")
meter = Meter(args)


async def main() -> None:
    done = asyncio.Event()
    delay = args.delay
    want_latency = args.latency
    url = amqp_url(args)
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=256), logger=None)

    @broker.subscriber(RabbitQueue(args.queue, durable=True))
    async def handle(body: dict[str, Any]) -> None:
        meter.enter(body if want_latency else None)
        if delay:
            await asyncio.sleep(delay)
        if meter.leave():
            done.set()

    async with broker:
        await broker.start()
        await done.wait()
        await asyncio.sleep(0.05)  # the ack of the last message follows the handler
    meter.report()


asyncio.run(main())
