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
from _original import PERSISTENT, connection, serve_until  # first: it sets the event loop
from asyncworker.rabbitmq.message import RabbitMQMessage
from asyncworker.routes import AMQPRouteOptions

from asyncworker import App

args = parse_args("async-worker")
meter = Meter(args)
done = asyncio.Event()
conn = connection(args)
app = App(connections=[conn])


@app.amqp.consume([args.queue], vhost=args.vhost, options=AMQPRouteOptions(bulk_size=1))
async def forward(messages: list[RabbitMQMessage]) -> None:
    for m in messages:
        put = conn.put(routing_key=args.out, data=m.body, properties=PERSISTENT, vhost=args.vhost)
        await meter.measured(put, done.set)


serve_until(app, done, meter.report)
