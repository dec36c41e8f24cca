"""Publisher runner for this project's ``asyncworker``: N confirmed publishes, K at once.

Runs in the project venv (or a ``--baseline`` ref's venv).  Every publish is
``await app.publish(BODY, routing_key=queue)``: persistent, and it returns once the
broker confirmed the message.  ``--inflight K`` tasks publish one after another, so
K publishes are awaited at once.  Variants, i.e. where the publishing App is:

* ``serve`` (the default): inside a serving App (``nursery.start(app.serve)``, one
  route on the idle auxiliary queue), the way a handler publishes;
* ``async-with``: under ``async with app:`` without consuming, the way a script
  publishes once the App supports it (reported as unsupported where it does not);
* ``bare``: ``app.publish()`` on an App that neither serves nor is entered: what a
  script got before ``async with app:`` existed.

One publish to the auxiliary queue before the measured window opens the publishing
connection and its confirm channel, as every publish runner does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from _common import BODY, Meter, parse_args, unsupported
from _project import make_app

from asyncworker import App, Message

args = parse_args("asyncworker")
meter = Meter(args)
VARIANTS = ("serve", "async-with", "bare")
if args.variant == "default":
    args.variant = "serve"
if args.variant not in VARIANTS:
    raise SystemExit(f"unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}")
if not hasattr(App, "publish"):
    unsupported("asyncworker", "App.publish does not exist at this ref")
if args.variant == "async-with" and not hasattr(App, "__aenter__"):
    unsupported("asyncworker", "`async with app:` is not supported at this ref")


async def publish_all(publish: Callable[..., Awaitable[Any]]) -> None:
    """Publish N messages from K tasks, each awaiting its confirm before the next."""
    queue, vhost = args.queue, args.vhost
    worker = meter.publisher(lambda: publish(BODY, routing_key=queue, vhost=vhost))
    await publish(BODY, routing_key=args.aux, vhost=vhost)  # warm-up: connect outside the window
    async with trio.open_nursery() as nursery:
        for _ in range(args.inflight):
            nursery.start_soon(worker)


async def main() -> None:
    app = make_app(args)
    if args.variant == "serve":

        @app.route([args.aux], vhost=args.vhost)
        async def idle(message: Message) -> None:
            return None

        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await publish_all(app.publish)
            await app.shutdown()
    elif args.variant == "async-with":
        async with app:  # type: ignore[attr-defined]  # absent before issue #16
            await publish_all(app.publish)
    else:
        await publish_all(app.publish)


trio.run(main)
meter.report()
