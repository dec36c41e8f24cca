"""The Tracing middleware on every backend: spans that follow a message through the broker.

What the spans say is read from the SDK's in-memory exporter; the trace
context travels in real message headers, written by another client or by
``App.publish``, through the broker and back.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import trio
from opentelemetry import baggage, trace
from opentelemetry.trace import SpanKind, StatusCode

from asyncworker import App, Batch, Message, Properties, Unroutable
from asyncworker.middlewares import Retry, Tracing

from ..conftest import Backend, Spans, serve_until, serving

pytestmark = pytest.mark.anyio


def traceparent() -> tuple[int, int, str]:
    """A fresh (trace id, span id, ``traceparent`` header) of a sampled remote span."""
    trace_id = int.from_bytes(secrets.token_bytes(16), "big") | 1
    span_id = int.from_bytes(secrets.token_bytes(8), "big") | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def make_app(backend: Backend, spans: Spans, *middlewares: Any) -> App:
    """An App whose first middleware traces to ``spans``, then ``middlewares``."""
    return backend.app(
        prefetch_count=8, grace_period=1.0, middlewares=[Tracing(spans.provider), *middlewares]
    )


async def test_a_message_with_a_traceparent_gets_one_consumer_span_child_of_it(
    backend: Backend, spans: Spans
) -> None:
    broker = backend.broker
    queue = await broker.declare("traced")
    trace_id, parent_id, header = traceparent()
    await broker.publish(
        queue,
        b"{}",
        headers={"traceparent": header, "tracestate": "vendor=1", "baggage": "tenant=acme"},
        message_id="m-1",
        correlation_id="c-1",
    )
    app = make_app(backend, spans)
    seen: list[Any] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        seen.append((trace.get_current_span().get_span_context(), baggage.get_baggage("tenant")))

    with trio.fail_after(30):
        await serve_until(app, lambda: spans.finished("CONSUMER"))
    (span,) = spans.finished("CONSUMER")
    context = span.get_span_context()
    assert span.name == f"process {queue}"
    assert span.kind is SpanKind.CONSUMER
    assert context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == parent_id
    assert span.parent.is_remote
    assert context.trace_state.get("vendor") == "1"
    assert [link.context.span_id for link in span.links] == [parent_id]
    # The handler ran inside it, with the message's baggage.
    assert seen == [(context, "acme")]
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": queue,
        "messaging.rabbitmq.destination.routing_key": queue,
        "messaging.rabbitmq.message.delivery_tag": 1,
        "messaging.message.id": "m-1",
        "messaging.message.conversation_id": "c-1",
        "asyncworker.vhost": "/",
        "asyncworker.message.redelivered": False,
        "asyncworker.message.outcome": "acked",
    }


async def test_a_handler_that_publishes_downstream_continues_the_trace(
    backend: Backend, spans: Spans
) -> None:
    broker = backend.broker
    first = await broker.declare("first")
    second = await broker.declare("second")
    trace_id, parent_id, header = traceparent()
    await broker.publish(first, b"1", headers={"traceparent": header})
    app = make_app(backend, spans)
    downstream: list[Any] = []

    @app.route([first])
    async def forward(message: Message) -> None:
        await app.publish(message.body, routing_key=second, headers={"hop": 1})

    @app.route([second])
    async def receive(message: Message) -> None:
        downstream.append(message.headers)

    with trio.fail_after(30):
        await serve_until(app, lambda: len(spans.finished("CONSUMER")) == 2)
    consumed = {span.name: span for span in spans.finished("CONSUMER")}
    (produced,) = spans.finished("PRODUCER")
    upstream, downstream_span = consumed[f"process {first}"], consumed[f"process {second}"]
    for span in (upstream, produced, downstream_span):
        assert span.get_span_context().trace_id == trace_id
    assert upstream.parent is not None and upstream.parent.span_id == parent_id
    assert produced.parent is not None
    assert produced.parent.span_id == upstream.get_span_context().span_id
    assert downstream_span.parent is not None
    assert downstream_span.parent.span_id == produced.get_span_context().span_id
    assert produced.name == f"publish {second}"
    assert produced.attributes is not None
    assert dict(produced.attributes) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": second,
        "messaging.rabbitmq.destination.routing_key": second,
        "asyncworker.vhost": "/",
    }
    # The header on the wire names the producer span; the caller's headers stay.
    (headers,) = downstream
    assert headers["hop"] == 1
    assert headers["traceparent"] == (
        f"00-{trace_id:032x}-{produced.get_span_context().span_id:016x}-01"
    )


async def test_a_failing_attempt_is_an_error_and_its_retry_continues_the_trace(
    backend: Backend, spans: Spans
) -> None:
    broker = backend.broker
    queue = await broker.declare("retried")
    trace_id, _, header = traceparent()
    await broker.publish(queue, b"flaky", headers={"traceparent": header})
    app = make_app(backend, spans, Retry(3))
    attempts: list[int] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            raise ValueError("first attempt fails")

    with trio.fail_after(30):
        await serve_until(app, lambda: len(spans.finished("CONSUMER")) == 2)
    # Oldest first by start: the retry may end before the failed attempt's
    # span does (that one ends once the original is acked).
    failed, retried = sorted(spans.finished("CONSUMER"), key=lambda span: span.start_time or 0)
    (copy,) = spans.finished("PRODUCER")
    for span in (failed, copy, retried):
        assert span.get_span_context().trace_id == trace_id
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: first attempt fails"
    (event,) = failed.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "first attempt fails"
    assert failed.attributes is not None and retried.attributes is not None
    assert failed.attributes["error.type"] == "ValueError"
    assert failed.attributes["asyncworker.message.outcome"] == "retried"
    assert failed.attributes["asyncworker.message.republished_to"] == queue
    # Retry's copy is published from the failed attempt; the retry is its child.
    assert copy.parent is not None and copy.parent.span_id == failed.get_span_context().span_id
    assert retried.parent is not None
    assert retried.parent.span_id == copy.get_span_context().span_id
    assert retried.status.status_code is StatusCode.UNSET
    assert retried.attributes["asyncworker.message.attempt"] == 2
    assert retried.attributes["asyncworker.message.outcome"] == "acked"


async def test_the_span_says_how_the_message_was_settled(backend: Backend, spans: Spans) -> None:
    broker = backend.broker
    requeued = await broker.declare("requeued")
    rejected = await broker.declare("rejected")
    poisoned = await broker.declare("poisoned")
    for queue in (requeued, rejected, poisoned):
        await broker.publish(queue, b"x")
    app = make_app(backend, spans)

    @app.route([requeued])
    async def requeue_once(message: Message) -> None:
        if not message.redelivered:
            raise RuntimeError("requeue me")

    @app.route([rejected])
    async def reject(message: Message) -> None:
        await message.reject(requeue=False)

    @app.route([poisoned], middlewares=[Retry(1)])
    async def poison(message: Message) -> None:
        raise RuntimeError("poison")

    with trio.fail_after(30):
        await serve_until(app, lambda: len(spans.finished("CONSUMER")) == 4)
    outcomes = {
        (span.name, span.attributes["asyncworker.message.redelivered"]): (
            span.attributes["asyncworker.message.outcome"],
            span.attributes.get("asyncworker.message.republished_to"),
        )
        for span in spans.finished("CONSUMER")
        if span.attributes is not None
    }
    assert outcomes == {
        (f"process {requeued}", False): ("requeued", None),
        (f"process {requeued}", True): ("acked", None),
        (f"process {rejected}", False): ("rejected", None),
        (f"process {poisoned}", False): ("dead-lettered", f"{poisoned}.dlq"),
    }
    # A message without a trace context starts a trace of its own.
    assert all(span.parent is None for span in spans.finished("CONSUMER"))


async def test_a_bulk_route_has_one_span_per_batch_linked_to_each_message(
    backend: Backend, spans: Spans
) -> None:
    broker = backend.broker
    queue = await broker.declare("bulk")
    senders = [traceparent() for _ in range(3)]
    for _, _, header in senders:
        await broker.publish(queue, b"x", headers={"traceparent": header})
    await broker.publish(queue, b"untraced")
    app = make_app(backend, spans)
    current: list[Any] = []

    @app.route([queue], bulk_size=4, bulk_flush_interval=5.0)
    async def handler(batch: Batch) -> None:
        current.append(trace.get_current_span().get_span_context())

    with trio.fail_after(30):
        await serve_until(app, lambda: spans.finished("CONSUMER"))
    (span,) = spans.finished("CONSUMER")
    assert current == [span.get_span_context()]
    assert span.parent is None
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (trace_id, span_id) for trace_id, span_id, _ in senders
    ]
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 4
    assert span.attributes["messaging.destination.name"] == queue
    assert span.attributes["asyncworker.message.outcome"] == "acked"


async def test_a_publish_that_fails_ends_its_span_in_error(backend: Backend, spans: Spans) -> None:
    queue = await backend.broker.declare("idle")
    app = make_app(backend, spans)
    nowhere = backend.broker.queue_name("nowhere")  # never declared

    @app.route([queue])
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(30):
        async with serving(app):
            with pytest.raises(Unroutable):
                await app.publish(
                    b"x",
                    routing_key=nowhere,
                    mandatory=True,
                    properties=Properties(message_id="m-9"),
                )
    (span,) = spans.finished("PRODUCER")
    assert span.name == f"publish {nowhere}"
    assert span.parent is None
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "Unroutable"
    assert span.attributes["messaging.message.id"] == "m-9"
    assert [event.name for event in span.events] == ["exception"]
