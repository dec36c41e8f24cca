"""The AMQP handshake's failures, and what each is reported as.

A broker refuses credentials with ``connection.close 403`` (we announce the
``authentication_failure_close`` capability, so RabbitMQ does): that is an
``AuthenticationError``, final.  The socket closing anywhere in the handshake,
right after ``start-ok`` included, is a lost connection: a ``ConnectError``,
which reconnecting and ``app.publish`` retry.  The cuts are made by the fake
server (``tests/fakeamqp.py``), alone or relaying to the real broker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import trio
from pamqp import commands
from pamqp import frame as pframe

from asyncworker import App, AuthenticationError, ConnectError, Message
from asyncworker._transports import ConnectionParams, connect

from .conftest import BROKER_HOST, BROKER_PORT, Broker, serving
from .fakeamqp import FakeAMQPServer, Peer, connection_start

pytestmark = pytest.mark.anyio


def _start_ok_of(peer: Peer) -> commands.Connection.StartOk:
    method = peer.read_method()
    assert isinstance(method, commands.Connection.StartOk), method
    return method


async def test_a_cut_right_after_start_ok_is_a_lost_connection_not_bad_credentials() -> None:
    seen: list[commands.Connection.StartOk] = []

    def cut_after_start_ok(peer: Peer) -> None:
        peer.read_protocol_header()
        peer.send_method(0, connection_start())
        seen.append(_start_ok_of(peer))
        peer.close()

    with FakeAMQPServer(cut_after_start_ok) as server:
        params = ConnectionParams(
            host="127.0.0.1", port=server.port, user="guest", password="s3cret-Pa55"
        )
        with trio.fail_after(10), pytest.raises(ConnectError) as info:
            async with connect(params):
                pass
    assert not isinstance(info.value, AuthenticationError), info.value
    assert "lost during authentication" in str(info.value)
    assert "s3cret-Pa55" not in str(info.value)
    # The capability that makes a broker say "refused" (403) instead of
    # dropping the socket is what lets the client tell the two apart.
    (start_ok,) = seen
    capabilities = start_ok.client_properties["capabilities"]
    assert isinstance(capabilities, dict)
    assert capabilities["authentication_failure_close"] is True
    assert not server.errors


@pytest.mark.rabbitmq
async def test_wrong_password_on_rabbitmq_is_an_authentication_error() -> None:
    params = ConnectionParams(
        host=BROKER_HOST, port=BROKER_PORT, user="guest", password="wrong-Pa55word"
    )
    with trio.fail_after(15), pytest.raises(AuthenticationError) as info:
        async with connect(params):
            pass
    text = str(info.value)
    assert "access refused" in text and "wrong-Pa55word" not in text


@pytest.fixture
def cut_first_publisher() -> Iterator[FakeAMQPServer]:
    """A relay to the real broker that cuts the first publishing connection after start-ok.

    Every other connection (the consumers', the second publishing one) is
    relayed to the broker untouched.
    """
    lock = threading.Lock()
    cuts: list[str] = []

    def relay(peer: Peer) -> None:
        broker = Peer.connect(BROKER_HOST, BROKER_PORT)
        broker.send(peer.read_protocol_header())
        read = broker.read_frame()
        assert read is not None
        peer.send(read[2])  # connection.start
        frame = peer.read_frame()
        assert frame is not None
        start_ok = pframe.unmarshal(frame[2])[2]
        assert isinstance(start_ok, commands.Connection.StartOk)
        name = str(start_ok.client_properties["connection_name"])
        with lock:
            cut = name.endswith("(publisher)") and not cuts
            if cut:
                cuts.append(name)
        if cut:
            broker.close()
            peer.close()
            return
        broker.send(frame[2])
        peer.splice(broker)

    with FakeAMQPServer(relay) as server:
        yield server
    assert cuts, "the relay never saw a publishing connection"


@pytest.mark.rabbitmq
async def test_publish_retries_a_connection_cut_right_after_start_ok(
    broker: Broker, cut_first_publisher: FakeAMQPServer
) -> None:
    queue = await broker.declare("cut-start-ok")
    app = App(url=cut_first_publisher.url)

    @app.route([queue])
    async def handler(message: Message) -> None:
        pass

    target = await broker.declare("cut-start-ok-target")
    with trio.fail_after(30):
        async with serving(app):
            # The first publishing connection is cut after start-ok: retried
            # (before, it raised AuthenticationError "wrong user or password?").
            await app.publish(b"through", routing_key=target, timeout=15)
        assert await broker.drain(target) == [b"through"]
    assert cut_first_publisher.connections >= 3  # consumer, the cut one, its retry
