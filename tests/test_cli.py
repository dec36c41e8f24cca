"""The ``asyncworker`` command: demo, run (one and several processes), publish, errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import BROKER_URL, Broker, wait_for

pytestmark = pytest.mark.anyio

COMMAND = [sys.executable, "-m", "asyncworker"]


def run_cli(
    *args: str,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


# -- demo ----------------------------------------------------------------------------


def expected_demo(messages: int) -> dict[str, dict[str, int]]:
    """What the demo must report, from its documented rule (not from its code).

    Odd ids go to demo.orders (Retry, 3 attempts, then demo.orders.dlq), even
    ids to demo.emails (requeue; reject into the DLX).  Ids divisible by 7
    always fail; other ids divisible by 5 fail on their first attempt only.
    """
    result = {}
    for queue, parity in (("demo.orders", 1), ("demo.emails", 0)):
        ids = [i for i in range(1, messages + 1) if i % 2 == parity]
        poison = sum(1 for i in ids if i % 7 == 0)
        once = sum(1 for i in ids if i % 5 == 0 and i % 7 != 0)
        if queue == "demo.orders":
            processed = len(ids) + once + 2 * poison
            numbers = {
                "processed": processed,
                "acked": processed,
                "requeued": 0,
                "retried": once + 2 * poison,
            }
        else:
            processed = len(ids) + once
            numbers = {
                "processed": processed,
                "acked": len(ids) - poison,
                "requeued": once,
                "retried": 0,
            }
        result[queue] = {
            "published": len(ids),
            "ok": len(ids) - poison,
            "dead-lettered": poison,
            **numbers,
        }
    return result


@pytest.mark.parametrize("messages", [200, 57])
def test_demo_exits_zero_with_the_expected_summary(messages: int) -> None:
    args = ["demo"] if messages == 200 else ["demo", "--messages", str(messages)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header_index = next(i for i, line in enumerate(lines) if line.startswith("queue "))
    columns = lines[header_index].split()
    rows = {}
    for line in lines[header_index + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(columns[1:], cells[1:], strict=True))
    expected = expected_demo(messages)
    for queue, numbers in expected.items():
        assert {k: int(rows[queue][k]) for k in numbers} == numbers, queue
        assert float(rows[queue]["ms/message"]) > 0
    assert int(rows["total"]["published"]) == messages
    assert "progress:" in result.stdout
    # Quiet by default: no log lines, no tracebacks.
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""


# -- run: errors ------------------------------------------------------------------------


def test_run_unknown_module_is_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("run", "nosuchmodule:app", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "asyncworker: cannot import module 'nosuchmodule': No module named 'nosuchmodule'\n"
    )


def test_run_missing_attribute_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text("value = 1\n")
    result = run_cli("run", "mod:missing", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "asyncworker: module 'mod' has no attribute 'missing'\n"
    result = run_cli("run", "mod:value", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "mod:value is not an asyncworker App" in result.stderr


def test_run_broken_module_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_dependency_aw\n")
    result = run_cli("run", "broken:app", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "asyncworker: cannot import module 'broken': No module named 'no_such_dependency_aw'\n"
    )


def test_run_mistake_in_the_module_points_at_the_users_line(tmp_path: Path) -> None:
    (tmp_path / "syncworker.py").write_text(
        "from asyncworker import App\n"
        "app = App(url='memory://')\n"
        "@app.route(['q'])\n"
        "def handler(message): ...\n"
    )
    result = run_cli("run", "syncworker", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "handler 'handler' must be an async function" in result.stderr
    assert f"({tmp_path / 'syncworker.py'}, line 3)" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ASYNCWORKER_LOG_FORMAT", "xml"), ("ASYNCWORKER_LOG_LEVEL", "LOUD")],
)
def test_run_bad_log_settings_are_one_clear_line(tmp_path: Path, variable: str, value: str) -> None:
    (tmp_path / "worker.py").write_text(
        "from asyncworker import App\napp = App(url='memory://')\n"
        "@app.route(['q'])\nasync def handler(message): ...\n"
    )
    result = run_cli("run", "worker", cwd=tmp_path, env={variable: value})
    assert result.returncode == 2
    assert result.stderr == f"asyncworker: {variable}={value!r} is not valid: " + (
        "use 'text' or 'json', or unset it\n"
        if variable.endswith("FORMAT")
        else "use DEBUG, INFO, WARNING, ERROR or CRITICAL (or a number), or unset it\n"
    )


def test_run_bad_http_address_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(
        "from asyncworker import App\napp = App(url='memory://')\n"
        "@app.route(['q'])\nasync def handler(message): ...\n"
    )
    result = run_cli("run", "worker", "--http", "8080", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "asyncworker: --http '8080' is not a valid HTTP address: use host:port, "
        "e.g. 127.0.0.1:8080 or 0.0.0.0:9100\n"
    )


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are free on 127.0.0.1 (right now)."""
    import socket

    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


async def test_run_http_serves_health_on_one_port_per_worker(tmp_path: Path) -> None:
    pytest.importorskip("hypercorn")
    (tmp_path / "worker.py").write_text(
        "from asyncworker import App\napp = App(url='memory://')\n"
        "@app.route(['q'], declare=True)\nasync def handler(message): ...\n"
    )
    port = _free_port_pair()
    process = subprocess.Popen(
        [*COMMAND, "run", "worker", "--workers", "2", "--http", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    async def ready(p: int) -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", p)
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
        return answer.startswith(b"HTTP/1.1 200") and b'"ok"' in answer

    try:
        await wait_for(lambda: ready(port), timeout=30, interval=0.1)
        await wait_for(lambda: ready(port + 1), timeout=30, interval=0.1)
        process.send_signal(signal.SIGTERM)
        code = await wait_exit(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr is not None
    assert code == 0, process.stderr.read().decode()


def test_version() -> None:
    from asyncworker import __version__

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"asyncworker {__version__}"


# -- publish ------------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_publish_round_trip(broker: Broker, tmp_path: Path) -> None:
    queue = await broker.declare("cli-publish")
    # The flag wins over the environment (which points nowhere).
    env = {"ASYNCWORKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
    result = await trio.to_thread.run_sync(
        lambda: run_cli(
            "publish",
            queue,
            "hello",
            "--count",
            "5",
            "--header",
            "k=v",
            "--url",
            BROKER_URL,
            env=env,
        )
    )
    assert result.returncode == 0, result.stderr
    assert "5 confirmed" in result.stdout
    assert "guest:guest" not in result.stdout + result.stderr
    body_file = tmp_path / "body.bin"
    body_file.write_bytes(b"\x00binary\xff")
    env = {"ASYNCWORKER_URL": BROKER_URL}
    from_file = await trio.to_thread.run_sync(
        lambda: run_cli("publish", queue, "--file", str(body_file), env=env)
    )
    from_stdin = await trio.to_thread.run_sync(
        lambda: run_cli("publish", queue, env=env, stdin=b"from stdin")
    )
    assert from_file.returncode == from_stdin.returncode == 0, from_file.stderr
    with trio.fail_after(10):
        deliveries = []
        while (delivery := await broker.channel.get(queue, no_ack=True)) is not None:
            deliveries.append(delivery)
    assert [d.body for d in deliveries] == [b"hello"] * 5 + [b"\x00binary\xff", b"from stdin"]
    assert deliveries[0].properties.headers == {"k": "v"}
    assert deliveries[0].properties.delivery_mode == 2


@pytest.mark.rabbitmq
async def test_publish_to_a_missing_queue_fails() -> None:
    result = await trio.to_thread.run_sync(
        lambda: run_cli("publish", "aw-test-no-such-queue-cli", "x", "--url", BROKER_URL)
    )
    assert result.returncode == 1
    assert "0 confirmed" in result.stdout
    assert "no queue named 'aw-test-no-such-queue-cli'" in result.stderr


@pytest.mark.rabbitmq
async def test_publish_to_a_missing_exchange_is_one_clear_line() -> None:
    result = await trio.to_thread.run_sync(
        lambda: run_cli(
            "publish",
            "key",
            "x",
            "--count",
            "5",
            "--exchange",
            "aw-test-no-such-ex",
            "--url",
            BROKER_URL,
        )
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "asyncworker: cannot publish to exchange 'aw-test-no-such-ex' with routing key 'key': "
    )
    assert "no exchange 'aw-test-no-such-ex'" in result.stderr


def test_publish_to_a_memory_url_says_it_needs_rabbitmq() -> None:
    result = run_cli("publish", "orders", "x", "--url", "memory://")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "a memory:// broker lives inside one process" in result.stderr


# -- declare ------------------------------------------------------------------------------


def write_topology(tmp_path: Path, queue: str, exchange: str, queue_type: str) -> None:
    """A module whose App declares a queue bound to a topic exchange, and a dead-letter queue."""
    (tmp_path / "topo.py").write_text(
        textwrap.dedent(
            f"""
            from asyncworker import App, Binding, Exchange, Queue

            app = App(url="amqp://guest:guest@127.0.0.1:1/")
            events = Exchange({exchange!r}, "topic")
            orders = Queue({queue!r}, {queue_type!r}, bindings=[Binding(events, "order.*")])
            app.declare(Queue({queue + ".dlq"!r}))

            @app.route([orders])
            async def handle(message):
                pass
            """
        )
    )


@pytest.mark.rabbitmq
async def test_declare_declares_the_whole_topology_and_exits(
    broker: Broker, tmp_path: Path
) -> None:
    queue, exchange = broker.queue_name("cli-declare"), broker.exchange_name("cli-events")
    write_topology(tmp_path, queue, exchange, "quorum")
    result = await trio.to_thread.run_sync(
        lambda: run_cli("declare", "topo:app", "--url", BROKER_URL, cwd=tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"declared exchange {exchange!r} in vhost '/'",
        # In registration order: app.declare() comes before the route in the module.
        f"declared queue {queue + '.dlq'!r} in vhost '/'",
        f"declared queue {queue!r} in vhost '/'",
        f"declared binding of queue {queue!r} to exchange {exchange!r} with routing key "
        "'order.*' in vhost '/'",
        "4 declaration(s) on amqp://guest:***@127.0.0.1:5672/%2F",
    ]
    # The binding works: what docs/cli.md's `publish --exchange` example needs.
    published = await trio.to_thread.run_sync(
        lambda: run_cli(
            "publish", "order.created", '{"id": 1}', "--exchange", exchange, "--url", BROKER_URL
        )
    )
    assert published.returncode == 0, published.stderr
    assert await broker.count(queue) == 1
    # Declaring again changes nothing and succeeds (deployments run it every time).
    again = await trio.to_thread.run_sync(
        lambda: run_cli("declare", "topo:app", "--url", BROKER_URL, cwd=tmp_path)
    )
    assert again.returncode == 0, again.stderr
    assert await broker.count(queue) == 1


@pytest.mark.rabbitmq
async def test_declare_a_conflict_is_one_line_and_exit_1(broker: Broker, tmp_path: Path) -> None:
    queue = await broker.declare("cli-conflict")  # classic
    exchange = broker.exchange_name("cli-events")
    write_topology(tmp_path, queue, exchange, "quorum")
    result = await trio.to_thread.run_sync(
        lambda: run_cli("declare", "topo:app", "--url", BROKER_URL, cwd=tmp_path)
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"asyncworker: queue {queue!r} in vhost '/' exists with x-queue-type none (not set), "
        "and this App declares 'quorum'"
    ), result.stderr


def test_declare_on_a_memory_url_says_it_needs_rabbitmq(tmp_path: Path) -> None:
    write_topology(tmp_path, "q", "e", "classic")
    result = run_cli("declare", "topo:app", "--url", "memory://", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "a memory:// broker lives inside one process" in result.stderr


# -- run --workers ------------------------------------------------------------------------


def write_worker(tmp_path: Path, queue: str) -> Path:
    """A worker module whose App points nowhere (the test gives the URL) and logs pids."""
    pids = tmp_path / "pids.log"
    (tmp_path / "worker.py").write_text(
        textwrap.dedent(
            f"""
            import os
            import trio
            from asyncworker import App

            app = App(url="amqp://guest:guest@127.0.0.1:1/", prefetch_count=8, grace_period=10)

            @app.route([{queue!r}])
            async def handler(message):
                await trio.sleep(0.02)
                with open({str(pids)!r}, "a") as f:
                    f.write(f"{{os.getpid()}}\\n")
            """
        )
    )
    return pids


def handled_by(pids: Path) -> dict[int, int]:
    if not pids.exists():
        return {}
    counts: dict[int, int] = {}
    for line in pids.read_text().splitlines():
        if line:
            counts[int(line)] = counts.get(int(line), 0) + 1
    return counts


async def wait_exit(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    with trio.fail_after(timeout):
        while process.poll() is None:
            await trio.sleep(0.05)
    return process.returncode


@contextmanager
def started(*args: str, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``asyncworker ARGS`` as a process, killed on the way out if it still runs."""
    process = subprocess.Popen([*COMMAND, *args], **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def terminate(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM ``process``; its exit status once it has exited."""
    process.send_signal(signal.SIGTERM)
    return await wait_exit(process, timeout)


@pytest.mark.rabbitmq
async def test_run_two_workers_share_a_queue_and_sigterm_drains_both(
    broker: Broker, tmp_path: Path
) -> None:
    queue = await broker.declare("cli-workers")
    published = 600
    await broker.publish_many(queue, [b"%d" % i for i in range(published)])
    pids = write_worker(tmp_path, queue)
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [*COMMAND, "run", "worker:app", "--workers", "2", "--log-level", "WARNING"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "ASYNCWORKER_URL": BROKER_URL},  # overrides the App's URL
        )
        try:
            # Both processes get messages (RabbitMQ round-robins between consumers).
            await wait_for(
                lambda: len(handled_by(pids)) == 2 and min(handled_by(pids).values()) >= 20,
                timeout=30,
            )
            process.send_signal(signal.SIGTERM)
            code = await wait_exit(process)
        finally:
            if process.poll() is None:
                process.kill()
    output = stderr.read_text()
    assert code == 0, output
    counts = handled_by(pids)
    assert len(counts) == 2 and process.pid not in counts
    handled = sum(counts.values())
    assert handled < published, "drained before SIGTERM: publish more or slow the handler"
    left = await broker.settled_count(queue, published - handled)
    assert handled + left == published, output
    assert "guest:guest" not in output


@pytest.mark.rabbitmq
async def test_run_reports_a_crashed_worker_and_keeps_the_others(
    broker: Broker, tmp_path: Path
) -> None:
    queue = await broker.declare("cli-crash")
    published = 600
    await broker.publish_many(queue, [b"%d" % i for i in range(published)])
    pids = write_worker(tmp_path, queue)
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [*COMMAND, "run", "worker:app", "--workers", "2", "--url", BROKER_URL],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            await wait_for(lambda: len(handled_by(pids)) == 2, timeout=30)
            victim, survivor = sorted(handled_by(pids))
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: "was killed by signal SIGKILL" in stderr.read_text())
            # The other worker goes on consuming.
            before = handled_by(pids)[survivor]
            await wait_for(lambda: handled_by(pids)[survivor] >= before + 20)
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            code = await wait_exit(process)
        finally:
            if process.poll() is None:
                process.kill()
    output = stderr.read_text()
    assert code == 1, output  # not every worker ended cleanly
    assert re.search(
        rf"worker \d \(pid {victim}\) was killed by signal SIGKILL; the other workers keep "
        "running",
        output,
    ), output
    # At least once: the killed worker's unacked messages were redelivered.
    handled = sum(handled_by(pids).values())
    left = await broker.count(queue)
    assert handled + left >= published


# -- run: exit statuses, app.run() at import --------------------------------------------


STUCK_WORKER = """
import trio
from asyncworker import App

app = App(url="memory://stuck", grace_period=0.2)

@app.on_startup
async def feed(app):
    await app.declare_queue("jobs")
    await app.publish(b"x", routing_key="jobs")

@app.route(["jobs"])
async def handler(message):
    print("handling", flush=True)
    await trio.sleep_forever()

app.run()  # as in `python worker.py`: skipped under `asyncworker run`
"""


async def test_run_skips_app_run_at_import_and_exits_3_when_the_grace_period_cancelled(
    tmp_path: Path,
) -> None:
    (tmp_path / "stuck.py").write_text(STUCK_WORKER)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with started("run", "stuck:app", cwd=tmp_path, **pipes) as process:
        assert process.stdout is not None and process.stderr is not None
        line = await trio.to_thread.run_sync(process.stdout.readline)
        assert line == b"handling\n"
        code = await terminate(process)
    stderr = process.stderr.read().decode()
    assert code == 3, stderr
    warnings = [line for line in stderr.splitlines() if "ignoring app.run()" in line]
    assert warnings == [
        "asyncworker: ignoring app.run() (stuck.py, line 17) while `asyncworker run` imports "
        "'stuck': the command runs the App itself; keep app.run() under "
        "if __name__ == '__main__': to silence this"
    ]
    # Served once: one serving line, one stopped line.
    assert stderr.count("serving 1 queue(s): 'jobs' in vhost '/'") == 1, stderr
    assert (
        stderr.count(
            "stopped: 0 handler(s) in flight at shutdown finished, the grace period cancelled 1"
        )
        == 1
    ), stderr
