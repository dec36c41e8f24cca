"""Health and metrics over HTTP, on every backend: what they report matches what happened."""

from __future__ import annotations

import json

import pytest
import trio

from asyncworker import App, Message

from ..conftest import Backend, http_get, wait_for

pytestmark = pytest.mark.anyio


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{prefix!r} not in the metrics:\n{text}")


async def get_while_serving(app: App, path: str) -> tuple[int, bytes]:
    """Serve ``app``, GET ``path`` from its HTTP server once it serves, shut it down."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            assert app.http_url is not None
            try:
                return await http_get(app.http_url, path)
            finally:
                await app.shutdown()


async def test_health_503_names_the_reason(backend: Backend) -> None:
    broker = backend.broker
    app = backend.app(http="127.0.0.1:0")
    missing = broker.queue_name("missing")

    @app.route([missing])
    async def handler(message: Message) -> None:
        pass

    code, body = await get_while_serving(app, "/health/ready")
    assert code == 503
    reasons = json.loads(body)["reasons"]
    assert reasons == [f"queue {missing!r} in vhost '/': queue {missing!r} not found in vhost '/'"]


async def test_metrics_match_what_was_published_and_how_it_was_settled(
    backend: Backend,
) -> None:
    broker = backend.broker
    queue = await broker.declare()
    app = backend.app(http="127.0.0.1:0")
    handled: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        handled.append(message.body)
        if message.body == b"reject":
            await message.reject(requeue=False)
        elif message.body == b"requeue" and not message.redelivered:
            await message.reject(requeue=True)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            for body in (b"a", b"b", b"c", b"reject", b"requeue"):
                await app.publish(body, routing_key=queue)
            await wait_for(lambda: len(handled) == 6)
            assert app.http_url is not None
            code, raw = await http_get(app.http_url, "/metrics")
            await app.shutdown()
    assert code == 200
    text = raw.decode()
    labels = {"vhost": "/", "queue": queue}
    assert metric(text, "asyncworker_messages_received_total", **labels) == 6
    assert metric(text, "asyncworker_messages_acked_total", **labels) == 4
    assert metric(text, "asyncworker_messages_requeued_total", **labels) == 1
    assert metric(text, "asyncworker_messages_rejected_total", **labels) == 1
    assert metric(text, "asyncworker_messages_lost_total", **labels) == 0
    assert metric(text, "asyncworker_messages_in_flight", **labels) == 0
    assert metric(text, "asyncworker_consumer_up", **labels) == 1
    assert metric(text, "asyncworker_connection_up", vhost="/") == 1
    assert metric(text, "asyncworker_reconnects_total", vhost="/") == 0
    assert metric(text, "asyncworker_publishes_confirmed_total", vhost="/") == 5
    route = "test_metrics_match_what_was_published_and_how_it_was_settled.<locals>.handler"
    assert metric(text, "asyncworker_handler_duration_seconds_count", route=route, vhost="/") == 6


async def test_every_metric_family_has_its_series_before_anything_happens(
    backend: Backend,
) -> None:
    queue = await backend.broker.declare()
    app = backend.app(http="127.0.0.1:0")

    @app.route([queue])
    async def handler(message: Message) -> None:
        pass

    code, raw = await get_while_serving(app, "/metrics")
    assert code == 200
    text = raw.decode()
    labels = {"vhost": "/", "queue": queue}
    for name in ("received", "acked", "requeued", "rejected", "lost"):
        assert metric(text, f"asyncworker_messages_{name}_total", **labels) == 0
    assert metric(text, "asyncworker_reconnects_total", vhost="/") == 0
    # Nothing published yet: the counters are there, at 0, for every vhost consumed.
    assert metric(text, "asyncworker_publishes_confirmed_total", vhost="/") == 0
    assert metric(text, "asyncworker_publishes_failed_total", vhost="/") == 0
    route = "test_every_metric_family_has_its_series_before_anything_happens.<locals>.handler"
    assert metric(text, "asyncworker_handler_duration_seconds_count", route=route, vhost="/") == 0
