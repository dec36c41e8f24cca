"""The memory broker answers like RabbitMQ at the transport seam: the same
scenarios on both backends, compared with the same expected values."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import pytest
import trio

from asyncworker._transports import Channel, Connection, Delivery, Properties

from ..conftest import Backend, unique, wait_for

pytestmark = pytest.mark.anyio


@dataclass
class Side:
    """Declare, publish and count on a backend's connection, a channel per call."""

    name: str
    conn: Connection
    queues: list[str] = field(default_factory=list)

    async def queue(self, prefix: str, **arguments: object) -> str:
        name = unique(prefix)
        self.queues.append(name)
        ch = await self.conn.channel()
        await ch.queue_declare(name, durable=True, arguments=arguments or None)
        await ch.close()
        return name

    async def publish(self, queue: str, *bodies: bytes, expiration: str | None = None) -> None:
        ch = await self.conn.channel()
        await ch.confirm_select()
        for body in bodies:
            await ch.publish(body, routing_key=queue, properties=Properties(expiration=expiration))
        await ch.close()

    async def ready(self, queue: str) -> int:
        ch = await self.conn.channel()
        info = await ch.queue_declare(queue, passive=True)
        await ch.close()
        return info.message_count


@pytest.fixture
def side(backend: Backend) -> Side:
    """The backend's connection; what the test declares is deleted with ``backend``."""
    return Side(backend.name, backend.broker.connection, backend.broker.declared)


async def _get_all(ch: Channel, queue: str) -> list[Delivery]:
    out = []
    while (d := await ch.get(queue)) is not None:
        out.append(d)
    return out


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_requeue_position_and_redelivered_flag(side: Side, queue_type: str) -> None:
    with trio.fail_after(20):
        queue = await side.queue("requeue", **{"x-queue-type": queue_type})
        await side.publish(queue, *(b"m%d" % i for i in range(6)))
        ch = await side.conn.channel()
        first = [await ch.get(queue) for _ in range(3)]
        assert [d.message_count for d in first if d] == [5, 4, 3]  # basic.get-ok count
        m0, _m1, m2 = first
        assert m0 is not None and m2 is not None
        ch.reject(m2.delivery_tag, requeue=True)
        ch.nack(m0.delivery_tag, requeue=True)
        await ch.close()  # m1 comes back on close
        ch = await side.conn.channel()
        got = await _get_all(ch, queue)
        order = [(d.body, d.redelivered) for d in got]
        if queue_type == "classic":  # back at their original positions
            assert order == [
                (b"m0", True),
                (b"m1", True),
                (b"m2", True),
                (b"m3", False),
                (b"m4", False),
                (b"m5", False),
            ]
        else:
            # RabbitMQ 3.10: a message returned by a closing channel goes to the
            # front, one requeued by reject/nack to the back of the queue.
            assert order == [
                (b"m1", True),
                (b"m3", False),
                (b"m4", False),
                (b"m5", False),
                (b"m2", True),
                (b"m0", True),
            ]
            # basic.get-ok from a quorum queue always carries the count.
            counts = [(d.properties.headers or {}).get("x-delivery-count") for d in got]
            assert counts == [1, 0, 0, 0, 1, 1]
        await ch.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_consumer_requeue_position(side: Side, queue_type: str) -> None:
    with trio.fail_after(20):
        queue = await side.queue("crequeue", **{"x-queue-type": queue_type})
        await side.publish(queue, b"n0", b"n1", b"n2")
        ch = await side.conn.channel()
        await ch.qos(1)
        got: list[Delivery] = []
        await ch.consume(queue, got.append)
        await wait_for(lambda: len(got) == 1)
        ch.reject(got[0].delivery_tag, requeue=True)
        await wait_for(lambda: len(got) == 2)
        first = (got[0].properties.headers or {}).get("x-delivery-count")
        second = (got[1].properties.headers or {}).get("x-delivery-count")
        if queue_type == "classic":  # back to the head: the same message again
            assert [(d.body, d.redelivered) for d in got] == [(b"n0", False), (b"n0", True)]
        else:  # to the back: the next message first
            assert [(d.body, d.redelivered) for d in got] == [(b"n0", False), (b"n1", False)]
            assert (first, second) == (None, None)  # consumers see no count at first
        await ch.close()


async def test_quorum_delivery_count_grows_on_every_return(side: Side) -> None:
    with trio.fail_after(20):
        queue = await side.queue("dcount", **{"x-queue-type": "quorum"})
        await side.publish(queue, b"m")
        seen = []
        for attempt in range(4):
            ch = await side.conn.channel()
            d = await ch.get(queue)
            assert d is not None
            seen.append((d.redelivered, (d.properties.headers or {}).get("x-delivery-count")))
            if attempt % 2:
                ch.nack(d.delivery_tag, requeue=True)
            await ch.close()  # unacked: returned by the close
        assert seen == [(False, 0), (True, 1), (True, 2), (True, 3)]


async def test_prefetch_with_ack_multiple(side: Side) -> None:
    with trio.fail_after(20):
        queue = await side.queue("prefetch")
        await side.publish(queue, *(b"%d" % i for i in range(10)))
        ch = await side.conn.channel()
        await ch.qos(3)
        received: list[Delivery] = []
        await ch.consume(queue, received.append)
        await wait_for(lambda: len(received) == 3)
        assert await side.ready(queue) == 7
        ch.ack(received[1].delivery_tag, multiple=True)  # settles the first two
        await wait_for(lambda: len(received) == 5)
        assert await side.ready(queue) == 5  # exactly two more were delivered
        ch.ack(0, multiple=True)  # tag 0 + multiple: everything outstanding
        await wait_for(lambda: len(received) == 8)
        assert await side.ready(queue) == 2
        assert [d.body for d in received] == [b"%d" % i for i in range(8)]
        await ch.close()
        assert await side.ready(queue) == 5  # the 3 unacked came back


async def test_dead_letter_headers(side: Side) -> None:
    with trio.fail_after(20):
        dlq = await side.queue("dlq")
        queue = await side.queue(
            "dlx", **{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
        )
        await side.publish(queue, b"rejected")
        await side.publish(queue, b"expires", expiration="0")
        ch = await side.conn.channel()
        d = await ch.get(queue)
        assert d is not None and d.body == b"rejected"
        ch.reject(d.delivery_tag, requeue=False)
        await wait_for(lambda: _has(side, dlq, 2), timeout=10)
        dead = await _get_all(ch, dlq)
        assert sorted(d.body for d in dead) == [b"expires", b"rejected"]
        by_body = {d.body: d for d in dead}
        for body, reason in ((b"rejected", "rejected"), (b"expires", "expired")):
            props = by_body[body].properties
            assert props.expiration is None
            headers = props.headers or {}
            (death,) = headers["x-death"]
            assert isinstance(death.pop("time"), datetime.datetime)
            expected = {
                "count": 1,
                "reason": reason,
                "queue": queue,
                "exchange": "",
                "routing-keys": [queue],
            }
            if body == b"expires":
                expected["original-expiration"] = "0"
            assert death == expected
            assert headers["x-first-death-reason"] == reason
            assert headers["x-first-death-queue"] == queue
            assert headers["x-first-death-exchange"] == ""
            assert by_body[body].routing_key == dlq
        await ch.close()


async def _has(side: Side, queue: str, count: int) -> bool:
    return await side.ready(queue) >= count
