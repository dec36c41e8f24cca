"""The topology records, their validation, and how an App registers them (no broker needed).

What RabbitMQ 3.10 refuses is refused when the record is built, with an error
that says so; records are frozen, comparable, hashable and reusable; routes
and ``App.declare()`` collect them per vhost and refuse two different records
under one name; a 406 from the broker becomes one line naming the entity, the
argument and both values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio
import trio.testing

from asyncworker import App, Binding, ChannelClosed, Exchange, Message, Queue, TopologyError
from asyncworker._declare import refusal
from asyncworker._topology import dead_letter_queue, delay_queue
from asyncworker._transports.memory import MemoryBroker
from asyncworker.middlewares import Retry

from .conftest import wait_for

pytestmark = pytest.mark.anyio


def app() -> App:
    return App(url="memory://", prefetch_count=16)


# -- records ------------------------------------------------------------------------------


def test_records_are_frozen_comparable_hashable_and_name_first() -> None:
    events = Exchange("events", "topic")
    a = Queue("orders", "quorum", delivery_limit=5, bindings=[Binding(events, "order.*")])
    b = Queue("orders", "quorum", delivery_limit=5, bindings=(Binding(events, "order.*"),))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Queue("orders", "quorum", delivery_limit=6)
    assert (a.name, events.name, a.type, events.type) == ("orders", "events", "quorum", "topic")
    assert dataclasses.fields(Queue)[0].name == "name"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.arguments["x"] = 1  # type: ignore[index]
    assert Queue("q", arguments=None) == Queue("q", arguments={})
    assert Queue("q", arguments={"x-overflow": "reject-publish"}).arguments == {
        "x-overflow": "reject-publish"
    }


def test_each_option_sets_its_argument() -> None:
    dlx = Exchange("orders.dlx", "fanout")
    queue = Queue(
        "orders",
        "quorum",
        delivery_limit=5,
        dead_letter_exchange=dlx,
        dead_letter_routing_key="dead",
        message_ttl=1.5,
        max_length=1000,
        single_active_consumer=True,
        arguments={"x-overflow": "reject-publish"},
    )
    assert queue.amqp_arguments() == {
        "x-overflow": "reject-publish",
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "orders.dlx",
        "x-dead-letter-routing-key": "dead",
        "x-message-ttl": 1500,
        "x-max-length": 1000,
        "x-single-active-consumer": True,
    }
    assert queue.exchanges() == (dlx,)
    # Left at their defaults, options set nothing: what declare=True always declared.
    assert Queue("plain").amqp_arguments() == {}
    assert Queue("prio", max_priority=10).amqp_arguments() == {"x-max-priority": 10}
    assert Queue("dl", dead_letter_exchange="").amqp_arguments() == {"x-dead-letter-exchange": ""}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"type": "classic", "delivery_limit": 3}, ValueError, "quorum queue feature.*406"),
        ({"type": "quorum", "max_priority": 5}, ValueError, "quorum queues refuse x-max-priority"),
        ({"type": "quorum", "exclusive": True}, ValueError, "cannot be exclusive"),
        ({"type": "quorum", "auto_delete": True}, ValueError, "cannot be auto-delete"),
        ({"type": "quorum", "durable": False}, ValueError, "cannot be non-durable"),
        (
            {"type": "quorum", "arguments": {"x-max-priority": 5}},
            ValueError,
            "refuse x-max-priority",
        ),
        ({"type": "stream"}, ValueError, "streams are not supported"),
        ({"type": "lazy"}, ValueError, "'classic' or 'quorum'"),
        ({"max_priority": 0}, ValueError, "between 1 and 255"),
        ({"max_priority": 256}, ValueError, "between 1 and 255"),
        ({"message_ttl": -1}, ValueError, "seconds >= 0"),
        ({"message_ttl": float("inf")}, ValueError, "seconds >= 0"),
        ({"max_length": -1}, ValueError, ">= 0"),
        ({"max_length": True}, TypeError, "must be an int"),
        ({"dead_letter_routing_key": "k"}, ValueError, "needs a dead_letter_exchange"),
        ({"dead_letter_exchange": 3}, TypeError, "Exchange or an exchange name"),
        ({"single_active_consumer": 1}, TypeError, "True or False"),
        ({"bindings": Binding("amq.topic")}, TypeError, "a list of Binding"),
        ({"bindings": ["amq.topic"]}, TypeError, "Binding"),
        (
            {"message_ttl": 5, "arguments": {"x-message-ttl": 1000}},
            ValueError,
            "conflicts with message_ttl=5",
        ),
        (
            {"type": "classic", "arguments": {"x-queue-type": "quorum"}},
            ValueError,
            "conflicts with type='classic'",
        ),
        ({"arguments": {1: "x"}}, TypeError, "non-empty strings"),
    ],
)
def test_what_rabbitmq_refuses_is_refused_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Queue("q", **kwargs)


def test_equal_duplicates_in_arguments_are_accepted() -> None:
    queue = Queue("q", "quorum", message_ttl=2, arguments={"x-message-ttl": 2000})
    assert queue.amqp_arguments()["x-message-ttl"] == 2000
    assert Queue("q", arguments={"x-queue-type": "classic"}).type == "classic"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("",), "non-empty string"),
        (("x", "bogus"), "type must be one of"),
        (("amq.new",), "reserved by RabbitMQ"),
        (("amq.topic", "direct"), "pre-declared by RabbitMQ as a topic"),
    ],
)
def test_exchange_validation(args: tuple[str, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Exchange(*args)


def test_exchange_and_binding_forms() -> None:
    assert Exchange("amq.topic", "topic").type == "topic"
    assert Exchange("delayed", "x-delayed-message").type == "x-delayed-message"
    assert Binding("amq.topic", "a.#").exchange_name == "amq.topic"
    with pytest.raises(ValueError, match="default exchange"):
        Binding("")
    with pytest.raises(ValueError, match="x-match must be one of"):
        Binding(Exchange("h", "headers"), arguments={"x-match": "most"})
    with pytest.raises(ValueError, match=r"amq\."):
        Queue("amq.mine")


def test_siblings_match_the_served_queue() -> None:
    quorum = Queue("orders", "quorum")
    assert dead_letter_queue(quorum, "orders") == Queue("orders.dlq", "quorum")
    assert dead_letter_queue(None, "orders") == Queue("orders.dlq")
    delayed = delay_queue(quorum, "orders", 1500)
    assert delayed.name == "orders.retry.1500"
    assert delayed.amqp_arguments() == {
        "x-queue-type": "quorum",
        "x-message-ttl": 1500,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "orders",
    }
    assert delay_queue(None, "orders", 7).amqp_arguments()["x-message-ttl"] == 7


# -- registration -------------------------------------------------------------------------


async def test_a_route_and_declare_collect_the_topology_in_order(mem: MemoryBroker) -> None:
    worker = App(url=mem.url)
    events, dlx = Exchange("events", "topic"), Exchange("dlx", "fanout")
    orders = Queue("orders", dead_letter_exchange=dlx, bindings=[Binding(events, "order.*")])

    @worker.route([orders, "plain"], declare=True)
    async def handle(message: Message) -> None: ...

    worker.declare(Queue("dead", bindings=[Binding(dlx)]), events)
    worker.declare(Queue("elsewhere"), vhost="other")
    mem.add_vhost("other")
    (route,) = worker.routes
    assert route.queues == ("orders", "plain") and route.declared == (orders,)
    with trio.fail_after(10):
        declared = await worker.declare_topology()
    assert declared == [
        "exchange 'dlx' in vhost '/'",
        "exchange 'events' in vhost '/'",
        "queue 'orders' in vhost '/'",
        "queue 'dead' in vhost '/'",
        "queue 'plain' in vhost '/'",
        "binding of queue 'orders' to exchange 'events' with routing key 'order.*' in vhost '/'",
        "binding of queue 'dead' to exchange 'dlx' in vhost '/'",
        "queue 'elsewhere' in vhost 'other'",
    ]
    assert mem.bindings("/", "dead") == [("dlx", "")]
    assert mem.queue_arguments("/", "orders") == {"x-dead-letter-exchange": "dlx"}
    assert worker.declared_queue("orders") == orders
    assert worker.declared_queue("plain") is None
    assert worker.declared_queue("elsewhere", vhost="other") == Queue("elsewhere")


def test_two_different_records_under_one_name_are_refused() -> None:
    worker = app()
    worker.declare(Queue("orders", "quorum"))
    with pytest.raises(ValueError, match="queue 'orders' in vhost '/' is declared twice"):

        @worker.route([Queue("orders")])
        async def handle(message: Message) -> None: ...

    assert worker.routes == ()  # nothing was registered
    worker.declare(Queue("orders", "quorum"))  # the same record again is fine
    worker.declare(Exchange("events", "topic"))
    with pytest.raises(ValueError, match=r"exchange 'events'.*declared twice"):
        worker.declare(Queue("x", bindings=[Binding(Exchange("events", "fanout"))]))
    with pytest.raises(TypeError, match="pass Queue"):
        worker.declare("orders")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a Binding goes in"):
        worker.declare(Binding("amq.topic"))  # type: ignore[arg-type]


def test_route_prefetch_is_validated_and_bounds_bulk_size() -> None:
    worker = app()
    with pytest.raises(ValueError, match="route\\(\\): prefetch_count must be between"):
        worker.route(["q"], prefetch_count=0)
    with pytest.raises(TypeError, match="prefetch_count must be an int"):
        worker.route(["q"], prefetch_count="8")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="larger than the route's prefetch_count=4"):
        worker.route(["logs"], bulk_size=8, prefetch_count=4)
    # Above the App's prefetch, within the route's: accepted.
    worker.route(["logs"], bulk_size=32, prefetch_count=64)
    with pytest.raises(ValueError, match="same queue twice"):
        worker.route([Queue("a"), "a"])
    with pytest.raises(ValueError, match=r"queue names .* or Queue objects"):
        worker.route([3])  # type: ignore[list-item]


def test_retry_accepts_a_queue_as_its_dead_letter_target() -> None:
    target = Queue("all.dead", "quorum")
    assert Retry(3, dead_letter=target).dead_letter is target
    with pytest.raises(ValueError, match="a Queue"):
        Retry(3, dead_letter="elsewhere")  # type: ignore[arg-type]


# -- the broker's refusals, in one line -----------------------------------------------------


def test_a_406_names_the_entity_the_argument_and_both_values() -> None:
    exc = ChannelClosed(
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'orders' in vhost '/': "
        "received none but current is the value 'quorum' of type 'longstr'",
        406,
    )
    error = refusal(exc, "queue 'orders'", "/")
    assert isinstance(error, TopologyError) and isinstance(error, ChannelClosed)
    assert (error.argument, error.received, error.current) == (
        "x-queue-type",
        "none (not set)",
        "'quorum'",
    )
    assert str(error).startswith(
        "queue 'orders' in vhost '/' exists with x-queue-type 'quorum', and this App declares "
        "none (not set) (PRECONDITION_FAILED - inequivalent arg 'x-queue-type'"
    )
    assert "\n" not in str(error) and "delete it" in str(error)
    exchange = refusal(
        ChannelClosed(
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'events' in vhost '/': "
            "received 'direct' but current is 'topic'",
            406,
        ),
        "exchange 'events'",
        "/",
    )
    assert str(exchange).startswith(
        "exchange 'events' in vhost '/' exists with type 'topic', and this App declares 'direct'"
    )
    denied = refusal(ChannelClosed("ACCESS_REFUSED - no access", 403), "queue 'q'", "/")
    assert denied.argument is None and "configure permission" in str(denied)


# -- on the memory broker, through the test client ------------------------------------------


async def test_the_test_client_lets_the_app_declare_its_quorum_queue() -> None:
    worker = app()
    events = Exchange("events", "topic")
    orders = Queue("orders", "quorum", bindings=[Binding(events, "order.*")])
    seen: list[str] = []

    @worker.route([orders])
    async def handle(message: Message) -> None:
        seen.append(message.routing_key)

    worker.declare(Queue("audit", bindings=[Binding(events, "#")]), vhost="audit")
    with trio.fail_after(10):
        async with worker.test_client() as client:
            channel = await client.channel()
            await channel.publish(b"{}", exchange="events", routing_key="order.created")
            await client.wait_until_idle()
            assert client.broker.queue_arguments("/", "orders") == {"x-queue-type": "quorum"}
            assert client.broker.has_queue("audit", "audit")
    assert seen == ["order.created"]


async def test_a_queue_deleted_while_running_is_declared_again_with_its_bindings() -> None:
    worker = app()
    events = Exchange("events", "topic")
    orders = Queue("orders", bindings=[Binding(events, "order.*")])
    seen: list[bytes] = []

    @worker.route([orders])
    async def handle(message: Message) -> None:
        seen.append(message.body)

    with trio.fail_after(20):
        async with worker.test_client() as client:
            channel = await client.channel()
            await channel.queue_delete("orders")  # the broker cancels the consumer
            await wait_for(
                lambda: (
                    client.broker.has_queue("/", "orders")
                    and client.broker.consumer_count("/", "orders") == 1
                )
            )
            assert client.broker.bindings("/", "orders") == [("events", "order.*")]
            await channel.publish(b"again", exchange="events", routing_key="order.created")
            await client.wait_until_idle()
    assert seen == [b"again"]


async def test_topology_without_a_vhost_follows_the_apps_url(mem: MemoryBroker) -> None:
    mem.add_vhost("other")
    worker = App(url=mem.url)

    @worker.route([Queue("orders")])
    async def handle(message: Message) -> None: ...

    worker.declare(Queue("audit"), vhost="other")
    with trio.fail_after(10):
        assert await worker.declare_topology() == [
            "queue 'orders' in vhost '/'",
            "queue 'audit' in vhost 'other'",
        ]
        # A route without vhost= consumes the URL's vhost as it serves: its
        # Queue objects are declared there, with what declare() put there.
        with worker.reconfigured(url=f"{mem.url}/other"):
            assert worker.declared_queue("orders") == Queue("orders")
            assert await worker.declare_topology() == [
                "queue 'orders' in vhost 'other'",
                "queue 'audit' in vhost 'other'",
            ]
    assert mem.has_queue("other", "orders")
    worker.declare(Queue("orders", "quorum"), vhost="other")
    with (
        worker.reconfigured(url=f"{mem.url}/other"),
        pytest.raises(ValueError, match="queue 'orders' in vhost 'other' is declared twice"),
    ):
        await worker.declare_topology()
