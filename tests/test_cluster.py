"""The test cluster itself (``.ci/cluster``, the ``cluster`` fixture), with today's App.

These tests need no failover feature: they prove that the cluster is a real
one (a quorum queue declared through one node is served by the others), that
the faults the fixture injects do what they say, and that the fixture puts
the cluster back whatever a test left it in.
"""

from __future__ import annotations

import pytest
import trio

from asyncworker import App, ChannelClosed, ConnectError, ConnectionClosed, Message
from asyncworker._transports import ConnectionParams, connect

from .conftest import Cluster, wait_for

pytestmark = pytest.mark.cluster


async def test_a_quorum_queue_declared_on_one_node_is_consumed_through_another(
    cluster: Cluster,
) -> None:
    bodies = [b"%d" % i for i in range(200)]
    async with cluster.broker(1) as node1:
        queue = await node1.declare_quorum()
        await node1.publish_many(queue, bodies)
    app = App(url=cluster.url(2), prefetch_count=50)
    handled: list[bytes] = []

    @app.route([queue])
    async def handler(message: Message) -> None:
        handled.append(message.body)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: len(handled) >= len(bodies), timeout=50)
            await app.shutdown()
    assert sorted(handled) == sorted(bodies)  # each exactly once
    (stats,) = app.statistics().consumers
    assert stats.acked == len(bodies) and stats.requeued == 0
    async with cluster.broker(3) as node3:
        assert await node3.settled_count(queue, 0) == 0


async def test_a_node_stopped_then_started_rejoins_and_serves_its_queues_again(
    cluster: Cluster,
) -> None:
    async with cluster.broker(1) as node1:
        queue = await node1.declare_quorum()
        for body in (b"a", b"b", b"c"):  # one by one: in this order in the queue
            await node1.publish(queue, body)
    await cluster.stop(1)
    assert (await cluster.states())[1] == "stopped"
    with pytest.raises(ConnectError, match="connection refused"):
        async with connect(ConnectionParams.from_url(cluster.url(1))):
            pass
    # Two of three replicas are a majority: the queue goes on without node 1,
    # once they elected a leader (until then: 541 "noproc", which closes the
    # whole connection).
    assert await first_message(cluster, 2, queue) == b"a"
    await cluster.start(1)
    await cluster.wait_healthy()
    async with cluster.broker(1) as node1:
        assert await node1.drain(queue) == [b"b", b"c"]


async def test_a_frozen_node_accepts_connections_but_never_answers(cluster: Cluster) -> None:
    await cluster.freeze(3)
    assert (await cluster.states())[3] == "frozen"
    # The kernel still accepts the TCP connection; the handshake never comes.
    with pytest.raises(ConnectError, match="timed out"):
        async with connect(ConnectionParams.from_url(cluster.url(3), connect_timeout=2)):
            pass
    await cluster.thaw(3)
    with trio.fail_after(60):
        async with connect(ConnectionParams.from_url(cluster.url(3))) as connection:
            assert connection.is_open


async def test_restore_brings_back_every_node_whatever_state_it_was_left_in(
    cluster: Cluster,
) -> None:
    await cluster.stop(1)
    await cluster.kill(2)
    await cluster.freeze(3)
    assert await cluster.states() == {1: "stopped", 2: "down", 3: "frozen"}
    await cluster.restore()
    assert await cluster.states() == {1: "running", 2: "running", 3: "running"}
    for node in (1, 2, 3):
        async with cluster.broker(node) as broker:
            queue = await broker.declare_quorum()
            await broker.publish(queue, b"x")
            assert await broker.drain(queue) == [b"x"]


async def first_message(cluster: Cluster, node: int, queue: str) -> bytes | None:
    """``basic.get`` one message of ``queue`` through ``node``, retried while the
    queue has no leader."""
    with trio.fail_after(60):
        while True:
            try:
                async with cluster.broker(node) as broker:
                    delivery = await broker.channel.get(queue, no_ack=True)
                    return None if delivery is None else delivery.body
            except (ChannelClosed, ConnectionClosed):
                await trio.sleep(0.2)
