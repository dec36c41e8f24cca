"""Publisher runner for the original ``async-worker==0.20.2``: ``AMQPConnection.put``.

Runs in ``bench/.venvs/async-worker``.  The original has no publisher confirms:
``put()`` (aioamqp's ``basic_publish`` on a channel without ``confirm_select``)
returns once the frames are written to the socket, not once the broker has the
message.  The harness therefore waits afterwards until the queue holds all N
messages and fails the run if it does not; the msg/s it reports is of writes, not
of confirmed messages.  ``--inflight K`` tasks call ``put()`` one after another.
"""

from __future__ import annotations

import asyncio

from _common import BODY, Meter, parse_args
from _original import PERSISTENT, connection, loop  # first: it sets the event loop

args = parse_args("async-worker")
meter = Meter(args)
conn = connection(args)


async def put(queue: str) -> None:
    await conn.put(routing_key=queue, serialized_data=BODY, properties=PERSISTENT, vhost=args.vhost)


async def main() -> None:
    worker = meter.publisher(lambda: put(args.queue))
    await put(args.aux)  # warm-up: the write connection opens on the first put
    await asyncio.gather(*(worker() for _ in range(args.inflight)))
    meter.report()


loop.run_until_complete(main())
