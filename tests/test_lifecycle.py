"""Lifecycle hooks, periodic tasks and how `run()` exits (memory broker, virtual clock)."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from asyncworker import App, Message, StartupError
from asyncworker._transports.memory import MemoryBroker

from .conftest import wait_for


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def make_app(mem: MemoryBroker, **kwargs: Any) -> tuple[App, list[bytes]]:
    app = App(url=mem.url, **kwargs)
    seen: list[bytes] = []

    @app.route(["jobs"], declare=True)
    async def handler(message: Message) -> None:
        assert message.app is not None
        message.app.state["handled"] = message.app.state.get("handled", 0) + 1
        seen.append(message.body)

    return app, seen


# -- periodic tasks -------------------------------------------------------------------


async def test_periodic_cadence(mem: MemoryBroker) -> None:
    app, _ = make_app(mem)
    runs: list[float] = []

    @app.run_every(1.0)
    async def tick(app: App) -> None:
        runs.append(trio.current_time())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            start = trio.current_time()
            await trio.sleep(5.5)
            await app.shutdown()
    assert [round(t - start, 3) for t in runs] == [1.0, 2.0, 3.0, 4.0, 5.0]


async def test_periodic_never_overlaps_and_skips_missed_ticks(mem: MemoryBroker) -> None:
    app, _ = make_app(mem)
    starts: list[float] = []
    running = 0
    most = 0

    @app.run_every(datetime.timedelta(seconds=1), run_at_start=True)
    async def slow(app: App) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        starts.append(trio.current_time())
        await trio.sleep(2.5)
        running -= 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            start = trio.current_time()
            await trio.sleep(9.9)
            await app.shutdown()
    assert most == 1
    # Runs at 0 (until 2.5), ticks 1 and 2 skipped, run at 3 (until 5.5), ...
    assert [round(t - start, 3) for t in starts] == [0.0, 3.0, 6.0, 9.0]


async def test_periodic_max_concurrency(mem: MemoryBroker) -> None:
    app, _ = make_app(mem)
    running = 0
    most = 0

    @app.run_every(1, max_concurrency=2)
    async def slow(app: App) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await trio.sleep(3.5)
        running -= 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await trio.sleep(10)
            await app.shutdown()
    assert most == 2


async def test_periodic_exception_is_logged_and_schedule_goes_on(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(mem)
    runs = 0

    @app.run_every(1)
    async def flaky(app: App) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("first run fails")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: runs == 3)
            await app.shutdown()
    assert "periodic task" in caplog.text and "flaky" in caplog.text
    assert "ValueError: first run fails" in caplog.text


async def test_shutdown_lets_a_run_finish_within_grace_and_schedules_no_more(
    mem: MemoryBroker,
) -> None:
    app, _ = make_app(mem, grace_period=10)
    events: list[tuple[str, float]] = []

    @app.run_every(1)
    async def job(app: App) -> None:
        events.append(("start", trio.current_time()))
        await trio.sleep(3)
        events.append(("end", trio.current_time()))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: len(events) == 1)
            await app.shutdown()
    assert [kind for kind, _ in events] == ["start", "end"]


async def test_shutdown_cancels_a_run_past_the_grace_period(mem: MemoryBroker) -> None:
    app, _ = make_app(mem, grace_period=2)
    outcome: list[str] = []

    @app.run_every(1)
    async def job(app: App) -> None:
        try:
            await trio.sleep(100)
            outcome.append("finished")
        except trio.Cancelled:
            outcome.append("cancelled")
            raise

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await trio.sleep(1.5)
            stopped_at = trio.current_time()
            await app.shutdown()
            assert trio.current_time() - stopped_at == pytest.approx(2, abs=0.1)
    assert outcome == ["cancelled"]


def test_run_every_validation() -> None:
    app = App(url="memory://unused")
    with pytest.raises(ValueError, match="interval must be a finite duration > 0"):
        app.run_every(0)
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        app.run_every(1, max_concurrency=0)

    def not_async(app: App) -> None:
        pass

    with pytest.raises(TypeError, match="must be an async function"):
        app.run_every(1)(not_async)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="must be an async function"):
        app.on_startup(not_async)  # type: ignore[type-var]


# -- hooks ------------------------------------------------------------------------------


async def test_hooks_run_in_order_around_serving(mem: MemoryBroker) -> None:
    app, seen = make_app(mem)
    order: list[str] = []

    @app.on_startup
    async def first(app: App) -> None:
        order.append(f"startup 1 serving={app.statistics().serving}")
        app.state["db"] = "pool"

    @app.on_startup
    async def second(app: App) -> None:
        order.append("startup 2")

    @app.on_shutdown
    async def close_first(app: App) -> None:
        order.append(f"shutdown 1 handled={app.state.get('handled')}")
        raise RuntimeError("shutdown hook fails")

    @app.on_shutdown
    async def close_second(app: App) -> None:
        order.append("shutdown 2")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            order.append("serving")
            await app.publish(b"x", routing_key="jobs")
            await wait_for(lambda: seen == [b"x"])
            # The state stays writable after startup (the original froze it).
            app.state["late"] = True
            await app.shutdown()
            order.append("stopped")
    assert order == [
        "startup 1 serving=False",
        "startup 2",
        "serving",
        "shutdown 1 handled=1",
        "shutdown 2",
        "stopped",
    ]


async def test_failing_startup_hook_aborts_serve(mem: MemoryBroker) -> None:
    app, _ = make_app(mem)
    ran: list[str] = []

    @app.on_startup
    async def connect_database(app: App) -> None:
        raise ConnectionRefusedError("database is down")

    @app.on_shutdown
    async def never(app: App) -> None:
        ran.append("shutdown")

    with trio.fail_after(60), pytest.raises(StartupError) as info:
        await app.serve()
    assert "startup hook 'test_failing_startup_hook_aborts_serve.<locals>.connect_database'" in (
        str(info.value)
    )
    assert "ConnectionRefusedError: database is down" in str(info.value)
    assert ran == []
    assert app.statistics().consumers == ()


def test_run_exits_1_with_one_line_when_a_startup_hook_fails() -> None:
    script = textwrap.dedent(
        """
        from asyncworker import App

        app = App(url="memory://hooks")

        @app.route(["q"], declare=True)
        async def handler(message):
            pass

        @app.on_startup
        async def load_config(app):
            raise KeyError("SETTING")

        app.run()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "startup hook 'load_config' failed: KeyError: 'SETTING'" in lines[0]


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


def test_state_is_a_plain_dict() -> None:
    app = App(url="memory://unused")
    assert app.state == {}
    app.state["x"] = 1
    logging.getLogger(__name__).debug("state %s", app.state)


async def test_shutdown_during_a_hanging_startup_hook_returns(mem: MemoryBroker) -> None:
    # A startup hook that never returns (a database that does not answer)
    # must not make shutdown() hang, nor serve() fail with trio's
    # "child exited without calling task_status.started()".
    app, _ = make_app(mem)
    in_hook = trio.Event()

    @app.on_startup
    async def connect_database(app: App) -> None:
        in_hook.set()
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.serve)
            await in_hook.wait()
            await app.shutdown()
    assert not app.statistics().serving


async def test_shutdown_right_after_startup_hooks_returns(mem: MemoryBroker) -> None:
    # shutdown() between the startup hooks and the first connection.
    app, _ = make_app(mem)

    @app.on_startup
    async def stop_at_once(app: App) -> None:
        await app.shutdown()  # from inside serve(), before the first connection

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
    assert not app.statistics().serving


async def test_a_shutdown_hook_can_publish(mem: MemoryBroker) -> None:
    # The consumers' connection is closed when shutdown hooks run: a publish
    # there must use a connection of its own, not wait for one that never comes.
    app, _ = make_app(mem, grace_period=30)

    @app.on_shutdown
    async def say_goodbye(app: App) -> None:
        await app.publish(b"bye", routing_key="jobs", timeout=10)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            stopping = trio.current_time()
            await app.shutdown()
            assert trio.current_time() - stopping < 1
    assert [d.body for d in mem.ready_messages("/", "jobs")] == [b"bye"]


def test_sigterm_during_a_hanging_startup_hook_exits_0() -> None:
    script = textwrap.dedent(
        """
        import sys, trio
        from asyncworker import App

        app = App(url="memory://hooks")

        @app.route(["q"], declare=True)
        async def handler(message):
            pass

        @app.on_startup
        async def connect_database(app):
            print("in hook", flush=True)
            await trio.sleep_forever()

        app.run()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "in hook"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()


async def _child_failing_on_cancel() -> None:
    try:
        await trio.sleep_forever()
    finally:
        raise ValueError("cleanup failed")  # what a careless cleanup does


async def test_handler_failing_while_cancelled_at_grace_end_does_not_crash_serve(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # Cancelled at the end of the grace period, the handler's nursery raises
    # BaseExceptionGroup([Cancelled, ValueError]): the ValueError is the
    # handler's and must be logged, not raised out of serve().
    app = App(url=mem.url, grace_period=1)
    running = trio.Event()

    @app.route(["jobs"], declare=True)
    async def handler(message: Message) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_child_failing_on_cancel)
            nursery.start_soon(trio.sleep_forever)
            running.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await app.publish(b"x", routing_key="jobs")
            await running.wait()
            await app.shutdown()
    assert [d.body for d in mem.ready_messages("/", "jobs")] == [b"x"]
    assert "cleanup failed" in caplog.text


async def test_periodic_task_failing_while_cancelled_at_grace_end_does_not_crash_serve(
    mem: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(mem, grace_period=1)
    running = trio.Event()

    @app.run_every(1.0, run_at_start=True)
    async def flush(app: App) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_child_failing_on_cancel)
            nursery.start_soon(trio.sleep_forever)
            running.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await running.wait()
            await app.shutdown()
    assert "cleanup failed" in caplog.text


# -- an App without routes -----------------------------------------------------------------


async def test_an_app_with_only_periodic_tasks_serves(mem: MemoryBroker) -> None:
    # docs/periodic.md's example: no route at all.
    app = App(url=mem.url)
    runs: list[float] = []

    @app.run_every(30)
    async def refresh_cache(app: App) -> None:
        runs.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(app.serve)
        assert app.statistics().serving
        await wait_for(lambda: len(runs) == 3, timeout=100)
        await app.shutdown()
    assert [round(t - start) for t in runs] == [30, 60, 90]
    assert app.statistics().consumers == ()


async def test_an_app_with_only_hooks_serves_until_shutdown(mem: MemoryBroker) -> None:
    app = App(url=mem.url)
    events: list[str] = []

    @app.on_startup
    async def start(app: App) -> None:
        events.append("startup")

    @app.on_shutdown
    async def stop(app: App) -> None:
        events.append("shutdown")

    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        await trio.sleep(3600)  # virtual: it still serves, it did not return
        assert events == ["startup"] and app.statistics().serving
        await app.shutdown()
    assert events == ["startup", "shutdown"]


async def test_an_app_with_nothing_to_serve_says_what_to_add(mem: MemoryBroker) -> None:
    with pytest.raises(RuntimeError, match=r"nothing to serve: add a route \(@app.route"):
        await App(url=mem.url).serve()
