"""Pipeline runner for the original ``async-worker==0.20.2``: consume A, ``put()`` to B.

Runs in ``bench/.venvs/async-worker``.  One route on A with ``bulk_size=1``
(``AMQPConnection(prefetch=256)``); the handler forwards the decoded JSON body with
``await conn.put(routing_key=B, data=body, properties={"delivery_mode": 2})`` and
async-worker acks A's message after the handler returns.  The original has no
publisher confirms: ``put()`` returns once the frames are written, so a publish the
broker refuses goes unnoticed and A's message is acked anyway (the harness's check
shows it).
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
properties = {"delivery_mode": 2}


@app.amqp.consume([args.queue], vhost=args.vhost, options=AMQPRouteOptions(bulk_size=1))
async def forward(messages: list[RabbitMQMessage]) -> None:
    for m in messages:
        meter.enter()
        try:
            await conn.put(
                routing_key=args.out, data=m.body, properties=properties, vhost=args.vhost
            )
        except Exception:
            if meter.fail():
                done.set()
            raise
        if meter.leave():
            done.set()


async def main() -> None:
    await app.startup()
    await done.wait()
    await asyncio.sleep(0.05)  # let the last acks go out
    meter.report()
    await app._on_shutdown.send(app)


loop.run_until_complete(main())
