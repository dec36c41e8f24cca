"""Publisher runner for ``pika==1.*``: ``BlockingConnection`` with ``confirm_delivery()``.

Runs in ``bench/.venvs/pika``.  In confirm mode ``channel.basic_publish`` blocks
until the broker confirmed the message (it raises on a nack), so a
``BlockingConnection`` has one publish in flight by nature: ``--inflight`` is
ignored and the JSON says so (``max_concurrency`` is 1).  Messages are persistent.
"""

from __future__ import annotations

import pika
from _common import BODY, Meter, parse_args

args = parse_args("pika")
meter = Meter(args)

params = pika.ConnectionParameters(
    host=args.host,
    port=args.port,
    virtual_host=args.vhost,
    credentials=pika.PlainCredentials(args.user, args.password),
)
connection = pika.BlockingConnection(params)
channel = connection.channel()
channel.confirm_delivery()
properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
channel.basic_publish(exchange="", routing_key=args.aux, body=BODY, properties=properties)
for _ in range(args.messages):
    meter.enter()
    channel.basic_publish(exchange="", routing_key=args.queue, body=BODY, properties=properties)
    meter.leave()
connection.close()
meter.extra["inflight_ignored"] = args.inflight
meter.report()
