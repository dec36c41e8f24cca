"""Direct tests of the in-memory broker (``asyncworker._transports.memory``) through the seam."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio
import trio.testing

from asyncworker._exceptions import (
    ChannelClosed,
    ConnectError,
    ConnectionClosed,
    ExchangeNotFound,
    PublishNacked,
    QueueNotFound,
    Unroutable,
)
from asyncworker._transports import (
    Channel,
    Connection,
    ConnectionParams,
    Delivery,
    Properties,
    connect,
)
from asyncworker._transports.memory import (
    MemoryBroker,
    QueueStats,
    get_broker,
    register_broker,
    unregister_broker,
)
from asyncworker._transports.memory import connect as memory_connect

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def opened(broker: MemoryBroker, vhost: str = "/") -> AsyncIterator[Connection]:
    params = ConnectionParams.from_url(broker.url, vhost=vhost)
    async with connect(params) as connection:
        yield connection


class Inbox:
    """Collects deliveries from a consumer; ``next()`` waits for the next one."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Delivery](math.inf)
        self.cancelled: list[str] = []
        self.cancel_event = trio.Event()

    def __call__(self, delivery: Delivery) -> None:
        self.send.send_nowait(delivery)

    def on_cancel(self, tag: str) -> None:
        self.cancelled.append(tag)
        self.cancel_event.set()

    async def next(self) -> Delivery:
        with trio.fail_after(5):
            return await self.receive.receive()

    async def next_untimed(self) -> Delivery:
        """For MockClock tests, where the caller sets the (virtual) deadline."""
        return await self.receive.receive()

    async def take(self, n: int) -> list[Delivery]:
        return [await self.next() for _ in range(n)]

    def pending(self) -> list[Delivery]:
        out = []
        while True:
            try:
                out.append(self.receive.receive_nowait())
            except trio.WouldBlock:
                return out


async def settle() -> None:
    """Let the dispatcher run everything that is ready (no time passes)."""
    await trio.testing.wait_all_tasks_blocked()


async def test_unknown_vhost_is_a_connect_error(mem: MemoryBroker) -> None:
    with pytest.raises(ConnectError, match="'nope'"):
        async with opened(mem, "nope"):
            pass
    mem.add_vhost("nope")
    async with opened(mem, "nope") as conn:
        channel = await conn.channel()
        await channel.queue_declare("q")
    assert mem.queue_names("nope") == ["q"]
    assert mem.queue_names("/") == []


async def test_default_broker_registry() -> None:
    assert get_broker() is get_broker("default")
    async with connect(ConnectionParams.from_url("memory://")) as conn:
        assert conn.is_open
    broker = MemoryBroker()
    name = register_broker(broker, "reg-test")
    try:
        assert get_broker("reg-test") is broker
        assert broker.url == "memory://reg-test"
        with pytest.raises(ValueError):
            register_broker(MemoryBroker(), "reg-test")
    finally:
        unregister_broker(name)
    assert get_broker("reg-test") is not broker
    unregister_broker("reg-test")


async def test_connect_to_a_broker_handed_over_directly() -> None:
    mine = MemoryBroker()  # never registered
    other = MemoryBroker()
    name = register_broker(other)
    try:
        # params.host names a registered broker: broker= wins over it.
        params = ConnectionParams.from_url(f"memory://{name}")
        async with memory_connect(params, broker=mine) as conn:
            ch = await conn.channel()
            await ch.queue_declare("q")
            await ch.confirm_select()
            await ch.publish(b"x", routing_key="q")
        assert mine.queue_size("/", "q") == 1
        assert not other.has_queue("/", "q")
        with pytest.raises(ConnectError, match="'elsewhere'"):
            async with memory_connect(replace(params, vhost="elsewhere"), broker=mine):
                pass
    finally:
        unregister_broker(name)


async def test_queue_inspection(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q", arguments={"x-message-ttl": 60_000})
        await ch.confirm_select()
        await ch.publish(b"a", routing_key="q")
        await ch.publish(b"b", routing_key="q")
        assert mem.has_queue("/", "q")
        assert not mem.has_queue("/", "nope") and not mem.has_queue("no-vhost", "q")
        arguments = mem.queue_arguments("/", "q")
        assert arguments == {"x-message-ttl": 60_000}
        arguments["x-message-ttl"] = 1  # a copy: the queue keeps its own
        assert mem.queue_arguments("/", "q") == {"x-message-ttl": 60_000}
        got = await ch.get("q")
        assert got is not None
        assert mem.queue_size("/", "q") == 1 and mem.unacked_count("/", "q") == 1
        assert [d.body for d in mem.ready_messages("/", "q")] == [b"b"]
        with pytest.raises(KeyError, match="'nope'"):
            mem.queue_arguments("/", "nope")


def test_delayed_messages_next_expiry_and_expire_due() -> None:
    broker = MemoryBroker()

    async def main() -> None:
        params = ConnectionParams.from_url("memory://unused")
        async with memory_connect(params, broker=broker) as conn:
            ch = await conn.channel()
            await ch.queue_declare("work")
            await ch.queue_declare("plain-ttl", arguments={"x-message-ttl": 5_000})
            await ch.publish(b"p", routing_key="plain-ttl")
            # Messages that expire without a dead-letter exchange do not come back.
            assert not broker.has_delayed_messages()
            await ch.queue_declare(
                "delay",
                arguments={
                    "x-message-ttl": 30_000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": "work",
                },
            )
            start = trio.current_time()
            await ch.publish(b"later", routing_key="delay")
            assert broker.next_expiry() == pytest.approx(start + 5)
            assert broker.has_delayed_messages() and broker.has_delayed_messages("/")
            assert not broker.has_delayed_messages("no-such-vhost")
        # No connection is open now to host the broker's timer: nothing expires
        # by itself, even once the deadlines are past...
        await trio.sleep(31)
        assert broker.has_delayed_messages()
        assert broker.next_expiry() == pytest.approx(start + 5)
        # ...until someone runs the due expiries.
        broker.expire_due()
        assert not broker.has_delayed_messages()
        assert broker.next_expiry() is None
        assert [d.body for d in broker.ready_messages("/", "work")] == [b"later"]
        assert broker.stats("/", "plain-ttl").expired == 1

    run_mock(main)


async def test_routing_for_each_exchange_type(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        for q in ("a", "b", "c"):
            await ch.queue_declare(q)
        await ch.exchange_declare("dx", "direct")
        await ch.exchange_declare("fx", "fanout")
        await ch.exchange_declare("tx", "topic")
        await ch.queue_bind("a", "dx", "red")
        await ch.queue_bind("b", "dx", "red")
        await ch.queue_bind("c", "dx", "blue")
        await ch.queue_bind("a", "fx", "ignored")
        await ch.queue_bind("c", "fx")
        await ch.queue_bind("a", "tx", "*.orange.*")
        await ch.queue_bind("b", "tx", "lazy.#")
        await ch.queue_bind("c", "tx", "*.*.rabbit")
        await ch.queue_bind("c", "tx", "lazy.#")  # two matching bindings: one copy

        await ch.publish(b"d1", exchange="dx", routing_key="red")
        await ch.publish(b"d2", exchange="dx", routing_key="blue")
        await ch.publish(b"d3", exchange="dx", routing_key="green")
        await ch.publish(b"f1", exchange="fx", routing_key="whatever")
        await ch.publish(b"t1", exchange="tx", routing_key="quick.orange.rabbit")
        await ch.publish(b"t2", exchange="tx", routing_key="lazy")
        await ch.publish(b"t3", exchange="tx", routing_key="lazy.orange.male.rabbit")
        await ch.publish(b"t4", exchange="tx", routing_key="quick.orange")
        await ch.publish(b"x1", routing_key="b")  # default exchange
        await ch.publish(b"x2", exchange="amq.default", routing_key="a")

        async def bodies(queue: str) -> list[bytes]:
            out = []
            while (d := await ch.get(queue, no_ack=True)) is not None:
                out.append(d.body)
            return out

        assert await bodies("a") == [b"d1", b"f1", b"t1", b"x2"]
        assert await bodies("b") == [b"d1", b"t2", b"t3", b"x1"]
        assert await bodies("c") == [b"d2", b"f1", b"t1", b"t2", b"t3"]


async def test_predeclared_exchanges(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        for name in ("amq.direct", "amq.fanout", "amq.topic"):
            await ch.exchange_declare(name, passive=True)
        await ch.queue_declare("q")
        await ch.queue_bind("q", "amq.topic", "#")
        await ch.publish(b"x", exchange="amq.topic", routing_key="")
        assert mem.queue_size("/", "q") == 1
        assert mem.bindings("/", "q") == [("amq.topic", "#")]
        with pytest.raises(ChannelClosed) as info:
            await ch.exchange_declare("amq.mine", "direct")
        assert info.value.reply_code == 403


async def test_deliveries_fifo_tags_per_channel_from_one(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch1 = await conn.channel()
        ch2 = await conn.channel()
        assert (ch1.channel_id, ch2.channel_id) == (1, 2)
        await ch1.queue_declare("q1")
        await ch1.queue_declare("q2")
        inbox1, inbox2 = Inbox(), Inbox()
        tag = await ch1.consume("q1", inbox1)
        await ch2.consume("q2", inbox2, consumer_tag="mine")
        for i in range(5):
            await ch1.publish(str(i).encode(), routing_key="q1")
            await ch1.publish(str(i).encode(), routing_key="q2")
        got1 = await inbox1.take(5)
        got2 = await inbox2.take(5)
        assert [d.body for d in got1] == [b"0", b"1", b"2", b"3", b"4"]
        assert [d.delivery_tag for d in got1] == [1, 2, 3, 4, 5]
        assert [d.delivery_tag for d in got2] == [1, 2, 3, 4, 5]
        assert {d.consumer_tag for d in got1} == {tag}
        assert tag.startswith("amq.ctag-")
        assert {d.consumer_tag for d in got2} == {"mine"}
        assert not got1[0].redelivered
        assert got1[0].exchange == "" and got1[0].routing_key == "q1"
        assert mem.unacked_count("/", "q1") == 5
        ch1.ack(5, multiple=True)
        ch2.ack(0, multiple=True)  # 0 + multiple: everything
        assert mem.unacked_count("/", "q1") == 0
        assert mem.unacked_count("/", "q2") == 0
        assert mem.stats("/", "q1") == QueueStats(published=5, delivered=5, acked=5)


async def test_prefetch_limits_each_consumer(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        await ch.qos(2)
        inbox = Inbox()
        await ch.consume("q", inbox)
        for i in range(5):
            await ch.publish(str(i).encode(), routing_key="q")
        first = await inbox.take(2)
        await settle()
        assert inbox.pending() == []
        assert mem.queue_size("/", "q") == 3
        assert mem.unacked_count("/", "q") == 2
        ch.ack(first[0].delivery_tag)
        assert (await inbox.next()).body == b"2"
        await settle()
        assert inbox.pending() == []
        # qos applies to consumers started later: this one is unlimited.
        await ch.qos(0)
        unlimited = Inbox()
        await ch.consume("q", unlimited)
        assert [d.body for d in await unlimited.take(2)] == [b"3", b"4"]


async def test_round_robin_between_consumers(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        a, b = Inbox(), Inbox()
        await ch.consume("q", a)
        await ch.consume("q", b)
        for i in range(6):
            await ch.publish(str(i).encode(), routing_key="q")
        assert [d.body for d in await a.take(3)] == [b"0", b"2", b"4"]
        assert [d.body for d in await b.take(3)] == [b"1", b"3", b"5"]


async def test_ack_inside_callback_is_not_reentrant(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        await ch.qos(1)
        depth = 0
        max_depth = 0
        seen: list[bytes] = []
        done = trio.Event()

        def on_delivery(delivery: Delivery) -> None:
            nonlocal depth, max_depth
            depth += 1
            max_depth = max(max_depth, depth)
            seen.append(delivery.body)
            ch.ack(delivery.delivery_tag)  # frees prefetch: must not recurse into us
            depth -= 1
            if len(seen) == 50:
                done.set()

        await ch.consume("q", on_delivery)
        for i in range(50):
            await ch.publish(str(i).encode(), routing_key="q")
        with trio.fail_after(5):
            await done.wait()
        assert max_depth == 1
        assert seen == [str(i).encode() for i in range(50)]


async def test_reject_requeues_to_head_redelivered(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        for body in (b"a", b"b", b"c"):
            await ch.publish(body, routing_key="q")
        first = await ch.get("q")
        second = await ch.get("q")
        assert first is not None and second is not None
        assert first.message_count == 2 and second.message_count == 1
        ch.nack(second.delivery_tag, multiple=True, requeue=True)
        bodies = []
        while (d := await ch.get("q")) is not None:
            bodies.append((d.body, d.redelivered))
            ch.reject(d.delivery_tag, requeue=False)
        assert bodies == [(b"a", True), (b"b", True), (b"c", False)]
        stats = mem.stats("/", "q")
        assert stats.requeued == 2 and stats.rejected == 5 and stats.dead_lettered == 0


async def test_classic_requeue_restores_original_position(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        for body in (b"1", b"2", b"3", b"4"):
            await ch.publish(body, routing_key="q")
        d1, d2, d3 = [await ch.get("q") for _ in range(3)]
        assert d1 is not None and d2 is not None and d3 is not None
        ch.reject(d3.delivery_tag)
        ch.reject(d1.delivery_tag)  # goes before 3: original position
        ch.reject(d2.delivery_tag)
        assert [m.body for m in mem.ready_messages("/", "q")] == [b"1", b"2", b"3", b"4"]
        assert [m.redelivered for m in mem.ready_messages("/", "q")] == [
            True,
            True,
            True,
            False,
        ]


async def test_unacked_requeued_on_channel_close(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        for body in (b"a", b"b"):
            await ch.publish(body, routing_key="q")
        inbox = Inbox()
        await ch.consume("q", inbox)
        await inbox.take(2)
        assert mem.unacked_count("/", "q") == 2
        await ch.close()
        assert not ch.is_open
        assert isinstance(ch.close_reason, ChannelClosed)
        with pytest.raises(ChannelClosed):
            ch.ack(1)
        with pytest.raises(ChannelClosed):
            await ch.get("q")
        assert mem.unacked_count("/", "q") == 0
        assert mem.queue_size("/", "q") == 2
        ch2 = await conn.channel()
        d = await ch2.get("q")
        assert d is not None and d.body == b"a" and d.redelivered
        assert d.delivery_tag == 1


async def test_unacked_requeued_on_connection_close(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        await ch.publish(b"a", routing_key="q")
        inbox = Inbox()
        await ch.consume("q", inbox)
        await inbox.next()
    assert not conn.is_open and not ch.is_open
    assert mem.queue_size("/", "q") == 1
    assert mem.unacked_count("/", "q") == 0
    assert mem.consumer_count("/", "q") == 0
    async with opened(mem) as conn2:
        ch = await conn2.channel()
        d = await ch.get("q", no_ack=True)
        assert d is not None and d.redelivered
        await conn2.aclose()
        assert isinstance(conn2.close_reason, ConnectionClosed)
        with pytest.raises(ConnectionClosed):
            await conn2.channel()
        with trio.fail_after(1):
            await conn2.wait_closed()
            await ch.wait_closed()


async def test_dead_letter_on_reject_with_x_death(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.exchange_declare("dlx", "fanout")
        await ch.queue_declare("dead")
        await ch.queue_bind("dead", "dlx")
        await ch.queue_declare("work", arguments={"x-dead-letter-exchange": "dlx"})
        await ch.publish(
            b"m", routing_key="work", properties=Properties(headers={"k": 1}, message_id="id1")
        )
        d = await ch.get("work")
        assert d is not None
        ch.reject(d.delivery_tag, requeue=False)
        dead = await ch.get("dead", no_ack=True)
        assert dead is not None
        assert dead.body == b"m" and dead.exchange == "dlx" and dead.routing_key == "work"
        headers = dead.properties.headers
        assert headers is not None and headers["k"] == 1
        assert dead.properties.message_id == "id1"
        (death,) = headers["x-death"]
        assert death["queue"] == "work" and death["reason"] == "rejected"
        assert death["count"] == 1 and death["exchange"] == ""
        assert death["routing-keys"] == ["work"]
        assert death["time"].tzinfo is not None
        assert headers["x-first-death-reason"] == "rejected"
        assert headers["x-first-death-queue"] == "work"
        assert mem.stats("/", "work").dead_lettered == 1
        # Dead-lettering again from the same queue for the same reason bumps the count.
        await ch.publish(dead.body, routing_key="work", properties=dead.properties)
        d = await ch.get("work")
        assert d is not None
        ch.reject(d.delivery_tag, requeue=False)
        dead = await ch.get("dead", no_ack=True)
        assert dead is not None and dead.properties.headers is not None
        (death,) = dead.properties.headers["x-death"]
        assert death["count"] == 2


async def test_dead_letter_routing_key_and_missing_dlx(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("parking")
        await ch.queue_declare(
            "work",
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "parking"},
        )
        await ch.queue_declare("lost", arguments={"x-dead-letter-exchange": "missing"})
        await ch.publish(b"1", routing_key="work")
        await ch.publish(b"2", routing_key="lost")
        for q in ("work", "lost"):
            d = await ch.get(q)
            assert d is not None
            ch.nack(d.delivery_tag, requeue=False)
        assert mem.queue_size("/", "parking") == 1
        assert mem.queue_size("/", "lost") == 0
        parked = await ch.get("parking", no_ack=True)
        assert parked is not None and parked.routing_key == "parking"


async def test_quorum_delivery_count_and_limit(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("dlq")
        await ch.queue_declare(
            "qq",
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 2,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "dlq",
            },
        )
        await ch.publish(b"m", routing_key="qq")
        inbox = Inbox()
        await ch.consume("qq", inbox)
        counts = []
        for _ in range(3):
            d = await inbox.next()
            headers = d.properties.headers or {}
            counts.append((d.redelivered, headers.get("x-delivery-count")))
            ch.nack(d.delivery_tag, requeue=True)
        assert counts == [(False, None), (True, 1), (True, 2)]
        await settle()
        assert inbox.pending() == []
        dead = await ch.get("dlq", no_ack=True)
        assert dead is not None and dead.properties.headers is not None
        assert dead.properties.headers["x-death"][0]["reason"] == "delivery_limit"
        # A channel close also counts as a returned delivery.
        await ch.publish(b"n", routing_key="qq")
        assert (await inbox.next()).body == b"n"
        await ch.close()
        ch2 = await conn.channel()
        d2 = await ch2.get("qq")
        assert d2 is not None and d2.properties.headers == {"x-delivery-count": 1}
        with pytest.raises(ChannelClosed) as info:
            await ch2.queue_declare("qq2", durable=False, arguments={"x-queue-type": "quorum"})
        assert info.value.reply_code == 406


async def test_connection_close_returns_each_message_once(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch1 = await conn.channel()
        ch2 = await conn.channel()
        await ch1.queue_declare("qq", arguments={"x-queue-type": "quorum"})
        await ch1.qos(1)
        await ch2.qos(1)
        a, b = Inbox(), Inbox()
        await ch1.consume("qq", a)
        await ch2.consume("qq", b)
        for body in (b"1", b"2", b"3"):
            await ch1.publish(body, routing_key="qq")
        await a.next()
        await b.next()
    assert mem.stats("/", "qq").requeued == 2
    async with opened(mem) as conn:
        ch = await conn.channel()
        got = []
        while (d := await ch.get("qq", no_ack=True)) is not None:
            got.append((d.body, (d.properties.headers or {}).get("x-delivery-count")))
        # basic.get-ok from a quorum queue carries the count even when it is 0
        # (RabbitMQ 3.10; test_broker_parity checks it against the real broker).
        assert got == [(b"1", 1), (b"2", 1), (b"3", 0)]


async def test_missing_queue_and_exchange_are_404(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        cases: list[tuple[type[ChannelClosed], Callable[[Channel], Awaitable[object]]]] = [
            (QueueNotFound, lambda ch: ch.consume("nope", lambda d: None)),
            (QueueNotFound, lambda ch: ch.queue_declare("nope", passive=True)),
            (QueueNotFound, lambda ch: ch.get("nope")),
            (QueueNotFound, lambda ch: ch.queue_purge("nope")),
            (QueueNotFound, lambda ch: ch.queue_bind("nope", "amq.direct")),
            (ExchangeNotFound, lambda ch: ch.exchange_declare("nope", passive=True)),
            (ExchangeNotFound, lambda ch: ch.publish(b"x", exchange="nope")),
        ]
        for kind, case in cases:
            ch = await conn.channel()
            with pytest.raises(kind) as info:
                await case(ch)
            assert info.value.reply_code == 404
            assert "NOT_FOUND" in info.value.reply_text
            assert not ch.is_open
            assert isinstance(ch.close_reason, kind)
            with pytest.raises(kind):
                await ch.queue_declare("other")
        # In confirm mode too; and a bound queue with a missing exchange.
        ch = await conn.channel()
        await ch.confirm_select()
        await ch.queue_declare("q")
        with pytest.raises(ExchangeNotFound, match="no exchange 'nope'"):
            await ch.publish(b"x", exchange="nope")
        ch = await conn.channel()
        with pytest.raises(ExchangeNotFound, match="no exchange 'nope'"):
            await ch.queue_bind("q", "nope")
        assert conn.is_open


async def test_redeclare_with_different_args_is_406(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q", arguments={"x-message-ttl": 1000})
        info = await ch.queue_declare("q", arguments={"x-message-ttl": 1000, "x-other": 1})
        assert info.name == "q" and info.message_count == 0
        with pytest.raises(ChannelClosed) as exc:
            await ch.queue_declare("q", arguments={"x-message-ttl": 2000})
        assert exc.value.reply_code == 406 and "inequivalent arg 'x-message-ttl'" in str(exc.value)
        assert not isinstance(exc.value, QueueNotFound)
        ch = await conn.channel()
        with pytest.raises(ChannelClosed) as exc:
            await ch.queue_declare("q", durable=False, arguments={"x-message-ttl": 1000})
        assert exc.value.reply_code == 406
        ch = await conn.channel()
        await ch.exchange_declare("x", "direct")
        with pytest.raises(ChannelClosed) as exc:
            await ch.exchange_declare("x", "fanout")
        assert exc.value.reply_code == 406


async def test_unknown_delivery_tag_closes_channel_406(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        await ch.publish(b"a", routing_key="q")
        d = await ch.get("q")
        assert d is not None
        ch.ack(d.delivery_tag)
        ch.ack(d.delivery_tag)  # double ack: RabbitMQ closes the channel
        assert not ch.is_open
        reason = ch.close_reason
        assert isinstance(reason, ChannelClosed) and reason.reply_code == 406
        assert "unknown delivery tag 1" in reason.reply_text
        with pytest.raises(ChannelClosed):
            ch.ack(1)
        assert conn.is_open


async def test_queue_delete_cancels_consumers(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        await ch.publish(b"a", routing_key="q")
        await ch.publish(b"b", routing_key="q")
        inbox = Inbox()
        await ch.qos(1)
        tag = await ch.consume("q", inbox, inbox.on_cancel)
        first = await inbox.next()
        assert await ch.queue_delete("q") == 1
        with trio.fail_after(5):
            await inbox.cancel_event.wait()
        assert inbox.cancelled == [tag]
        assert "q" not in mem.queue_names("/")
        ch.ack(first.delivery_tag)  # still a valid tag on this channel
        assert ch.is_open
        assert await ch.queue_delete("q") == 0  # idempotent


async def test_queue_delete_if_unused_if_empty_and_purge(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        await ch.publish(b"a", routing_key="q")
        with pytest.raises(ChannelClosed) as exc:
            await ch.queue_delete("q", if_empty=True)
        assert exc.value.reply_code == 406
        ch = await conn.channel()
        await ch.consume("q", Inbox())
        await ch.publish(b"b", routing_key="q")
        ch2 = await conn.channel()
        with pytest.raises(ChannelClosed):
            await ch2.queue_delete("q", if_unused=True)
        await ch.cancel("unknown")  # an unknown tag is a no-op
        assert await (await conn.channel()).queue_purge("q") == 0  # both were delivered


async def test_cancel_flushes_in_flight_deliveries(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        inbox = Inbox()
        tag = await ch.consume("q", inbox)
        for i in range(3):
            await ch.publish(str(i).encode(), routing_key="q")
        await ch.cancel(tag)
        assert len(inbox.pending()) == 3
        await ch.publish(b"later", routing_key="q")
        await settle()
        assert inbox.pending() == []
        assert mem.queue_size("/", "q") == 1


async def test_confirms_and_unroutable(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.publish(b"x", routing_key="nowhere", mandatory=True)  # no confirms: dropped
        await ch.confirm_select()
        await ch.publish(b"x", routing_key="nowhere")  # not mandatory: fine
        with pytest.raises(Unroutable) as info:
            await ch.publish(b"x", routing_key="nowhere", mandatory=True)
        assert info.value.reply_code == 312
        assert ch.is_open
        await ch.queue_declare(
            "small", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await ch.publish(b"1", routing_key="small", mandatory=True)
        with pytest.raises(PublishNacked):
            await ch.publish(b"2", routing_key="small")
        assert mem.queue_size("/", "small") == 1


async def test_max_length_drop_head_dead_letters(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("overflow")
        await ch.queue_declare(
            "q",
            arguments={
                "x-max-length": 2,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "overflow",
            },
        )
        for body in (b"1", b"2", b"3"):
            await ch.publish(body, routing_key="q")
        assert [m.body for m in mem.ready_messages("/", "q")] == [b"2", b"3"]
        (dropped,) = mem.ready_messages("/", "overflow")
        assert dropped.body == b"1"
        assert dropped.properties.headers is not None
        assert dropped.properties.headers["x-death"][0]["reason"] == "maxlen"


async def test_exclusive_and_server_named_queues(mem: MemoryBroker) -> None:
    async with opened(mem) as conn1, opened(mem) as conn2:
        ch1 = await conn1.channel()
        info = await ch1.queue_declare("", exclusive=True, durable=False)
        assert info.name.startswith("amq.gen-")
        ch2 = await conn2.channel()
        with pytest.raises(ChannelClosed) as exc:
            await ch2.consume(info.name, Inbox())
        assert exc.value.reply_code == 405
        # Publishing to it from another connection is allowed.
        ch2 = await conn2.channel()
        await ch2.publish(b"x", routing_key=info.name)
        assert mem.queue_size("/", info.name) == 1
        await conn1.aclose()
        assert info.name not in mem.queue_names("/")


async def test_auto_delete_queue_goes_with_last_consumer(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("ad", auto_delete=True)
        tag = await ch.consume("ad", Inbox())
        assert "ad" in mem.queue_names()
        await ch.cancel(tag)
        assert "ad" not in mem.queue_names()


async def test_callback_error_closes_connection(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")

        def boom(delivery: Delivery) -> None:
            raise RuntimeError("boom")

        await ch.consume("q", boom)
        await ch.publish(b"x", routing_key="q")
        with trio.fail_after(5):
            await conn.wait_closed()
        assert "boom" in str(conn.close_reason)
    assert mem.queue_size("/", "q") == 1


async def test_wait_until_idle(mem: MemoryBroker) -> None:
    async with opened(mem) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        seen = []

        def handler(delivery: Delivery) -> None:
            seen.append(delivery.body)
            ch.ack(delivery.delivery_tag)

        await ch.consume("q", handler)
        version = mem.version
        for i in range(10):
            await ch.publish(str(i).encode(), routing_key="q")
        assert mem.version > version
        with trio.fail_after(5):
            await mem.wait_until_idle()
        assert len(seen) == 10
        assert mem.is_idle() and mem.is_idle("/")


# -- TTL, under trio's MockClock --------------------------------------------------


def run_mock(test: Callable[[], Awaitable[None]]) -> None:
    """Run ``test`` under an autojumping MockClock.

    Virtual time moves only to the next deadline trio knows of, so a test
    that finds a message expired exactly at its TTL, in virtual time, proves
    the broker's timers run on trio's clock: a timer on the real clock would
    leave virtual time where it was, or let it jump to another deadline.
    """
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_queue_ttl_delay_queue_dead_letters_without_consumer() -> None:
    broker = MemoryBroker()
    name = register_broker(broker)

    async def main() -> None:
        async with opened(broker) as conn:
            ch = await conn.channel()
            await ch.queue_declare("work")
            await ch.queue_declare(
                "delay-30s",
                arguments={
                    "x-message-ttl": 30_000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": "work",
                },
            )
            start = trio.current_time()
            await ch.publish(b"later", routing_key="delay-30s")
            inbox = Inbox()
            await ch.consume("work", inbox)
            with trio.fail_after(31):
                d = await inbox.next_untimed()
            assert trio.current_time() - start == pytest.approx(30)
            assert d.body == b"later" and d.routing_key == "work"
            assert d.properties.headers is not None
            (death,) = d.properties.headers["x-death"]
            assert death["reason"] == "expired" and death["queue"] == "delay-30s"
            assert "original-expiration" not in death
            assert broker.stats("/", "delay-30s").expired == 1
            assert broker.stats("/", "delay-30s").dead_lettered == 1

    try:
        run_mock(main)
    finally:
        unregister_broker(name)


def test_per_message_expiration_dead_letters_and_drops_expiration() -> None:
    broker = MemoryBroker()
    name = register_broker(broker)

    async def main_checked() -> None:
        async with opened(broker) as conn:
            ch = await conn.channel()
            await ch.queue_declare("dead")
            await ch.queue_declare("delay", arguments={"x-dead-letter-exchange": "amq.fanout"})
            await ch.queue_bind("dead", "amq.fanout")
            await ch.queue_declare("plain")
            start = trio.current_time()
            props = Properties(expiration="5000", headers={"n": 1})
            await ch.publish(b"m", routing_key="delay", properties=props)
            await ch.publish(b"p", routing_key="plain", properties=props)
            inbox = Inbox()
            await ch.consume("dead", inbox)
            with trio.fail_after(6):
                d = await inbox.next_untimed()
            assert trio.current_time() - start == pytest.approx(5)
            assert d.properties.expiration is None
            assert d.exchange == "amq.fanout" and d.routing_key == "delay"
            assert d.properties.headers is not None and d.properties.headers["n"] == 1
            (death,) = d.properties.headers["x-death"]
            assert death["reason"] == "expired"
            assert death["original-expiration"] == "5000"
            ch.ack(d.delivery_tag)
            assert broker.queue_size("/", "plain") == 0
            assert broker.stats("/", "plain").expired == 1
            assert broker.stats("/", "plain").dead_lettered == 0

    try:
        run_mock(main_checked)
    finally:
        unregister_broker(name)


def test_expiry_only_at_head_and_requeued_keep_deadline() -> None:
    broker = MemoryBroker()
    name = register_broker(broker)

    async def main() -> None:
        async with opened(broker) as conn:
            ch = await conn.channel()
            await ch.queue_declare("q")
            await ch.publish(b"long", routing_key="q", properties=Properties(expiration="10000"))
            await ch.publish(b"short", routing_key="q", properties=Properties(expiration="1000"))
            await trio.sleep(2)
            # As in RabbitMQ: "short" is behind "long", so it has not expired yet.
            assert broker.queue_size("/", "q") == 2
            await trio.sleep(9)
            assert broker.queue_size("/", "q") == 0
            # A requeued message keeps its original deadline.
            await ch.publish(b"r", routing_key="q", properties=Properties(expiration="1000"))
            d = await ch.get("q")
            assert d is not None
            await trio.sleep(2)
            ch.reject(d.delivery_tag, requeue=True)
            assert broker.queue_size("/", "q") == 0
            assert broker.stats("/", "q").expired == 3

    try:
        run_mock(main)
    finally:
        unregister_broker(name)


def test_ttl_expiry_without_open_connection_via_wait_until_idle() -> None:
    broker = MemoryBroker()
    name = register_broker(broker)

    async def main() -> None:
        async with opened(broker) as conn:
            ch = await conn.channel()
            await ch.queue_declare("q", arguments={"x-message-ttl": 60_000})
            await ch.publish(b"x", routing_key="q")
        start = trio.current_time()
        with trio.fail_after(61):
            await broker.wait_until_idle()
        assert trio.current_time() - start == pytest.approx(60)
        assert broker.stats("/", "q").expired == 1

    try:
        run_mock(main)
    finally:
        unregister_broker(name)


def test_timer_moves_to_another_connection() -> None:
    broker = MemoryBroker()
    name = register_broker(broker)

    async def main() -> None:
        async with opened(broker) as keeper:
            async with opened(broker) as first:
                ch = await first.channel()
                await ch.queue_declare("dlq")
                await ch.queue_declare(
                    "delay",
                    arguments={
                        "x-message-ttl": 10_000,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": "dlq",
                    },
                )
                await ch.publish(b"x", routing_key="delay")
            # The connection hosting the timer is gone; the other one takes over.
            ch = await keeper.channel()
            inbox = Inbox()
            await ch.consume("dlq", inbox)
            with trio.fail_after(11):
                assert (await inbox.next_untimed()).body == b"x"

    try:
        run_mock(main)
    finally:
        unregister_broker(name)


def test_dead_letter_cycle_without_rejection_is_dropped() -> None:
    broker = MemoryBroker()
    name = register_broker(broker)

    async def main() -> None:
        async with opened(broker) as conn:
            ch = await conn.channel()
            await ch.queue_declare(
                "loop",
                arguments={
                    "x-message-ttl": 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": "loop",
                },
            )
            await ch.publish(b"x", routing_key="loop")
            with trio.fail_after(10):
                await broker.wait_until_idle()
            assert broker.stats("/", "loop").expired == 1

    try:
        run_mock(main)
    finally:
        unregister_broker(name)
