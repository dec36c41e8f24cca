"""Delivery through an App, on every backend: settlement, concurrency, shutdown, vhosts.

The App consumes, acks on return, requeues on an exception, never settles
twice, keeps at most ``prefetch_count`` handlers of a queue at once, drains
on shutdown and requeues what it could not finish: the same answers on
``memory://`` and on RabbitMQ (see ``tests/contract/__init__.py``).
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
import trio

from asyncworker import App, ConnectError, Message

from ..conftest import Backend, open_broker, serve_until, wait_for

pytestmark = pytest.mark.anyio


async def test_ack_on_success(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish_many(queue, [b"m%d" % i for i in range(20)])
    app = backend.app()
    seen: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(20):
        await serve_until(app, lambda: len(seen) == 20)
        assert sorted(seen) == sorted(b"m%d" % i for i in range(20))
        assert await backend.broker.count(queue) == 0
    (stats,) = app.statistics().consumers
    assert (stats.acked, stats.requeued, stats.rejected, stats.lost) == (20, 0, 0, 0)


async def test_exception_requeues_and_redelivers(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish(queue, b"boom")
    app = backend.app()
    deliveries: list[bool] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        deliveries.append(message.redelivered)
        if len(deliveries) == 1:
            raise RuntimeError("first attempt fails")

    with trio.fail_after(20):
        await serve_until(app, lambda: len(deliveries) == 2)
        assert deliveries == [False, True]
        assert await backend.broker.count(queue) == 0


async def test_explicit_settlement_is_never_doubled(backend: Backend) -> None:
    queue = await backend.broker.declare()
    for body in (b"ack", b"reject", b"requeue-once", b"double-ack", b"after"):
        await backend.broker.publish(queue, body)
    app = backend.app(prefetch_count=1)
    results: dict[bytes, list[bool]] = {}

    @app.route([queue])
    async def handler(message: Message) -> None:
        attempts = results.setdefault(message.body, [])
        if message.body == b"ack":
            attempts.append(await message.ack())
        elif message.body == b"reject":
            attempts.append(await message.reject(requeue=False))
        elif message.body == b"requeue-once" and not message.redelivered:
            attempts.append(await message.reject(requeue=True))
        elif message.body == b"double-ack":
            attempts.append(await message.ack())
            attempts.append(await message.ack())
            attempts.append(await message.reject())
        else:
            attempts.append(True)

    with trio.fail_after(20):
        await serve_until(app, lambda: b"after" in results and len(results[b"requeue-once"]) == 2)
        assert await backend.broker.count(queue) == 0
    assert results[b"ack"] == [True]
    assert results[b"reject"] == [True]
    assert results[b"double-ack"] == [True, False, False]
    assert results[b"requeue-once"] == [True, True]
    (stats,) = app.statistics().consumers
    # A doubled ack would have closed the channel (406): "after" would be lost.
    assert (stats.acked, stats.rejected, stats.requeued, stats.lost) == (4, 1, 1, 0)


async def test_concurrency_is_bounded_by_prefetch(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish_many(queue, [b"%d" % i for i in range(40)])
    app = backend.app(prefetch_count=8)
    running = peak = done = 0
    release = trio.Event()

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
            done += 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: running == 8)
            assert await backend.broker.count(queue) == 32  # the rest stays in the queue
            release.set()
            await wait_for(lambda: done == 40)
            await app.shutdown()
    assert peak == 8
    assert await backend.broker.count(queue) == 0


async def test_graceful_shutdown_loses_nothing(backend: Backend) -> None:
    queue = await backend.broker.declare()
    published = 300
    await backend.broker.publish_many(queue, [b"%d" % i for i in range(published)])
    app = backend.app(prefetch_count=32)
    handled = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal handled
        await trio.sleep(0.01)
        handled += 1

    with trio.fail_after(30):
        await serve_until(app, lambda: handled >= 50)
        (stats,) = app.statistics().consumers
        assert stats.acked == handled < published
        left = await backend.broker.settled_count(queue, published - handled)
    assert handled + left == published


async def test_handler_exception_is_logged_with_traceback(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish(queue, b"x")
    app = backend.app()
    calls = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("missing-field")

    with trio.fail_after(20):
        await serve_until(app, lambda: calls == 2)
    failures = [r for r in caplog.records if r.exc_info and "handler failed" in r.getMessage()]
    assert len(failures) == 1
    assert queue in failures[0].getMessage() and "requeued" in failures[0].getMessage()
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is KeyError


async def test_a_slow_queue_does_not_slow_another(backend: Backend) -> None:
    slow = await backend.broker.declare("slow")
    fast = await backend.broker.declare("fast")
    await backend.broker.publish_many(slow, [b"s"] * 4)
    await backend.broker.publish_many(fast, [b"f"] * 30)
    app = backend.app(prefetch_count=4)
    unblock = trio.Event()
    fast_done = 0

    @app.route([slow])
    async def slow_handler(message: Message) -> None:
        await unblock.wait()

    @app.route([fast])
    async def fast_handler(message: Message) -> None:
        nonlocal fast_done
        fast_done += 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: fast_done == 30)
            stats = {s.queue: s for s in app.statistics().consumers}
            assert stats[slow].in_flight == 4  # still blocked, the fast queue drained anyway
            unblock.set()
            await app.shutdown()
    assert await backend.broker.count(fast) == 0
    assert await backend.broker.count(slow) == 0


async def test_one_route_many_queues_and_vhosts(backend: Backend) -> None:
    # The README's example: one handler draining two queues of a vhost.
    with backend.vhost() as vhost:
        async with open_broker(backend.url, vhost=vhost) as other:
            counts = other.queue_name("asgard-counts")
            errors = other.queue_name("asgard-counts-errors")
            for q in (counts, errors):
                await other.channel.queue_declare(q, durable=True)
                await other.publish(q, q.encode())
            root_queue = await backend.broker.declare()
            await backend.broker.publish(root_queue, b"root")
            app = backend.app()
            seen: list[tuple[str, str, bytes]] = []

            @app.route([counts, errors], vhost=vhost)
            async def drain_handler(message: Message) -> None:
                seen.append((message.vhost, message.queue, message.body))

            @app.route([root_queue], vhost="/")
            async def root_handler(message: Message) -> None:
                seen.append((message.vhost, message.queue, message.body))

            with trio.fail_after(20):
                await serve_until(app, lambda: len(seen) == 3)
            assert sorted(seen) == sorted(
                [
                    (vhost, counts, counts.encode()),
                    (vhost, errors, errors.encode()),
                    ("/", root_queue, b"root"),
                ]
            )


def on_vhost(url: str, vhost: str) -> str:
    """``url`` with its vhost replaced by ``vhost``."""
    return f"{url.rstrip('/')}/{quote(vhost, safe='')}"


async def test_a_route_without_vhost_consumes_the_vhost_of_the_apps_url(
    backend: Backend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One rule, however the URL was given: in the code, as an override
    # (--url: App.reconfigured) or from ASYNCWORKER_URL.
    with backend.vhost() as first, backend.vhost() as second:
        async with (
            open_broker(backend.url, vhost=first) as one,
            open_broker(backend.url, vhost=second) as two,
        ):
            queue = one.queue_name("follows")
            for broker in (one, two, backend.broker):
                await broker.channel.queue_declare(queue, durable=True)
            pinned = await backend.broker.declare("pinned")
            seen: list[tuple[str, str, bytes]] = []

            def make(app: App) -> App:
                @app.route([queue])
                async def follows(message: Message) -> None:
                    seen.append((message.vhost, message.queue, message.body))

                @app.route([pinned], vhost="/")
                async def stays(message: Message) -> None:
                    seen.append((message.vhost, message.queue, message.body))

                return app

            async def served_by(app: App, body: bytes) -> set[tuple[str, str, bytes]]:
                seen.clear()
                for broker in (one, two, backend.broker):
                    await broker.publish(queue, body)
                await backend.broker.publish(pinned, body)
                caplog.clear()
                with caplog.at_level(logging.INFO, logger="asyncworker"):
                    await serve_until(app, lambda: len(seen) == 2)
                serving = [r.getMessage() for r in caplog.records if "serving" in r.message]
                assert len(serving) == 1, serving
                assert f"{queue!r} in vhost {app.vhost!r}" in serving[0]
                assert f"{pinned!r} in vhost '/'" in serving[0]
                for broker in (one, two, backend.broker):
                    await broker.drain(queue)
                return set(seen)

            with trio.fail_after(30):
                # In the code.
                app = make(App(url=on_vhost(backend.url, first), prefetch_count=16))
                assert {r.vhost for r in app.routes} == {first, "/"}
                assert await served_by(app, b"code") == {
                    (first, queue, b"code"),
                    ("/", pinned, b"code"),
                }
                # An override, as --url gives it: the route moves, the pinned one stays.
                with app.reconfigured(url=on_vhost(backend.url, second)):
                    assert {r.vhost for r in app.routes} == {second, "/"}
                    assert await served_by(app, b"override") == {
                        (second, queue, b"override"),
                        ("/", pinned, b"override"),
                    }
                assert {r.vhost for r in app.routes} == {first, "/"}
                # ASYNCWORKER_URL.
                monkeypatch.setenv("ASYNCWORKER_URL", on_vhost(backend.url, second))
                app = make(App(prefetch_count=16))
                assert await served_by(app, b"env") == {
                    (second, queue, b"env"),
                    ("/", pinned, b"env"),
                }
            await one.channel.queue_delete(queue)
            await two.channel.queue_delete(queue)


async def test_a_moved_route_cannot_take_a_queue_of_another_route(backend: Backend) -> None:
    with backend.vhost() as vhost:
        app = backend.app()

        @app.route(["orders"])
        async def follows(message: Message) -> None:
            pass

        @app.route(["orders"], vhost=vhost)
        async def pinned(message: Message) -> None:
            pass

        clash = f"queue 'orders' in vhost {vhost!r} has two"
        with (
            app.reconfigured(url=on_vhost(backend.url, vhost)),
            trio.fail_after(10),
            pytest.raises(ValueError, match=clash),
        ):
            await app.serve()


async def test_grace_period_cancels_stuck_handlers_and_requeues(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish_many(queue, [b"stuck"] * 3)
    app = backend.app(prefetch_count=3, grace_period=0.2)
    started = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal started
        started += 1
        await trio.sleep_forever()

    with trio.fail_after(20):
        await serve_until(app, lambda: started == 3)
    (stats,) = app.statistics().consumers
    assert stats.requeued == 3
    assert await backend.broker.settled_count(queue, 3) == 3


async def test_a_handler_can_shut_the_app_down(backend: Backend) -> None:
    queue = await backend.broker.declare()
    await backend.broker.publish(queue, b"stop")
    # A grace period far longer than the test's deadline: waiting for it would fail.
    app = backend.app(prefetch_count=4, grace_period=120)
    handled: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        handled.append(message.body)
        await app.shutdown()  # must not wait for this very handler

    with trio.fail_after(30):
        await serve_until(app, lambda: handled == [b"stop"])
    (stats,) = app.statistics().consumers
    assert stats.acked == 1 and stats.requeued == 0
    assert await backend.broker.settled_count(queue, 0) == 0


async def test_a_missing_queue_does_not_stop_the_others(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    present = await backend.broker.declare()
    missing = backend.broker.queue_name("missing")
    await backend.broker.publish(present, b"hello")
    app = backend.app()
    seen: list[str] = []

    @app.route([missing, present])
    async def handler(message: Message) -> None:
        seen.append(message.queue)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: seen == [present])
            # created later: consumed without a restart
            await backend.broker.channel.queue_declare(missing, durable=True)
            await backend.broker.publish(missing, b"late")
            await wait_for(lambda: seen == [present, missing], timeout=15)
            await app.shutdown()
    assert any(
        missing in r.getMessage() and "does not exist" in r.getMessage() for r in caplog.records
    )


async def test_declare_true_declares_missing_queues(backend: Backend) -> None:
    queue = backend.broker.queue_name("declared")
    app = backend.app()

    @app.route([queue], declare=True)
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            assert await backend.broker.count(queue) == 0  # exists now
            await app.shutdown()


async def test_missing_vhost_fails_fast_naming_it(backend: Backend) -> None:
    app = backend.app()

    @app.route(["whatever"], vhost="no-such-vhost-aw")
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(15), pytest.raises(ConnectError, match="no-such-vhost-aw"):
        await app.serve()
