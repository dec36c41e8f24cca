"""Runner for this project's ``asyncworker`` (trio), from the project venv ``/work/main/.venv``.

``--variant default`` uses the App's default chain (settlement only: ack on return).
The other variants, for the ``middlewares`` mode, add standard middlewares:

* ``timing``: ``Timing`` (with a no-op async callback) alone;
* ``middlewares``: ``Logging`` (one line per message at INFO, through a
  ``logging.FileHandler`` to a temporary file) and ``Timing``;
* ``mw-queue``: the same, but the logger's handler is a ``QueueHandler`` whose
  ``QueueListener`` thread writes to the file (the stdlib's recipe for keeping
  file writes off the event loop);
* ``mw-debug``: ``Logging(level=DEBUG)`` with the logger at INFO, so that only
  failures would be written (none here), and ``Timing``;
* ``tracing``: ``Tracing`` alone, on an OpenTelemetry SDK ``TracerProvider``
  whose ``SimpleSpanProcessor`` hands every span, as it ends, to an exporter
  that drops it: the whole in-process cost of a recorded span (building,
  attributes, ending, the processor), without the network of a real exporter;
* ``tracing-noop``: ``Tracing`` on the API's no-op provider: what the
  middleware costs when tracing is off (or the span is not sampled).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import tempfile
from typing import Any

import trio
from _common import Meter, parse_args, unsupported
from _project import make_app

from asyncworker import Message

args = parse_args("asyncworker")
meter = Meter(args)


listener: logging.handlers.QueueListener | None = None


def build_tracing(variant: str) -> list[Any]:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        from asyncworker.middlewares import Tracing
    except (ImportError, AttributeError) as exc:
        unsupported("asyncworker", f"no Tracing middleware or OpenTelemetry SDK here ({exc})")
    if variant == "tracing-noop":
        return [Tracing(trace.NoOpTracerProvider())]

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    return [Tracing(provider)]


def build_middlewares(variant: str) -> tuple[list[Any], str | None]:
    global listener
    if variant == "default":
        return [], None
    if variant in ("tracing", "tracing-noop"):
        return build_tracing(variant), None
    if variant not in ("timing", "middlewares", "mw-queue", "mw-debug"):
        raise SystemExit(f"unknown variant {variant!r}")
    from asyncworker.middlewares import Logging, Timing

    async def on_timing(name: str, time_delta: float, *_: Any, **__: Any) -> None:
        return None

    if variant == "timing":
        return [Timing(on_timing)], None

    fd, path = tempfile.mkstemp(prefix="asyncworker-bench-", suffix=".log")
    os.close(fd)
    handler: logging.Handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    if variant == "mw-queue":
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(records, handler)
        listener.start()
        handler = logging.handlers.QueueHandler(records)
    log = logging.getLogger("asyncworker.bench")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    level = logging.DEBUG if variant == "mw-debug" else logging.INFO
    return [Logging(logger=log, level=level), Timing(on_timing)], path


async def main() -> None:
    done = trio.Event()
    delay = args.delay
    want_latency = args.latency
    middlewares, log_path = build_middlewares(args.variant)
    app = make_app(args, middlewares=middlewares)

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
        if listener is not None:
            # The window must include writing the records still queued.
            listener.stop()
            meter.extend()
        await app.shutdown()
    if log_path:
        meter.extra["log_path"] = log_path


trio.run(main)
if "log_path" in meter.extra:
    path = meter.extra.pop("log_path")
    meter.extra["log_bytes"] = os.path.getsize(path)
    os.unlink(path)
meter.report()
