"""Runner for the original ``async-worker==0.20.2`` (asyncio + aioamqp).

Runs in ``bench/.venvs/async-worker``.  One route with ``bulk_size=1`` so the handler
receives a one-message list and the message is acked after the handler returns
(async-worker's default ``on_success=ACK``).  Messages are JSON (async-worker's
``JsonQueue`` rejects anything else), which the harness always publishes.
"""

from __future__ import annotations

import asyncio

from _common import Meter, parse_args
from _original import connection, serve_until  # first: it sets the event loop
from asyncworker.rabbitmq.message import RabbitMQMessage
from asyncworker.routes import AMQPRouteOptions

from asyncworker import App

args = parse_args("async-worker")
meter = Meter(args)
done = asyncio.Event()
app = App(connections=[connection(args)])
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


serve_until(app, done, meter.report)
