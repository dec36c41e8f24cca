"""What only the real RabbitMQ can show: faults, signals, credentials.

Connections killed with ``rabbitmqctl close_connection``, a broker restart,
a deleted queue, SIGTERM under load, publisher confirms across a reconnect,
the connections an App holds, bad credentials, and a shutdown while the
broker is unreachable.  (What every backend must do alike is in
``tests/contract/``.)

Only ``test_nothing_lost_across_connection_kills_and_a_broker_restart``
restarts the broker (``rabbitmqctl stop_app``/``start_app``): it disturbs
every other client of the broker, so nothing else here does.  The "broker
unreachable" case goes through a TCP proxy this file controls instead.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from asyncworker import App, AuthenticationError, Backoff, ConnectionEvent, Message

from .conftest import (
    BROKER_HOST,
    BROKER_PORT,
    BROKER_URL,
    Broker,
    broker_connections,
    close_broker_connections,
    open_broker,
    rabbitmqctl,
    serving,
    unique,
    wait_for,
)

pytestmark = pytest.mark.rabbitmq

FAST_RECONNECT = Backoff(initial=0.05, maximum=0.5, jitter=0.1)


# -- helpers -----------------------------------------------------------------------


async def ctl(*args: str) -> str:
    """``rabbitmqctl`` without blocking the event loop."""
    return await trio.to_thread.run_sync(rabbitmqctl, *args)


async def close_app_connection(name: str) -> None:
    """Close the App's connections: the consumers' one (``connection_name`` is
    ``name``) and, if the App has published, its publishing one."""
    await trio.to_thread.run_sync(close_broker_connections, name, f"{name} (publisher)")


def events_of(events: list[ConnectionEvent], kind: str) -> list[ConnectionEvent]:
    return [e for e in events if e.kind == kind]


async def cleanup(*queues: str) -> None:
    """Delete ``queues`` (and their ``.dlq``) on a fresh connection."""
    with trio.CancelScope(shield=True), trio.move_on_after(10):
        async with open_broker() as broker:
            broker.declared.extend(queues)


class Proxy:
    """A TCP proxy to the broker that the test can cut, or make unreachable.

    ``down()`` drops every proxied connection and refuses new ones (the
    client sees the socket closed during the handshake): to the App, the
    broker is gone, while the real broker and its other clients are untouched.
    """

    def __init__(self) -> None:
        self.port = 0
        #: "forward" to the broker, "refuse" (close at once) or "blackhole"
        #: (accept, then never answer: the client's handshake hangs).
        self.mode = "forward"
        #: Connections accepted in "blackhole" mode, and how many of those the
        #: client closed (it gave up its handshake).
        self.blackholed = 0
        self.hung_up = 0
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def down(self, mode: str = "refuse") -> None:
        """Drop every proxied connection; new ones are handled per ``mode``."""
        self.mode = mode
        for scope in list(self._scopes):
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.mode == "refuse":
            await client.aclose()
            return
        if self.mode == "blackhole":
            self.blackholed += 1
            async with client:
                # Answer nothing; read what the client sends only to see it hang up.
                try:
                    async for _ in client:
                        pass
                except trio.BrokenResourceError:
                    pass
            self.hung_up += 1
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                server = await trio.open_tcp_stream(BROKER_HOST, BROKER_PORT)
                async with client, server, trio.open_nursery() as nursery:
                    nursery.start_soon(_pipe, client, server, nursery.cancel_scope)
                    nursery.start_soon(_pipe, server, client, nursery.cancel_scope)
            finally:
                self._scopes.discard(scope)


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for chunk in src:
            await dst.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


# -- 1. connection kills and a broker restart under load -----------------------------


async def test_nothing_lost_across_connection_kills_and_a_broker_restart() -> None:
    total = 2000
    prefetch = 8
    name = unique("conn")
    async with open_broker() as broker:
        queue = broker.queue_name("restart")
        await broker.channel.queue_declare(queue, durable=True)
        await broker.publish_many(queue, [b"%d" % i for i in range(total)])
        broker.declared.clear()  # the broker restart kills this connection: clean up later

    events: list[ConnectionEvent] = []
    processed: list[int] = []
    app = App(
        url=BROKER_URL,
        prefetch_count=prefetch,
        name=name,
        reconnect=Backoff(initial=0.2, maximum=1.0, jitter=0.1),
        on_connection_event=events.append,
        grace_period=10,
    )

    # Past 1200 messages, handlers wait for the broker restart: rabbitmqctl can
    # take seconds on a busy machine, and the run must not finish before it.
    restarted = trio.Event()

    @app.route([queue])
    async def handler(message: Message) -> None:
        # Slow enough that every fault lands while the worker is mid-load.
        await trio.sleep(random.uniform(0.005, 0.02))
        if len(processed) >= 1200:
            await restarted.wait()
        processed.append(int(message.body))

    def recovered(count: int) -> bool:
        return len(events_of(events, "recovered")) >= count

    try:
        with trio.fail_after(120):
            async with serving(app):
                for fault in range(2):
                    await wait_for(lambda f=fault: len(processed) >= 150 + 400 * f, timeout=30)
                    await close_app_connection(name)
                    await wait_for(lambda fault=fault: recovered(fault + 1), timeout=30)
                await wait_for(lambda: len(processed) >= 1000, timeout=30)
                assert len(set(processed)) < total, "the run finished before the restart"
                try:
                    await ctl("stop_app")
                finally:
                    await ctl("start_app")
                    await ctl("await_startup")
                    restarted.set()
                await wait_for(lambda: recovered(3), timeout=60)
                await wait_for(lambda: len(set(processed)) == total, timeout=60)
                in_queue = 0
                async with open_broker() as fresh:
                    in_queue = await fresh.settled_count(queue, 0)
    finally:
        await cleanup(queue)

    faults = len(events_of(events, "lost"))
    duplicates = len(processed) - len(set(processed))
    assert faults == 3, events
    assert set(processed) == set(range(total))
    assert in_queue == 0
    # At a fault, at most prefetch_count messages are unacknowledged on the
    # dead channel: only those can be delivered (and processed) again.
    assert duplicates <= faults * prefetch, (duplicates, faults)
    assert app.statistics().reconnects == {"/": 3}


# -- 2. SIGTERM under load --------------------------------------------------------------


async def test_sigterm_mid_run_acked_plus_queued_equals_published(
    broker: Broker, tmp_path: Path
) -> None:
    queue = await broker.declare("sigterm")
    published = 2000
    await broker.publish_many(queue, [b"%d" % i for i in range(published)])
    done_log = tmp_path / "done.log"
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import random
            import trio
            from asyncworker import App

            app = App(url={BROKER_URL!r}, prefetch_count=32, grace_period=10)
            out = open({str(done_log)!r}, "a", buffering=1)

            @app.route([{queue!r}])
            async def handler(message):
                await trio.sleep(random.uniform(0.001, 0.005))
                out.write(message.body.decode() + "\\n")

            app.run()
            """
        )
    )
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        await wait_for(lambda: done_log.exists() and done_log.stat().st_size > 2000, timeout=30)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while process.poll() is None:
                await trio.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read().decode() if process.stdout else ""
    assert process.returncode == 0, output
    acked = done_log.read_text().split()
    assert len(acked) == len(set(acked)), "a message was handled twice without a fault"
    assert 0 < len(acked) < published, output
    remaining = await broker.settled_count(queue, published - len(acked))
    assert len(acked) + remaining == published, output
    leftover = {int(body) for body in await broker.drain(queue)}
    assert leftover | {int(x) for x in acked} == set(range(published))


# -- 3. a consumed queue is deleted and re-created --------------------------------------


async def test_deleted_queue_is_consumed_again_once_recreated(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await broker.declare("deleted")
    events: list[ConnectionEvent] = []
    app = App(url=BROKER_URL, prefetch_count=4, on_connection_event=events.append)
    seen: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(40):
        async with serving(app):
            await broker.publish(queue, b"before")
            await wait_for(lambda: seen == [b"before"])
            await ctl("delete_queue", queue)
            await wait_for(lambda: events_of(events, "consumer_cancelled"))
            await broker.channel.queue_declare(queue, durable=True)
            await broker.publish(queue, b"after")
            await wait_for(lambda: seen == [b"before", b"after"], timeout=20)
            assert app.statistics().reconnects == {"/": 0}  # no reconnection involved
    (cancelled,) = events_of(events, "consumer_cancelled")
    assert cancelled.queue == queue
    assert any(
        "cancelled the consumer" in r.getMessage() and queue in r.getMessage()
        for r in caplog.records
    )


async def test_consumer_retries_a_channel_error_without_a_reconnect(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # The queue is exclusive to another connection: consuming it fails with
    # 405 RESOURCE_LOCKED on the consumer's channel while the connection stays
    # open.  The consumer must keep trying, not vanish until the next
    # reconnection.
    queue = unique("locked")
    app = App(url=BROKER_URL, prefetch_count=4)
    seen: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(40):
        async with open_broker() as owner:
            await owner.channel.queue_declare(queue, exclusive=True, durable=False)
            async with serving(app):
                await wait_for(
                    lambda: any("RESOURCE_LOCKED" in r.getMessage() for r in caplog.records)
                )
                await owner.channel.queue_delete(queue)
                await broker.channel.queue_declare(queue, durable=True)
                broker.declared.append(queue)
                await broker.publish(queue, b"fixed")
                await wait_for(lambda: seen == [b"fixed"], timeout=20)
                assert app.statistics().reconnects == {"/": 0}


# -- 4. publishing across a fault ----------------------------------------------------------------


async def test_publish_in_flight_across_a_connection_kill_is_retried(broker: Broker) -> None:
    consumed = await broker.declare("serving")
    target = await broker.declare("target")
    name = unique("pubconn")
    events: list[ConnectionEvent] = []
    app = App(
        url=BROKER_URL, name=name, reconnect=FAST_RECONNECT, on_connection_event=events.append
    )

    @app.route([consumed])
    async def handler(message: Message) -> None:
        pass

    confirmed: list[int] = []

    async def publish_until_recovered() -> None:
        n = 0
        after_recovery = 0
        # Keep many publishes in flight until well after the reconnection.
        while after_recovery < 200:
            async with trio.open_nursery() as nursery:
                for i in range(n, n + 20):
                    nursery.start_soon(publish_one, i)
            n += 20
            if events_of(events, "recovered"):
                after_recovery += 20

    async def publish_one(i: int) -> None:
        await app.publish(b"%d" % i, routing_key=target, timeout=30)
        confirmed.append(i)

    with trio.fail_after(60):
        async with serving(app) as nursery:
            done = trio.Event()

            async def run() -> None:
                await publish_until_recovered()
                done.set()

            nursery.start_soon(run)
            await wait_for(lambda: len(confirmed) >= 200)
            await close_app_connection(name)
            await done.wait()
    assert events_of(events, "recovered")
    stored = {int(body) for body in await broker.drain(target)}
    # At least once: every confirmed publish is there (a publish retried after
    # the connection dropped before its confirm may be there twice).
    assert set(confirmed) <= stored
    assert len(confirmed) == len(set(confirmed))


async def app_connections(name: str) -> list[tuple[str, str]]:
    """``(vhost, connection_name)`` of the broker's connections named after the App ``name``."""
    listing = await trio.to_thread.run_sync(broker_connections, "vhost")
    return sorted((vhost, named) for named, (vhost,) in listing if named.startswith(name))


async def test_publishing_to_another_vhost_keeps_one_connection(broker: Broker, vhost: str) -> None:
    # A handler forwarding to a vhost the App does not consume from: one
    # publishing connection is held for it, not one connection per message.
    source = await broker.declare("forward-src")
    name = unique("forwarder")
    app = App(url=BROKER_URL, name=name)
    async with open_broker(BROKER_URL + vhost) as other:
        target = await other.declare("forward-dst")
        forwarded: list[bytes] = []

        @app.route([source])
        async def forward(message: Message) -> None:
            await app.publish(message.body, routing_key=target, vhost=vhost)
            forwarded.append(message.body)

        with trio.fail_after(30):
            async with serving(app):
                await broker.publish_many(source, [b"%d" % i for i in range(20)])
                await wait_for(lambda: len(forwarded) == 20)
                assert await app_connections(name) == [("/", name), (vhost, f"{name} (publisher)")]
                await app.shutdown()
        assert await other.settled_count(target, 20) == 20
    # Nothing is left open once serve() has returned.
    with trio.fail_after(10):
        while await app_connections(name):
            await trio.sleep(0.1)


# -- 5. credentials ----------------------------------------------------------------------


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


# -- 6. shutdown while the broker is unreachable ---------------------------------------------


async def test_shutdown_during_reconnect_returns_at_once_and_loses_nothing(
    broker: Broker,
) -> None:
    # Everything a shutdown during an outage must not wait for is an hour away:
    # the backoff before the next attempt (the first retry comes at once, so that
    # one attempt fails) and the grace period (the handlers in flight when the
    # connection dropped finish on their own within 50 ms).  shutdown() returning
    # inside fail_after(30) proves it waited for neither, however slow the machine.
    queue = await broker.declare("reconnecting")
    total = 300
    await broker.publish_many(queue, [b"%d" % i for i in range(total)])
    events: list[ConnectionEvent] = []
    processed: list[int] = []
    hour = 3600.0

    async with trio.open_nursery() as proxy_nursery:
        proxy = Proxy()
        await proxy_nursery.start(proxy.serve)
        app = App(
            host="127.0.0.1",
            port=proxy.port,
            prefetch_count=8,
            grace_period=hour,
            # Delays 0.05 s, then an hour.
            reconnect=Backoff(initial=0.05, maximum=hour, factor=hour / 0.05, jitter=0),
            on_connection_event=events.append,
        )

        @app.route([queue])
        async def handler(message: Message) -> None:
            await trio.sleep(random.uniform(0.01, 0.05))
            processed.append(int(message.body))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(app.serve)
                await wait_for(lambda: len(processed) >= 50)
                proxy.down()  # connection lost, and the "broker" refuses new ones
                # One attempt failed: the supervisor now sleeps the hour-long backoff.
                await wait_for(lambda: events_of(events, "reconnect_failed"))
                await app.shutdown()
        proxy_nursery.cancel_scope.cancel()
    assert [e.kind for e in events] == ["connected", "lost", "reconnect_failed"]

    # The broker is back (it never left: the proxy cut us off): whatever was
    # not acked is in the queue again.
    rest = App(url=BROKER_URL, prefetch_count=32)

    @rest.route([queue])
    async def finish(message: Message) -> None:
        processed.append(int(message.body))

    with trio.fail_after(30):
        async with serving(rest):
            await wait_for(lambda: set(processed) == set(range(total)))
    assert await broker.settled_count(queue, 0) == 0


async def test_shutdown_while_a_connect_hangs_returns_once_the_grace_period_is_over(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # The reconnection's handshake hangs (the proxy accepts, then answers
    # nothing) and would time out only after an hour: shutdown() returning inside
    # fail_after(20) proves it did not wait for that.  What ended the handshake is
    # the grace period (its log line is there when shutdown() returns), and the
    # App closed that socket instead of leaving it open (the proxy saw it hang up).
    queue = await broker.declare("hanging")
    events: list[ConnectionEvent] = []

    async with trio.open_nursery() as proxy_nursery:
        proxy = Proxy()
        await proxy_nursery.start(proxy.serve)
        app = App(
            host="127.0.0.1",
            port=proxy.port,
            grace_period=1.0,
            connect_timeout=3600,
            reconnect=FAST_RECONNECT,
            on_connection_event=events.append,
        )

        @app.route([queue])
        async def handler(message: Message) -> None:
            pass

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(app.serve)
                proxy.down("blackhole")
                await wait_for(lambda: events_of(events, "lost"))
                await wait_for(lambda: proxy.blackholed > 0)
                await app.shutdown()
            assert any("grace period of 1 s is over" in r.getMessage() for r in caplog.records)
            await wait_for(lambda: proxy.hung_up == proxy.blackholed)
        proxy_nursery.cancel_scope.cancel()
    # The handshake was cancelled, never failed: no attempt is reported after the loss.
    assert [e.kind for e in events] == ["connected", "lost"]
