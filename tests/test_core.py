"""The core runtime against the real RabbitMQ: settlement, concurrency, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from asyncworker import App, AuthenticationError, ConnectError, Message

from .conftest import BROKER_URL, Broker, open_broker, wait_for

pytestmark = pytest.mark.rabbitmq


def make_app(prefetch_count: int = 16, **kwargs: object) -> App:
    return App(url=BROKER_URL, prefetch_count=prefetch_count, **kwargs)  # type: ignore[arg-type]


async def test_ack_on_success_empties_the_queue(broker: Broker) -> None:
    queue = await broker.declare()
    await broker.publish_many(queue, [b"m%d" % i for i in range(20)])
    app = make_app()
    seen: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: len(seen) == 20)
            await app.shutdown()
    assert sorted(seen) == sorted(b"m%d" % i for i in range(20))
    assert await broker.count(queue) == 0
    (stats,) = app.statistics().consumers
    assert (stats.acked, stats.requeued, stats.lost) == (20, 0, 0)


async def test_exception_requeues_and_message_comes_back_redelivered(broker: Broker) -> None:
    queue = await broker.declare()
    await broker.publish(queue, b"boom")
    app = make_app()
    deliveries: list[bool] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        deliveries.append(message.redelivered)
        if len(deliveries) == 1:
            raise RuntimeError("first attempt fails")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: len(deliveries) == 2)
            await app.shutdown()
    assert deliveries == [False, True]
    assert await broker.count(queue) == 0


async def test_handler_exception_is_logged_with_traceback(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await broker.declare()
    await broker.publish(queue, b"x")
    app = make_app()
    calls = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("missing-field")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: calls == 2)
            await app.shutdown()
    failures = [r for r in caplog.records if r.exc_info and "handler failed" in r.getMessage()]
    assert len(failures) == 1
    assert queue in failures[0].getMessage() and "requeued" in failures[0].getMessage()
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is KeyError


async def test_explicit_settlement_is_respected_and_never_doubled(broker: Broker) -> None:
    queue = await broker.declare()
    bodies = [b"ack", b"reject", b"requeue-once", b"double-ack", b"after"]
    for body in bodies:
        await broker.publish(queue, body)
    app = make_app(prefetch_count=1)
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
            attempts.append(await message.ack())  # must not reach the broker
            attempts.append(await message.reject())
        else:
            attempts.append(True)
        # the default policy (ack on return) must not settle again either

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: b"after" in results and len(results[b"requeue-once"]) == 2)
            await app.shutdown()
    assert results[b"ack"] == [True]
    assert results[b"reject"] == [True]
    assert results[b"double-ack"] == [True, False, False]
    assert results[b"requeue-once"] == [True, True]
    # A doubled ack would have closed the channel (406) and requeued "after".
    (stats,) = app.statistics().consumers
    assert stats.lost == 0
    assert (stats.acked, stats.rejected, stats.requeued) == (4, 1, 1)
    assert await broker.count(queue) == 0


async def test_concurrency_is_bounded_by_prefetch_and_reaches_it(broker: Broker) -> None:
    queue = await broker.declare()
    await broker.publish_many(queue, [b"%d" % i for i in range(40)])
    app = make_app(prefetch_count=8)
    running = 0
    peak = 0
    done = 0
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
            # min(prefetch, backlog) handlers start without waiting for each other
            await wait_for(lambda: running == 8)
            release.set()
            await wait_for(lambda: done == 40)
            await app.shutdown()
    assert peak == 8
    assert await broker.count(queue) == 0


async def test_a_slow_queue_does_not_slow_another(broker: Broker) -> None:
    slow = await broker.declare("slow")
    fast = await broker.declare("fast")
    await broker.publish_many(slow, [b"s"] * 4)
    await broker.publish_many(fast, [b"f"] * 30)
    app = make_app(prefetch_count=4)
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
    assert await broker.count(fast) == 0
    assert await broker.count(slow) == 0


async def test_one_route_many_queues_and_vhosts(broker: Broker, vhost: str) -> None:
    # The README's example: one handler draining two queues of a vhost.
    async with open_broker(BROKER_URL + vhost) as other:
        counts = other.queue_name("asgard-counts")
        errors = other.queue_name("asgard-counts-errors")
        for q in (counts, errors):
            await other.channel.queue_declare(q, durable=True)
            await other.publish(q, q.encode())
        root_queue = await broker.declare()
        await broker.publish(root_queue, b"root")
        app = make_app()
        seen: list[tuple[str, str, bytes]] = []

        @app.route([counts, errors], vhost=vhost)
        async def drain_handler(message: Message) -> None:
            seen.append((message.vhost, message.queue, message.body))

        @app.route([root_queue], vhost="/")
        async def root_handler(message: Message) -> None:
            seen.append((message.vhost, message.queue, message.body))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(app.serve)
                await wait_for(lambda: len(seen) == 3)
                await app.shutdown()
        assert sorted(seen) == sorted(
            [
                (vhost, counts, counts.encode()),
                (vhost, errors, errors.encode()),
                ("/", root_queue, b"root"),
            ]
        )


async def test_graceful_shutdown_loses_nothing(broker: Broker) -> None:
    queue = await broker.declare()
    published = 300
    await broker.publish_many(queue, [b"%d" % i for i in range(published)])
    app = make_app(prefetch_count=32)
    acked = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal acked
        await trio.sleep(0.01)
        acked += 1

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: acked >= 50)
            await app.shutdown()
    (stats,) = app.statistics().consumers
    assert stats.acked == acked
    assert acked < published
    assert acked + await broker.settled_count(queue, published - acked) == published


async def test_grace_period_cancels_stuck_handlers_and_requeues(broker: Broker) -> None:
    queue = await broker.declare()
    await broker.publish_many(queue, [b"stuck"] * 3)
    app = make_app(prefetch_count=3, grace_period=0.2)
    started = 0

    @app.route([queue])
    async def handler(message: Message) -> None:
        nonlocal started
        started += 1
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: started == 3)
            await app.shutdown()
    (stats,) = app.statistics().consumers
    assert stats.requeued == 3
    assert await broker.settled_count(queue, 3) == 3


async def test_a_missing_queue_does_not_stop_the_others(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    present = await broker.declare()
    missing = broker.queue_name("missing")
    await broker.publish(present, b"hello")
    app = make_app()
    seen: list[str] = []

    @app.route([missing, present])
    async def handler(message: Message) -> None:
        seen.append(message.queue)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: seen == [present])
            # created later: consumed without a restart
            await broker.channel.queue_declare(missing, durable=True)
            await broker.publish(missing, b"late")
            await wait_for(lambda: seen == [present, missing], timeout=15)
            await app.shutdown()
    assert any(
        missing in r.getMessage() and "does not exist" in r.getMessage() for r in caplog.records
    )


async def test_declare_true_declares_missing_queues(broker: Broker) -> None:
    queue = broker.queue_name("declared")
    app = make_app()

    @app.route([queue], declare=True)
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            assert await broker.count(queue) == 0  # exists now
            await app.shutdown()


async def test_bad_credentials_fail_fast_without_the_password() -> None:
    app = App(host="127.0.0.1", user="guest", password="s3cret-Pa55", prefetch_count=1)

    @app.route(["whatever"])
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(15), pytest.raises(AuthenticationError) as info:
        await app.serve()
    text = str(info.value)
    assert "s3cret-Pa55" not in text
    assert "127.0.0.1" in text and "guest" in text


async def test_missing_vhost_fails_fast_naming_it() -> None:
    app = make_app()

    @app.route(["whatever"], vhost="no-such-vhost-aw")
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(15), pytest.raises(ConnectError, match="no-such-vhost-aw"):
        await app.serve()


def _worker_script(tmp_path: Path, queue: str, body: str) -> Path:
    """A worker program whose handler runs ``body``."""
    script = tmp_path / "worker.py"
    handler_body = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    script.write_text(
        "import trio\n"
        "from asyncworker import App\n\n"
        f"app = App(url={BROKER_URL!r}, prefetch_count=16, grace_period=10)\n\n"
        f"@app.route([{queue!r}])\n"
        "async def handler(message):\n"
        f"{handler_body}\n\n"
        "app.run()\n"
    )
    return script


async def test_sigterm_drains_and_exits_zero(broker: Broker, tmp_path: Path) -> None:
    queue = await broker.declare()
    published = 400
    await broker.publish_many(queue, [b"%d" % i for i in range(published)])
    marker = tmp_path / "done.log"
    script = _worker_script(
        tmp_path,
        queue,
        f"""
        await trio.sleep(0.01)
        with open({str(marker)!r}, "a") as f:
            f.write("x")
        """,
    )
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        await wait_for(lambda: marker.exists() and marker.stat().st_size >= 50, timeout=30)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while process.poll() is None:
                await trio.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read().decode() if process.stdout else ""
    assert process.returncode == 0, output
    handled = marker.stat().st_size
    assert handled < published
    assert handled + await broker.settled_count(queue, published - handled) == published, output


def test_unreachable_broker_exits_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            from asyncworker import App
            app = App(host="127.0.0.1", port=1, user="guest", password="hunter2-secret",
                      prefetch_count=4, connect_timeout=5)

            @app.route(["q"])
            async def handler(message):
                pass

            app.run()
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
        check=False,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "hunter2-secret" not in output
    assert "cannot start" in output and "127.0.0.1:1" in output
    assert "connection refused" in output
    assert "Traceback" not in output
