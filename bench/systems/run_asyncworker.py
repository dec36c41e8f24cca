"""Runner for this project's ``asyncworker`` (trio), from the project venv ``/work/main/.venv``.

``--variant default`` uses the App's default chain (settlement only: ack on return).
``--variant middlewares`` adds ``Logging`` (INFO, to a temporary file) and ``Timing``
(with a no-op callback), for the ``middlewares`` mode.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import trio
from _common import Meter, parse_args

from asyncworker import App, Message

args = parse_args("asyncworker")
meter = Meter(args)


def build_middlewares(variant: str) -> tuple[list[Any], str | None]:
    if variant == "default":
        return [], None
    if variant != "middlewares":
        raise SystemExit(f"unknown variant {variant!r}")
    from asyncworker.middlewares import Logging, Timing

    fd, path = tempfile.mkstemp(prefix="asyncworker-bench-", suffix=".log")
    os.close(fd)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log = logging.getLogger("asyncworker.bench")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    async def on_timing(name: str, time_delta: float, *_: Any, **__: Any) -> None:
        return None

    return [Logging(logger=log, level=logging.INFO), Timing(on_timing)], path


async def main() -> None:
    done = trio.Event()
    delay = args.delay
    want_latency = args.latency
    middlewares, log_path = build_middlewares(args.variant)
    app = App(
        host=args.host,
        port=args.port,
        user=args.user,
        password=args.password,
        prefetch_count=256,
        middlewares=middlewares,
    )

    @app.route([args.queue], vhost=args.vhost)
    async def handler(message: Message) -> None:
        meter.enter(message.body if want_latency else None)
        if delay:
            await trio.sleep(delay)
        if meter.leave():
            done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        await done.wait()
        await app.shutdown()
    if log_path:
        meter.extra["log_path"] = log_path


trio.run(main)
if "log_path" in meter.extra:
    path = meter.extra.pop("log_path")
    meter.extra["log_bytes"] = os.path.getsize(path)
    os.unlink(path)
meter.report()
