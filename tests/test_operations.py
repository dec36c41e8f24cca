"""Health across a dropped connection, settings from the environment, logging, passwords.

(Health and metrics on every backend: ``tests/contract/test_operations.py``.)
"""

from __future__ import annotations

import json
import logging

import pytest
import trio

from asyncworker import App, Backoff, Message
from asyncworker._logging import JsonFormatter

from .conftest import (
    BROKER_URL,
    Broker,
    broker_connections,
    http_get,
    rabbitmqctl,
    unique,
    wait_for,
)


async def health_is(url: str, expected: int) -> bool:
    return (await http_get(url, "/health"))[0] == expected


def connection_pid(name: str) -> str | None:
    pids = [pid for named, (pid,) in broker_connections("pid") if named == name]
    return pids[0] if pids else None


@pytest.mark.rabbitmq
async def test_health_flips_to_503_when_the_connection_drops_and_back(broker: Broker) -> None:
    queue = await broker.declare()
    name = unique("conn")
    app = App(
        url=BROKER_URL,
        name=name,
        http="127.0.0.1:0",
        reconnect=Backoff(initial=0.3, maximum=0.5),
    )

    @app.route([queue])
    async def handler(message: Message) -> None:
        pass

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            url = app.http_url
            assert url is not None
            assert await http_get(url, "/health/live") == (200, b'{"status": "ok"}')
            assert await health_is(url, 200)
            assert (await http_get(url, "/health/ready"))[0] == 200
            assert (await http_get(url, "/nope"))[0] == 404

            pid = await trio.to_thread.run_sync(connection_pid, name)
            assert pid is not None, "the App's connection_name is not visible to rabbitmqctl"
            await trio.to_thread.run_sync(rabbitmqctl, "close_connection", pid, "test drop")
            await wait_for(lambda: health_is(url, 503), timeout=20, interval=0.02)
            assert (await http_get(url, "/health/live"))[0] == 200
            await wait_for(lambda: health_is(url, 200), timeout=30)
            assert app.statistics().reconnects["/"] >= 1
            await app.shutdown()


# -- settings ---------------------------------------------------------------------------


def test_environment_fills_in_what_the_code_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCWORKER_PREFETCH", "7")
    monkeypatch.setenv("ASYNCWORKER_GRACE_PERIOD", "2.5")
    monkeypatch.setenv("ASYNCWORKER_HTTP", "127.0.0.1:9100")
    monkeypatch.setenv("ASYNCWORKER_URL", "amqp://bob:secret@rabbit.example:5673/prod")
    app = App()
    assert (app.prefetch_count, app.grace_period) == (7, 2.5)
    assert app.http == "127.0.0.1:9100"
    assert app.url == "amqp://bob:***@rabbit.example:5673/prod"
    # What the code sets always wins.
    app = App(host="localhost", prefetch_count=3, grace_period=1, http="0.0.0.0:8080")
    assert (app.prefetch_count, app.grace_period) == (3, 1)
    assert app.http == "0.0.0.0:8080"
    assert app.url.startswith("amqp://guest:***@localhost:5672/")
    assert App(url="memory://x").url == "memory://x"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ASYNCWORKER_PREFETCH", "lots"),
        ("ASYNCWORKER_PREFETCH", "0"),
        ("ASYNCWORKER_GRACE_PERIOD", "-1"),
        ("ASYNCWORKER_HTTP", "8080"),
        ("ASYNCWORKER_LOG_LEVEL", "LOUD"),
        ("ASYNCWORKER_LOG_FORMAT", "xml"),
    ],
)
def test_invalid_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from asyncworker._logging import configure_logging

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        App(url="memory://x")
        configure_logging()


# -- logging ----------------------------------------------------------------------------


def test_json_formatter_writes_one_object_per_line_with_extras() -> None:
    record = logging.LogRecord("asyncworker", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.queue = "orders"
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert "\n" not in line
    assert data["message"] == "hello x"
    assert data["level"] == "INFO" and data["logger"] == "asyncworker"
    assert data["queue"] == "orders"


@pytest.mark.rabbitmq
async def test_passwords_never_appear_in_logs(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = unique("user")
    password = "pw-" + unique("secret")
    await trio.to_thread.run_sync(rabbitmqctl, "add_user", user, password)
    try:
        await trio.to_thread.run_sync(
            rabbitmqctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*"
        )
        queue = await broker.declare()
        host_url = BROKER_URL.split("@", 1)[1]
        seen: list[bytes] = []
        app = App(url=f"amqp://{user}:{password}@{host_url}", http="127.0.0.1:0")

        @app.route([queue])
        async def handler(message: Message) -> None:
            seen.append(message.body)
            raise RuntimeError(f"failing handler of {app!r} {app.url}")

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(app.serve)
                await app.publish(b"x", routing_key=queue)
                await wait_for(lambda: len(seen) >= 1)
                await app.shutdown()

        wrong = App(url=f"amqp://{user}:wrong-{password}@{host_url}")
        wrong.route([queue])(handler)
        with trio.fail_after(30), pytest.raises(Exception) as info:
            await wrong.serve()
        assert password not in str(info.value)
    finally:
        await trio.to_thread.run_sync(rabbitmqctl, "delete_user", user)
    assert caplog.records, "the test should have produced log lines"
    for record in caplog.records:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        assert password not in text, text
    assert password not in caplog.text
