"""``asyncworker.testing``: the TestClient, on the memory broker, with and without MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from asyncworker import App, Message
from asyncworker.middlewares import AckRequeue, Action, Retry, Timeout
from asyncworker.testing import TestClient

pytestmark = pytest.mark.anyio


def make_app(**kwargs: object) -> App:
    return App(
        url="amqp://guest:s3cret@rabbit.example:5672/",
        prefetch_count=8,
        grace_period=1.0,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_the_readme_example() -> None:
    app = make_app()
    seen: list[dict[str, int]] = []

    @app.route(["orders"], middlewares=[Retry(3)])
    async def handle(message: Message) -> None:
        seen.append(message.json())

    with trio.fail_after(10):
        async with app.test_client() as client:
            await client.publish("orders", b'{"id": 1}')
            await client.wait_until_idle()
            assert client.acked("orders") == 1 and client.queue_size("orders.dlq") == 0
            assert client.requeued("orders") == 0 and client.dead_lettered("orders") == 0
    assert seen == [{"id": 1}]


async def test_the_app_gets_its_url_back_and_is_reusable() -> None:
    app = make_app()
    calls = 0

    @app.route(["q"])
    async def handle(message: Message) -> None:
        nonlocal calls
        calls += 1

    before = app.url
    with trio.fail_after(10):
        for _ in range(2):
            async with TestClient(app) as client:
                assert app.url.startswith("memory://")
                # The App consumes from the client's own broker.
                assert client.broker.consumer_count(app.vhost, "q") == 1
                await client.publish("q", b"x")
                await client.wait_until_idle()
                # A fresh broker every time: nothing carried over.
                assert client.acked("q") == 1
            assert app.url == before
    assert calls == 2
    assert "s3cret" not in before


async def test_requeue_redelivered_and_counters() -> None:
    app = make_app()
    deliveries: list[tuple[bytes, bool]] = []

    @app.route(["work"])
    async def handle(message: Message) -> None:
        deliveries.append((message.body, message.redelivered))
        if message.body == b"flaky" and not message.redelivered:
            raise RuntimeError("first attempt fails")
        if message.body == b"bad":
            await message.reject(requeue=False)

    with trio.fail_after(10):
        async with app.test_client() as client:
            for body in (b"ok", b"flaky", b"bad"):
                await client.publish("work", body)
            await client.wait_until_idle()
            assert sorted(deliveries) == [
                (b"bad", False),
                (b"flaky", False),
                (b"flaky", True),
                (b"ok", False),
            ]
            assert client.acked("work") == 2
            assert client.requeued("work") == 1
            assert client.rejected("work") == 1
            assert client.queue_size("work") == 0
            assert client.messages("work") == []


async def test_queue_arguments_dead_letter_exchange() -> None:
    app = make_app(settlement=AckRequeue(on_exception=Action.REJECT))

    @app.route(["in"])
    async def handle(message: Message) -> None:
        raise ValueError("nope")

    queues = {"in": {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "in.dead"}}
    with trio.fail_after(10):
        async with app.test_client(queues={**queues, "in.dead": None}) as client:
            await client.publish("in", b"m1")
            await client.publish("in", "m2")
            await client.wait_until_idle()
            assert client.rejected("in") == 2
            assert client.dead_lettered("in") == 2
            assert client.messages("in.dead") == [b"m1", b"m2"]


async def test_wait_until_idle_follows_a_handler_that_publishes() -> None:
    app = make_app()
    done: list[int] = []

    @app.route(["first"])
    async def first(message: Message) -> None:
        await trio.sleep(0.01)
        assert message.app is not None
        await message.app.publish(message.body, routing_key="second")

    @app.route(["second"])
    async def second(message: Message) -> None:
        await trio.sleep(0.01)
        done.append(int(message.body))

    with trio.fail_after(10):
        async with app.test_client() as client:
            for i in range(20):
                await client.publish("first", str(i).encode())
            await client.wait_until_idle()
            assert sorted(done) == list(range(20))
            assert client.acked("first") == client.acked("second") == 20


async def test_routes_on_other_vhosts_and_extra_queues() -> None:
    app = make_app()
    seen: list[tuple[str, bytes]] = []

    @app.route(["audit"], vhost="ops")
    async def audit(message: Message) -> None:
        seen.append((message.vhost, message.body))

    with trio.fail_after(10):
        async with app.test_client(queues={"outbox": None}) as client:
            await client.publish("audit", b"a")  # the route's vhost is found by queue name
            await client.publish("outbox", b"o")
            await client.wait_until_idle()
            assert seen == [("ops", b"a")]
            assert client.messages("outbox") == [b"o"]
            assert client.acked("audit", vhost="ops") == 1
            assert client.queue_size("no-such-queue") == 0


async def test_an_assertion_in_the_block_propagates_as_itself() -> None:
    app = make_app()

    @app.route(["q"])
    async def handle(message: Message) -> None:
        pass

    with trio.fail_after(10), pytest.raises(AssertionError, match="boom"):
        async with app.test_client():
            raise AssertionError("boom")
    assert not app.statistics().serving


async def test_misuse_is_explained() -> None:
    app = App(url="memory://", prefetch_count=8)

    @app.route(["aw-test-misuse"], declare=True)
    async def handle(message: Message) -> None:
        pass

    client = app.test_client()
    with pytest.raises(RuntimeError, match="async with"):
        await client.publish("aw-test-misuse", b"x")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            with pytest.raises(RuntimeError, match="already serving"):
                async with app.test_client():
                    pass
            await app.shutdown()


def test_mock_clock_runs_retry_delays_and_timeouts_in_virtual_time() -> None:
    # Under an autojumping MockClock, virtual time moves only to the next
    # deadline trio knows of: the retries coming exactly 30 s apart and the
    # redelivery exactly 5 s after the stuck start prove that every wait runs on
    # trio's clock (one on the real clock would not move virtual time, or would
    # let it jump to some other deadline), so a test of them takes no real time.
    app = make_app()
    attempts: list[tuple[int, float]] = []
    starts: list[tuple[bool, float]] = []

    @app.route(["slow"], middlewares=[Retry(3, delay=30)])
    async def flaky(message: Message) -> None:
        attempt = int(message.headers.get("x-asyncworker-attempt", 1))
        attempts.append((attempt, trio.current_time()))
        raise ValueError("always")

    @app.route(["stuck"], middlewares=[Timeout(5)])
    async def stuck(message: Message) -> None:
        starts.append((message.redelivered, trio.current_time()))
        if not message.redelivered:
            await trio.sleep_forever()

    async def test() -> None:
        async with app.test_client() as client:
            await client.publish("slow", b"poison")
            await client.publish("stuck", b"once")
            await client.wait_until_idle()
            assert client.dead_lettered("slow") == 1
            assert client.messages("slow.dlq") == [b"poison"]
            assert client.requeued("stuck") == 1 and client.acked("stuck") == 1

    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [n for n, _ in attempts] == [1, 2, 3]
    first, second, third = (at for _, at in attempts)
    assert second - first == pytest.approx(30) and third - second == pytest.approx(30)
    assert [redelivered for redelivered, _ in starts] == [False, True]
    assert starts[1][1] - starts[0][1] == pytest.approx(5)


async def test_memory_url_works_end_to_end_on_the_default_broker() -> None:
    from asyncworker._transports.memory import get_broker

    app = App(url="memory://", prefetch_count=4, grace_period=1.0)
    queue = "aw-test-memory-default"
    handled: list[bytes] = []

    @app.route([queue], declare=True, middlewares=[Retry(2)])
    async def handle(message: Message) -> None:
        if message.body == b"poison":
            raise ValueError("poison")
        handled.append(message.body)

    broker = get_broker()  # what memory:// reaches: one per process
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await app.publish(b"ok", routing_key=queue)
            await app.publish(b"poison", routing_key=queue)
            while not (handled and f"{queue}.dlq" in broker.queue_names()):
                await broker.wait_for_change()
            await app.shutdown()
    assert handled == [b"ok"]
    assert broker.queue_size("/", queue) == 0
    assert [d.body for d in broker.ready_messages("/", f"{queue}.dlq")] == [b"poison"]
    assert broker.stats("/", queue).acked == 3  # ok, then both attempts of poison
