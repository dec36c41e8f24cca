"""Pipeline runner for ``faststream[rabbit]==0.7.*``: subscriber on A, publisher to B.

Runs in ``bench/.venvs/faststream``.  ``@broker.subscriber(A)`` on a channel of
its own (``channel=Channel(prefetch_count=256)``; the broker's default channel
publishes: in a probe this was about 7 % faster than one channel for both); the
handler receives the decoded JSON body and
calls ``await publisher.publish(body)`` on ``broker.publisher(B, persist=True)``
(confirms are on by default); FastStream's default ack policy acks A's message
after the handler returns and rejects it (``requeue=False``: dead-lettered, where A
has a dead-letter exchange) when the handler raises.  The publish is awaited in the
handler rather than left to ``@broker.publisher`` (which publishes the return
value after the handler) so that the measured window ends at a confirmed copy.
A is declared by the harness (with its dead-letter arguments), so the subscriber
uses it as it is (``declare=False``).
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
    url = amqp_url(args)
    broker = RabbitBroker(url, logger=None)  # its default channel publishes
    publisher = broker.publisher(args.out, persist=True)

    @broker.subscriber(
        RabbitQueue(args.queue, durable=True, declare=False),
        channel=Channel(prefetch_count=256),  # a channel of its own for consuming
    )
    async def forward(body: dict[str, Any]) -> None:
        await meter.measured(publisher.publish(body), done.set)

    async with broker:
        await broker.start()
        await done.wait()
        await asyncio.sleep(0.05)  # the ack of the last message follows the handler
    meter.report()


asyncio.run(main())
