"""Bulk routes on every backend: batches are settled as the handler and the policy say.

(Batching on time, with a virtual clock, is in ``tests/test_bulk.py``.)
"""

from __future__ import annotations

import pytest
import trio

from asyncworker import Message

from ..conftest import Backend, wait_for

pytestmark = pytest.mark.anyio


async def test_batches_are_acked(backend: Backend) -> None:
    broker = backend.broker
    queue = await broker.declare()
    await broker.publish_many(queue, [b"m%d" % i for i in range(10)])
    app = backend.app(prefetch_count=8)
    sizes: list[int] = []

    @app.route([queue], bulk_size=4, bulk_flush_interval=0.2)
    async def handler(messages: list[Message]) -> None:
        sizes.append(len(messages))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: sum(sizes) == 10)
            await app.shutdown()
    assert sizes[:2] == [4, 4] and sum(sizes) == 10
    assert await broker.settled_count(queue, 0) == 0
    consumer = app.statistics().consumers[0]
    assert (consumer.acked, consumer.requeued, consumer.rejected) == (10, 0, 0)


async def test_failing_batch_requeues_only_unsettled_messages(backend: Backend) -> None:
    broker = backend.broker
    queue = await broker.declare()
    await broker.publish_many(queue, [b"m%d" % i for i in range(4)])
    app = backend.app(prefetch_count=8)
    batches: list[list[tuple[bytes, bool]]] = []

    @app.route([queue], bulk_size=4, bulk_flush_interval=0.2)
    async def handler(messages: list[Message]) -> None:
        batches.append([(m.body, m.redelivered) for m in messages])
        if len(batches) == 1:
            by_body = {m.body: m for m in messages}
            await by_body[b"m0"].ack()
            await by_body[b"m1"].reject(requeue=False)
            raise RuntimeError("boom")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await wait_for(lambda: len(batches) == 2)
            await app.shutdown()
    assert sorted(body for body, _ in batches[0]) == [b"m0", b"m1", b"m2", b"m3"]
    # Only the two messages the handler did not settle came back, redelivered.
    assert sorted(batches[1]) == [(b"m2", True), (b"m3", True)]
    assert await broker.settled_count(queue, 0) == 0
    consumer = app.statistics().consumers[0]
    assert (consumer.acked, consumer.requeued, consumer.rejected) == (3, 2, 1)
