"""Tracing beyond one broker: the optional extra, the process-wide publish hook, JSON log ids.

The spans of consuming and publishing, on both backends, are in
``tests/contract/test_tracing.py``.  Here: what a process without the
``otel`` extra sees (in a subprocess where OpenTelemetry cannot be imported),
an App without a ``Tracing`` of its own (a subprocess, because OpenTelemetry's
global tracer provider can be set only once per process), and the trace ids
``JsonFormatter`` writes.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import trio

from asyncworker import App, JsonFormatter, Message
from asyncworker.middlewares import Tracing

from .conftest import Spans, wait_for

pytestmark = pytest.mark.anyio

#: Makes every `import opentelemetry...` fail, as in an environment without the extra.
WITHOUT_OTEL = "import sys\nsys.modules['opentelemetry'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_without_the_extra_the_import_error_names_it() -> None:
    for statement in (
        "from asyncworker.middlewares import Tracing",
        "import asyncworker.middlewares.tracing",
    ):
        result = run_python(
            WITHOUT_OTEL
            + "import asyncworker.middlewares\n"
            + "from asyncworker.middlewares import Logging, Retry, Timeout, Timing\n"
            + statement
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines()[-1] == (
            "ImportError: asyncworker.middlewares.Tracing needs OpenTelemetry, which is not "
            "installed: pip install 'asyncworker[otel]'"
        )
        # One error, not a chain of two tracebacks.
        assert "During handling" not in result.stderr


def test_without_the_extra_json_logs_work_and_import_nothing() -> None:
    result = run_python(
        WITHOUT_OTEL
        + textwrap.dedent("""
        import logging
        import asyncworker
        record = logging.LogRecord("asyncworker", logging.INFO, "x.py", 1, "hello", (), None)
        print(asyncworker.JsonFormatter().format(record))
        del sys.modules["opentelemetry"]
        asyncworker.JsonFormatter().format(record)
        print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
        """)
    )
    assert result.returncode == 0, result.stderr
    line, loaded = result.stdout.splitlines()
    assert set(json.loads(line)) == {"time", "level", "logger", "message"}
    assert loaded == "[]"


def test_an_app_without_tracing_publishes_with_the_global_provider() -> None:
    result = run_python(
        """
        import json
        import trio
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        import asyncworker.middlewares.tracing  # installs the process-wide publish hook
        from asyncworker import App, Message

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)  # after the import: looked up per span

        app = App(url="memory://")

        @app.route(["unused"], declare=True)
        async def handler(message: Message) -> None:
            pass

        async def main() -> None:
            async with app.test_client() as client:
                await client.declare_queue("out")
                with provider.get_tracer("script").start_as_current_span("job") as job:
                    await app.publish(b"x", routing_key="out", headers={"keep": "me"})
                channel = await client.channel()
                delivery = await channel.get("out", no_ack=True)
            (span,) = [s for s in exporter.get_finished_spans() if s.name != "job"]
            print(json.dumps({
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": span.context.trace_id == job.get_span_context().trace_id,
                "parent": span.parent.span_id == job.get_span_context().span_id,
                "span_id": f"{span.context.span_id:016x}",
                "headers": delivery.properties.headers,
            }))

        trio.run(main)
        """
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["name"] == "publish out"
    assert seen["kind"] == "PRODUCER"
    assert seen["trace_id"] and seen["parent"]
    assert seen["headers"]["keep"] == "me"
    assert seen["headers"]["traceparent"].split("-")[2] == seen["span_id"]


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("asyncworker", logging.INFO, __file__, 1, message, (), None)


def test_json_lines_carry_the_ids_of_the_active_span(spans: Spans) -> None:
    formatter = JsonFormatter()
    tracer = spans.provider.get_tracer("test")
    assert "trace_id" not in json.loads(formatter.format(record("no span")))
    with tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(record("in a span")))
    context = span.get_span_context()
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in json.loads(formatter.format(record("after it")))


async def test_a_handler_failure_logs_the_trace_of_its_message(spans: Spans) -> None:
    app = App(url="memory://", middlewares=[Tracing(spans.provider)])

    @app.route(["orders"], declare=True)
    async def handler(message: Message) -> None:
        logging.getLogger("asyncworker.orders").info("handling %s", message.body)
        if not message.redelivered:
            raise ValueError("boom")

    lines: list[dict[str, object]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    collect = Collect(logging.INFO)
    collect.setFormatter(JsonFormatter())
    logger = logging.getLogger("asyncworker")
    logger.addHandler(collect)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with trio.fail_after(30):
            async with app.test_client() as client:
                await client.publish("orders", b"1")
                await wait_for(lambda: len(spans.finished("CONSUMER")) == 2)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    first, second = sorted(spans.finished("CONSUMER"), key=lambda span: span.start_time or 0)
    ids = {
        (f"{s.get_span_context().trace_id:032x}", f"{s.get_span_context().span_id:016x}")
        for s in (first, second)
    }
    traced = [line for line in lines if "trace_id" in line]
    handled = [line for line in traced if str(line["message"]).startswith("handling")]
    failed = [line for line in traced if "handler failed" in str(line["message"])]
    assert len(handled) == 2 and len(failed) == 1
    assert {(line["trace_id"], line["span_id"]) for line in handled} == ids
    assert (failed[0]["trace_id"], failed[0]["span_id"]) == (
        f"{first.get_span_context().trace_id:032x}",
        f"{first.get_span_context().span_id:016x}",
    )
    # Lines outside any message (serving, consuming) carry none.
    assert any("consuming queue" in str(line["message"]) for line in lines)
    assert all(
        "trace_id" not in line for line in lines if "consuming queue" in str(line["message"])
    )


async def test_a_handler_cancelled_by_the_grace_period_ends_its_span_in_error(
    spans: Spans,
) -> None:
    app = App(url="memory://", grace_period=0, middlewares=[Tracing(spans.provider)])
    started = trio.Event()

    @app.route(["slow"], declare=True)
    async def handler(message: Message) -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with app.test_client() as client:
            await client.publish("slow", b"1")
            await started.wait()
    (span,) = spans.finished("CONSUMER")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes is not None
    assert span.attributes["error.type"] == "Cancelled"
    # Settled by the policy before the cancellation went on: back to the queue.
    assert span.attributes["asyncworker.message.outcome"] == "requeued"
