"""Test infrastructure: the anyio plugin on trio, the real RabbitMQ, the test cluster.

Tests marked ``rabbitmq`` need a broker on 127.0.0.1:5672 (guest/guest).
Tests marked ``cluster`` need the 3-node cluster that ``.ci/cluster up``
starts (127.0.0.1:5681-5683, see docs/development.md). When what a test needs
does not answer, it is skipped on a developer's machine, and it FAILS when
``CI=true`` or ``ASYNCWORKER_REQUIRE_BROKER=1``: CI must never go green by
skipping the tests that matter.

The report header names the ``asyncworker`` the suite imports.  CI runs the
suite a second time against the installed wheel with
``ASYNCWORKER_TEST_INSTALLED=1``: then the run stops at once unless that
``asyncworker`` is the one in the interpreter's site-packages, so that a
source tree on ``sys.path`` can never stand in for what users install.

Fixtures shared by the suite:

* ``broker``: a ``Broker`` helper on the real RabbitMQ (vhost ``/``);
* ``mem``: a fresh ``MemoryBroker``, registered so that its ``url`` reaches it;
* ``backend``: the contract suite's broker (``tests/contract/``), once per
  backend: ``memory`` and ``rabbitmq`` (that parameter carries the
  ``rabbitmq`` mark, so it skips or fails as above).  Both must answer alike;
* ``spans``: an OpenTelemetry SDK tracer provider of the test's own, whose
  finished spans an in-memory exporter keeps (the global provider is never
  set: it can be set only once per process).
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import socket
import subprocess
import sysconfig
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import asyncworker
from asyncworker import App
from asyncworker._transports import Channel, Connection, ConnectionParams, Properties, connect
from asyncworker._transports.memory import MemoryBroker, register_broker, unregister_broker

BROKER_HOST = os.environ.get("ASYNCWORKER_TEST_HOST", "127.0.0.1")
BROKER_PORT = int(os.environ.get("ASYNCWORKER_TEST_PORT", "5672"))
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/"
REQUIRE_BROKER = (
    os.environ.get("CI", "").lower() == "true"
    or os.environ.get("ASYNCWORKER_REQUIRE_BROKER") == "1"
)


def pytest_report_header() -> str:
    return f"asyncworker: {asyncworker.__file__}"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("ASYNCWORKER_TEST_INSTALLED") != "1":
        return
    imported = Path(asyncworker.__file__).resolve()
    installed = {Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}
    if not any(imported.is_relative_to(site) for site in installed):
        raise pytest.UsageError(
            f"ASYNCWORKER_TEST_INSTALLED=1, but asyncworker was imported from {imported}, "
            f"not from site-packages ({', '.join(map(str, sorted(installed)))}): run the suite "
            "from a directory without the source tree, e.g. a copy of tests/"
        )


CONTRACT_SUITE = Path(__file__).parent / "contract"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test in the contract suite that does not take ``backend`` would run on
    # one broker only while claiming both answer alike.
    stray = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(CONTRACT_SUITE)
        and "backend" not in getattr(item, "fixturenames", ())
    ]
    if stray:
        raise pytest.UsageError(
            "tests/contract/ runs every test once per backend, and these do not take the "
            f"`backend` fixture: {', '.join(stray)}; give them `backend: Backend`, or move "
            "them out of tests/contract/"
        )


_BROKER_UP: bool | None = None


def broker_up() -> bool:
    global _BROKER_UP
    if _BROKER_UP is None:
        _BROKER_UP = _answers(BROKER_HOST, BROKER_PORT)
    return _BROKER_UP


#: The test cluster's script, and its nodes' AMQP ports (the script reads the same variable).
CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "cluster"
CLUSTER_PORT = int(os.environ.get("ASYNCWORKER_CLUSTER_PORT", "5681"))
CLUSTER_NODES = (1, 2, 3)
CLUSTER_URLS = tuple(f"amqp://guest:guest@127.0.0.1:{CLUSTER_PORT + n - 1}/" for n in CLUSTER_NODES)

_CLUSTER_UP: bool | None = None


def cluster_up() -> bool:
    """Whether every node of the test cluster answered when the session first asked."""
    global _CLUSTER_UP
    if _CLUSTER_UP is None:
        _CLUSTER_UP = all(_answers("127.0.0.1", CLUSTER_PORT + n - 1) for n in CLUSTER_NODES)
    return _CLUSTER_UP


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("rabbitmq") is not None and not broker_up():
        _missing(f"no RabbitMQ answers on {BROKER_HOST}:{BROKER_PORT}", "start one")
    if item.get_closest_marker("cluster") is not None and not cluster_up():
        ports = f"{CLUSTER_PORT}-{CLUSTER_PORT + len(CLUSTER_NODES) - 1}"
        _missing(f"no RabbitMQ test cluster answers on 127.0.0.1:{ports}", "run .ci/cluster up")


def _missing(reason: str, remedy: str) -> None:
    if REQUIRE_BROKER:
        pytest.fail(f"{reason}, and CI=true / ASYNCWORKER_REQUIRE_BROKER=1 require it")
    pytest.skip(f"{reason} ({remedy}, or set CI=true to make this a failure)")


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


def unique(prefix: str = "q") -> str:
    """A queue/vhost name no other test (or test run) uses."""
    return f"aw-test-{prefix}-{uuid.uuid4().hex[:10]}"


class Broker:
    """Direct access to the test broker through the transport seam: declare,
    publish, count, clean up.  Everything it declares is deleted afterwards."""

    def __init__(self, connection: Connection, channel: Channel, url: str) -> None:
        self.connection = connection
        self.channel = channel
        self.url = url
        self.declared: list[str] = []
        self.exchanges: list[str] = []

    def queue_name(self, prefix: str = "q") -> str:
        name = unique(prefix)
        self.declared.append(name)
        return name

    def exchange_name(self, prefix: str = "ex") -> str:
        """A unique exchange name, deleted after the test (declare it or let an App)."""
        name = unique(prefix)
        self.exchanges.append(name)
        return name

    async def declare_exchange(self, prefix: str = "ex", kind: str = "direct") -> str:
        name = self.exchange_name(prefix)
        await self.channel.exchange_declare(name, kind, durable=True)
        return name

    async def declare(self, prefix: str = "q", **arguments: Any) -> str:
        name = self.queue_name(prefix)
        await self.channel.queue_declare(name, durable=True, arguments=arguments or None)
        return name

    async def declare_quorum(self, prefix: str = "qq", **arguments: Any) -> str:
        """Declare a quorum queue (replicated on every node of a cluster)."""
        return await self.declare(prefix, **{"x-queue-type": "quorum", **arguments})

    async def declare_dead_lettered(self, prefix: str = "q") -> tuple[str, str]:
        """A queue whose dead-letter exchange routes to ``<queue>.dlq``: ``(queue, dlq)``."""
        queue = self.queue_name(prefix)
        dlq = f"{queue}.dlq"  # deleted with the queue
        await self.channel.queue_declare(dlq, durable=True)
        await self.channel.queue_declare(
            queue,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq},
        )
        return queue, dlq

    async def publish(
        self, queue: str, body: bytes, *, headers: dict[str, Any] | None = None, **props: Any
    ) -> None:
        await self.channel.publish(
            body,
            routing_key=queue,
            properties=Properties(delivery_mode=2, headers=headers, **props),
        )

    async def publish_many(self, queue: str, bodies: list[bytes]) -> None:
        async with trio.open_nursery() as nursery:
            for body in bodies:
                nursery.start_soon(self.publish, queue, body)

    async def count(self, queue: str) -> int:
        """Ready messages in ``queue`` (unacked ones are not counted)."""
        info = await self.channel.queue_declare(queue, passive=True)
        return info.message_count

    async def settled_count(self, queue: str, expected: int, timeout: float = 10.0) -> int:
        """The ready count of ``queue`` once it equals ``expected`` (or after ``timeout``).

        RabbitMQ requeues a closed channel's messages asynchronously, so right
        after a consumer closed, the count may still be on its way.
        """
        with trio.move_on_after(timeout):
            while await self.count(queue) != expected:
                await trio.sleep(0.02)
        return await self.count(queue)

    async def drain(self, queue: str) -> list[bytes]:
        bodies = []
        while (delivery := await self.channel.get(queue, no_ack=True)) is not None:
            bodies.append(delivery.body)
        return bodies


@asynccontextmanager
async def open_broker(url: str = BROKER_URL, vhost: str | None = None) -> AsyncIterator[Broker]:
    """A ``Broker`` on ``url`` (on ``vhost``, if given, instead of the URL's)."""
    overrides: dict[str, Any] = {} if vhost is None else {"vhost": vhost}
    params = ConnectionParams.from_url(url, **overrides)
    async with connect(params) as connection:
        channel = await connection.channel()
        await channel.confirm_select()
        broker = Broker(connection, channel, url)
        try:
            yield broker
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                cleanup = channel if channel.is_open else await connection.channel()
                await delete_queues(connection, cleanup, broker.declared)
                await delete_exchanges(connection, broker.exchanges)


async def delete_queues(connection: Connection, channel: Channel, names: list[str]) -> None:
    """Delete the queues ``names`` and their ``.dlq``; a channel that an error
    closed (a queue already gone) is replaced."""
    for name in names:
        for suffix in ("", ".dlq"):
            try:
                await channel.queue_delete(name + suffix)
            except Exception:
                if not channel.is_open:
                    channel = await connection.channel()


async def delete_exchanges(connection: Connection, names: list[str]) -> None:
    """Delete the exchanges ``names`` (a missing one is no error)."""
    if not names:
        return
    channel = await connection.channel()
    for name in names:
        await channel.exchange_delete(name)
    await channel.close()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """A confirm-mode channel on the real broker's vhost ``/``."""
    async with open_broker() as b:
        yield b


@pytest.fixture
def mem() -> Iterator[MemoryBroker]:
    """A fresh ``MemoryBroker`` under a name of its own (``mem.url`` reaches it)."""
    broker = MemoryBroker()
    name = register_broker(broker)
    try:
        yield broker
    finally:
        unregister_broker(name)


@dataclass
class Backend:
    """The broker a contract test runs on: ``memory`` or ``rabbitmq``.

    ``url`` is what the App connects to; ``broker`` talks to the same broker
    through the transport seam (declare, publish, count, get; its
    ``connection`` opens more channels).
    """

    name: str
    url: str
    broker: Broker
    memory: MemoryBroker | None = None

    def app(self, prefetch_count: int = 16, **kwargs: Any) -> App:
        """An App on this backend."""
        return App(url=self.url, prefetch_count=prefetch_count, **kwargs)

    async def consumers(self, queue: str, vhost: str = "/") -> list[tuple[int, bool]]:
        """``(prefetch_count, active)`` of each consumer of ``queue``, as
        ``rabbitmqctl list_consumers`` shows them (sorted, since RabbitMQ lists
        them in no particular order)."""
        if self.memory is not None:
            infos = self.memory.consumers(vhost, queue)
            return sorted((info.prefetch_count, info.active) for info in infos)
        listing = await trio.to_thread.run_sync(
            rabbitmqctl,
            "list_consumers",
            "-q",
            "--no-table-headers",
            "-p",
            vhost,
            "queue_name",
            "prefetch_count",
            "active",
        )
        found = []
        for line in listing.splitlines():
            name, prefetch, active = line.split("\t")
            if name == queue:
                found.append((int(prefetch), active.strip() == "true"))
        return sorted(found)

    async def queue_type(self, queue: str, vhost: str = "/") -> str:
        """``classic`` or ``quorum``, as the broker reports the queue."""
        if self.memory is not None:
            return str(self.memory.queue_arguments(vhost, queue).get("x-queue-type", "classic"))
        listing = await trio.to_thread.run_sync(
            rabbitmqctl, "list_queues", "-q", "--no-table-headers", "-p", vhost, "name", "type"
        )
        for line in listing.splitlines():
            name, kind = line.split("\t")
            if name == queue:
                return kind.strip()
        raise KeyError(f"no queue {queue!r} in vhost {vhost!r}")

    async def close_connections(self, name: str) -> None:
        """Close the broker's connections named ``name``, as an operator would."""
        if self.memory is not None:
            assert self.memory.close_connections(name), f"no connection named {name!r}"
        else:
            await trio.to_thread.run_sync(close_broker_connections, name)

    @contextmanager
    def vhost(self) -> Iterator[str]:
        """A fresh vhost on this backend (guest may use it), deleted afterwards."""
        if self.memory is not None:
            name = unique("vhost")
            self.memory.add_vhost(name)
            yield name  # the memory broker goes away with the test
        else:
            with rabbitmq_vhost() as name:
                yield name


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each contract test once on a private memory broker, once on RabbitMQ."""
    if request.param == "memory":
        mem: MemoryBroker = request.getfixturevalue("mem")
        async with open_broker(mem.url) as broker:
            yield Backend("memory", mem.url, broker, mem)
    else:
        async with open_broker(BROKER_URL) as broker:
            yield Backend("rabbitmq", BROKER_URL, broker)


@dataclass
class Spans:
    """A tracer provider of one test and the spans it finished."""

    provider: Any
    exporter: Any

    def finished(self, kind: str | None = None) -> list[Any]:
        """The finished spans (``ReadableSpan``), oldest first; only of ``kind``
        (``"CONSUMER"``, ``"PRODUCER"``) if given."""
        spans = list(self.exporter.get_finished_spans())
        return [s for s in spans if kind is None or s.kind.name == kind]


@pytest.fixture
def spans() -> Iterator[Spans]:
    """A ``TracerProvider`` of this test's own, with an in-memory exporter."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield Spans(provider, exporter)
    finally:
        provider.shutdown()


async def serve_until(app: App, condition: Any, timeout: float = 15) -> None:
    """Serve ``app`` until ``condition()`` holds, then shut it down gracefully."""
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        try:
            await wait_for(condition, timeout=timeout)
        finally:
            await app.shutdown()


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[trio.Nursery]:
    """Run ``app.serve`` in a nursery; shut it down gracefully on the way out."""
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        try:
            yield nursery
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(30):
                await app.shutdown()


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl``; skip (or fail in CI) if it is not available."""
    if shutil.which("rabbitmqctl") is None:
        if REQUIRE_BROKER:
            pytest.fail("rabbitmqctl is needed by this test and is not on PATH")
        pytest.skip("rabbitmqctl is not on PATH")
    result = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def broker_connections(*items: str) -> list[tuple[str, list[str]]]:
    """The broker's connections as ``(connection_name, [items...])``.

    ``items`` are ``rabbitmqctl list_connections`` info items (``pid``,
    ``vhost``, ``state``, ``channels``, ...); connections without a
    ``connection_name`` are left out.
    """
    listing = rabbitmqctl(
        "list_connections", "-q", "--no-table-headers", *items, "client_properties"
    )
    found = []
    for line in listing.splitlines():
        *values, properties = line.split("\t")
        named = re.search(r'\{"connection_name","([^"]*)"\}', properties)
        if named:
            found.append((named.group(1), [value.strip() for value in values]))
    return found


def close_broker_connections(*names: str) -> None:
    """Close the broker's connections whose ``connection_name`` is one of ``names``."""
    listing = broker_connections("pid")
    pids = [pid for named, (pid,) in listing if named in names]
    assert pids, f"no connection named {names!r} in:\n{listing}"
    for pid in pids:
        rabbitmqctl("close_connection", pid, "closed by test")


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A fresh vhost on the real broker with guest allowed, deleted afterwards."""
    name = unique("vhost")
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost on the real broker with guest allowed, deleted afterwards."""
    with rabbitmq_vhost() as name:
        yield name


async def http_get(url: str, path: str) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET over trio (the test needs no HTTP client library)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Wait until ``predicate()`` (sync or async) is true; fail after ``timeout`` s."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(interval)


class Cluster:
    """The test cluster that ``.ci/cluster`` runs: its nodes' URLs, faults to
    inject into a node, and the queues a test declared on it.

    Every fault has its undo (``stop``/``start``, ``kill``/``start``,
    ``freeze``/``thaw``); the ``cluster`` fixture undoes whatever a test left
    (``restore()``) and deletes its queues, whether the test passed or not.
    """

    def __init__(self) -> None:
        self.urls = CLUSTER_URLS
        self.queues: list[str] = []

    def url(self, node: int) -> str:
        """The AMQP URL of ``node`` (1, 2 or 3)."""
        return self.urls[node - 1]

    async def script(self, *args: str, timeout: float = 180) -> str:
        """Run ``.ci/cluster ARGS``; return its output, raise if it fails."""
        with trio.fail_after(timeout):
            result = await trio.run_process(
                ["bash", str(CLUSTER_SCRIPT), *args],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(
                f".ci/cluster {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode().strip()}"
            )
        return result.stdout.decode()

    async def ctl(self, node: int, *args: str) -> str:
        """``rabbitmqctl ARGS`` on ``node``."""
        return await self.script("ctl", str(node), *args)

    async def stop(self, node: int) -> None:
        """``stop_app``: the node closes its clients' connections and stops listening."""
        await self.script("stop", str(node))

    async def start(self, node: int) -> None:
        """Start a stopped or killed node; return once its RabbitMQ runs."""
        await self.script("start", str(node))

    async def kill(self, node: int) -> None:
        """SIGKILL the node's Erlang VM (a crash)."""
        await self.script("kill", str(node))

    async def freeze(self, node: int) -> None:
        """SIGSTOP the node's VM: its sockets stay open, nothing answers."""
        await self.script("freeze", str(node))

    async def thaw(self, node: int) -> None:
        """SIGCONT a frozen node."""
        await self.script("thaw", str(node))

    async def states(self) -> dict[int, str]:
        """Each node's state: ``running``, ``stopped``, ``frozen`` or ``down``."""
        lines = (await self.script("status")).splitlines()
        return {n: line.split("\t")[2] for n, line in zip(CLUSTER_NODES, lines, strict=True)}

    async def wait_healthy(self, timeout: float = 120) -> None:
        """Return once every node runs and sees the others; fail after ``timeout``."""
        await self.script("healthy", str(int(timeout)), timeout=timeout + 60)

    async def restore(self) -> None:
        """Bring every node back (thaw, start), then wait until the cluster is healthy."""
        for node, state in (await self.states()).items():
            if state == "frozen":
                await self.thaw(node)
        # Together: a node that saw the others running when it stopped waits,
        # in start_app, until one of them is back (Mnesia loads its tables from
        # the last node that stopped), so starting them one by one can hang.
        async with trio.open_nursery() as nursery:
            for node, state in (await self.states()).items():
                if state in ("stopped", "down"):
                    nursery.start_soon(self.start, node)
        try:
            await self.wait_healthy(timeout=60)
        except RuntimeError:
            # A node frozen past net_ticktime (60 s) comes back split from the
            # others; pause_minority usually rejoins it, `heal` restarts it if not.
            await self.script("heal", timeout=300)

    def queue_name(self, prefix: str = "qq") -> str:
        """A unique queue name, deleted from the cluster after the test."""
        name = unique(prefix)
        self.queues.append(name)
        return name

    @asynccontextmanager
    async def broker(self, node: int = 1) -> AsyncIterator[Broker]:
        """A confirm-mode channel on ``node``; what it declares, the fixture deletes.

        Leave it before stopping or freezing that node: its connection dies
        with the node.
        """
        async with connect(ConnectionParams.from_url(self.url(node))) as connection:
            channel = await connection.channel()
            await channel.confirm_select()
            broker = Broker(connection, channel, self.url(node))
            broker.declared = self.queues
            yield broker

    async def delete_queues(self) -> None:
        """Delete every queue declared through this object (from any node that runs)."""
        if not self.queues:
            return
        states = await self.states()
        node = next((n for n, state in states.items() if state == "running"), None)
        if node is None:
            return
        with trio.move_on_after(60):
            async with connect(ConnectionParams.from_url(self.url(node))) as connection:
                await delete_queues(connection, await connection.channel(), self.queues)
        self.queues.clear()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """The test cluster, healthy; afterwards every node runs again and the test's queues are gone.

    Use it with ``@pytest.mark.cluster`` (which skips or fails the test when no
    cluster runs).
    """
    the_cluster = Cluster()
    await the_cluster.wait_healthy()
    try:
        yield the_cluster
    finally:
        with trio.CancelScope(shield=True):
            await the_cluster.restore()
            await the_cluster.delete_queues()
