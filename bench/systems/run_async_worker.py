"""Runner for the original ``async-worker==0.20.2`` (asyncio + aioamqp).

Runs in ``bench/.venvs/async-worker``.  One route with ``bulk_size=1`` so the handler
receives a one-message list and the message is acked after the handler returns
(async-worker's default ``on_success=ACK``).  Messages are JSON (async-worker's
``JsonQueue`` rejects anything else), which the harness always publishes.
"""

from __future__ import annotations

import asyncio

from _common import Meter, parse_args

args = parse_args("async-worker")
meter = Meter(args)

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)  # async-worker's App() calls asyncio.get_event_loop()

from asyncworker.connections import AMQPConnection  # noqa: E402
from asyncworker.rabbitmq.message import RabbitMQMessage  # noqa: E402
from asyncworker.routes import AMQPRouteOptions  # noqa: E402

from asyncworker import App  # noqa: E402

done = asyncio.Event()
conn = AMQPConnection(
    hostname=args.host,
    port=args.port,
    username=args.user,
    password=args.password,
    prefetch=256,
)
app = App(connections=[conn])
delay = args.delay
want_latency = args.latency


@app.amqp.consume([args.queue], vhost=args.vhost, options=AMQPRouteOptions(bulk_size=1))
async def handler(messages: list[RabbitMQMessage]) -> None:
    for m in messages:
        meter.enter(m.body if want_latency else None)
    if delay:
        await asyncio.sleep(delay)
    for _ in messages:
        if meter.leave():
            done.set()


async def main() -> None:
    await app.startup()
    await done.wait()
    await asyncio.sleep(0.05)  # let the last acks go out
    meter.report()
    await app._on_shutdown.send(app)


loop.run_until_complete(main())
