"""What the original async-worker's runners share: its connection, its start and stop.

Runs in ``bench/.venvs/async-worker``.  Importing it creates and sets the asyncio
event loop first: async-worker's ``App()`` calls ``asyncio.get_event_loop()``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)

from asyncworker.connections import AMQPConnection  # noqa: E402

PERSISTENT = {"delivery_mode": 2}  # put()'s properties for a persistent message


def connection(args: argparse.Namespace) -> AMQPConnection:
    """The broker connection of the runner's App (``prefetch=256``)."""
    return AMQPConnection(
        hostname=args.host,
        port=args.port,
        username=args.user,
        password=args.password,
        prefetch=256,
    )


def serve_until(app: Any, done: asyncio.Event, report: Any) -> None:
    """Start ``app``, wait for ``done``, let the last acks go out, ``report()``, stop."""

    async def main() -> None:
        await app.startup()
        await done.wait()
        await asyncio.sleep(0.05)  # let the last acks go out
        report()
        await app._on_shutdown.send(app)  # its shutdown() only schedules this

    loop.run_until_complete(main())
