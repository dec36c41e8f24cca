"""Pipeline runner for this project's ``asyncworker``: consume A, publish to B, then ack A.

Runs in the project venv (or a ``--baseline`` ref's venv).  One route on queue A
(``--queue``), prefetch 256, D=0; the handler forwards the body with ``await
app.publish(message.body, routing_key=B)`` (persistent, returns once the broker
confirmed it) and returns, and the default chain acks A's message only then.  A
publish the broker refuses raises ``PublishNacked``, so the handler raises and the
default settlement requeues A's message.

The measured window ends when the N-th handler returns (its copy confirmed).  With
``--stop-ok``/``--stop-failed`` (the harness's check with a B that refuses) it ends
after that many successes and failures instead, and the App shuts down gracefully.
"""

from __future__ import annotations

import logging

import trio
from _common import Meter, parse_args, unsupported
from _project import make_app

from asyncworker import App, Message

args = parse_args("asyncworker")
meter = Meter(args)
if not hasattr(App, "publish"):
    unsupported("asyncworker", "App.publish does not exist at this ref")
if args.stop_ok:
    # The check's refused publishes would log a traceback each (the default chain
    # logs handler errors); the harness counts the outcomes on the broker instead.
    logging.getLogger("asyncworker").setLevel(logging.CRITICAL)


async def main() -> None:
    done = trio.Event()
    out, vhost = args.out, args.vhost
    app = make_app(args)

    @app.route([args.queue], vhost=vhost)
    async def forward(message: Message) -> None:
        await meter.measured(app.publish(message.body, routing_key=out, vhost=vhost), done.set)

    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        await done.wait()
        await app.shutdown()


trio.run(main)
meter.report()
