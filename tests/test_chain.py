"""The middleware chain and the standard middlewares, at unit level.

A fake channel records settlements: this is chain logic, not delivery
semantics (those are tested against RabbitMQ in test_middlewares_rabbitmq.py).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from asyncworker._chain import CallNext, Middleware, build_chain
from asyncworker._exceptions import HandlerTimeout
from asyncworker._message import Message
from asyncworker._transports import Delivery, Properties
from asyncworker.middlewares import AckRequeue, Action, Logging, Retry, Timeout, Timing

# Marked here (not only by conftest after collection) so that anyio uses this
# module's anyio_backend fixture instead of re-parametrizing every test.
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    # Virtual time: Timeout tests take no wall-clock time.
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


class FakeChannel:
    """Only what Message settlement uses; records every call."""

    def __init__(self) -> None:
        self.is_open = True
        self.calls: list[tuple[str, int, bool | None]] = []

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", delivery_tag, None))

    def reject(self, delivery_tag: int, requeue: bool = True) -> None:
        self.calls.append(("reject", delivery_tag, requeue))


ACKED = [("ack", 1, None)]
REQUEUED = [("reject", 1, True)]
REJECTED = [("reject", 1, False)]


def make_message(
    channel: FakeChannel, body: bytes = b"secret body", headers: dict[str, Any] | None = None
) -> Message:
    delivery = Delivery(
        consumer_tag="ctag",
        delivery_tag=1,
        redelivered=False,
        exchange="",
        routing_key="orders",
        body=body,
        properties=Properties(headers=headers),
    )
    return Message(delivery, queue="orders", vhost="/", channel=channel)  # type: ignore[arg-type]


async def run(
    handler: CallNext,
    *middlewares: Middleware,
    settlement: Middleware | None = None,
    channel: FakeChannel | None = None,
    message: Message | None = None,
) -> FakeChannel:
    """Run one message through settlement -> middlewares -> handler, as App does."""
    channel = channel or FakeChannel()
    message = message or make_message(channel)
    chain = build_chain(handler, [settlement or AckRequeue(), *middlewares])
    await chain(message)
    return channel


async def ok(message: Message) -> None:
    pass


async def fail(message: Message) -> None:
    raise RuntimeError("handler failed")


# -- composition --------------------------------------------------------------------


async def test_order_app_then_route_then_handler() -> None:
    order: list[str] = []

    def tracer(name: str) -> Middleware:
        async def middleware(message: Message, call_next: CallNext) -> Any:
            order.append(f"{name} in")
            try:
                return await call_next(message)
            finally:
                order.append(f"{name} out")

        return middleware

    async def handler(message: Message) -> None:
        order.append("handler")

    app_middlewares = [tracer("app1"), tracer("app2")]
    route_middlewares = [tracer("route1")]
    channel = await run(handler, *app_middlewares, *route_middlewares)
    assert order == [
        "app1 in",
        "app2 in",
        "route1 in",
        "handler",
        "route1 out",
        "app2 out",
        "app1 out",
    ]
    assert channel.calls == ACKED


async def test_function_and_class_middlewares_both_work() -> None:
    async def function_middleware(message: Message, call_next: CallNext) -> Any:
        message.state["seen"] = ["function"]
        return await call_next(message)

    class ClassMiddleware:
        async def __call__(self, message: Message, call_next: CallNext) -> Any:
            message.state["seen"].append("class")
            return await call_next(message)

    channel = FakeChannel()
    message = make_message(channel)
    seen: list[str] = []

    async def handler(message: Message) -> None:
        seen.extend(message.state["seen"])

    await run(handler, function_middleware, ClassMiddleware(), channel=channel, message=message)
    assert seen == ["function", "class"]
    assert channel.calls == ACKED


async def test_short_circuit_is_acked_and_handler_not_called() -> None:
    called = False

    async def handler(message: Message) -> None:
        nonlocal called
        called = True

    async def stop(message: Message, call_next: CallNext) -> None:
        return None

    channel = await run(handler, stop)
    assert not called
    assert channel.calls == ACKED


@pytest.mark.parametrize("where", ["app", "route", "handler"])
async def test_exception_anywhere_requeues_exactly_once(where: str) -> None:
    async def raising(message: Message, call_next: CallNext) -> None:
        raise ValueError(where)

    async def passing(message: Message, call_next: CallNext) -> Any:
        return await call_next(message)

    app_mw = raising if where == "app" else passing
    route_mw = raising if where == "route" else passing
    handler = fail if where == "handler" else ok
    channel = await run(handler, app_mw, route_mw)
    assert channel.calls == REQUEUED


@pytest.mark.parametrize("requeue", [True, False])
async def test_explicit_settlement_in_handler_is_respected(requeue: bool) -> None:
    async def handler(message: Message) -> None:
        assert await message.reject(requeue=requeue)
        assert not await message.ack()  # second settlement: a no-op

    channel = await run(handler)
    assert channel.calls == (REQUEUED if requeue else REJECTED)


async def test_explicit_ack_then_exception_is_not_settled_twice() -> None:
    async def handler(message: Message) -> None:
        await message.ack()
        raise RuntimeError("after ack")

    channel = await run(handler)
    assert channel.calls == ACKED


async def test_policy_reject_on_exception() -> None:
    channel = await run(fail, settlement=AckRequeue(on_exception=Action.REJECT))
    assert channel.calls == REJECTED
    channel = await run(ok, settlement=AckRequeue(on_exception=Action.REJECT))
    assert channel.calls == ACKED


# -- Timeout ------------------------------------------------------------------------


async def test_timeout_cancels_and_message_is_requeued(caplog: pytest.LogCaptureFixture) -> None:
    finished = False

    async def slow(message: Message) -> None:
        nonlocal finished
        await trio.sleep(3600)
        finished = True

    start = trio.current_time()
    with trio.fail_after(7200):
        channel = await run(slow, Timeout(1.5))
    assert not finished
    assert trio.current_time() - start == pytest.approx(1.5)
    assert channel.calls == REQUEUED
    # The settlement policy logged the HandlerTimeout, naming the queue and limit.
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert len(errors) == 1
    assert isinstance(errors[0], HandlerTimeout)
    assert "queue 'orders'" in str(errors[0]) and "1.5 s" in str(errors[0])


async def test_timeout_raises_handler_timeout_naming_the_message() -> None:
    async def slow(message: Message) -> None:
        await trio.sleep(10)

    with pytest.raises(HandlerTimeout) as raised:
        await Timeout(2)(make_message(FakeChannel()), slow)
    assert raised.value.seconds == 2
    assert raised.value.queue == "orders"
    assert raised.value.delivery_tag == 1
    assert "queue 'orders'" in str(raised.value) and "2 s" in str(raised.value)


async def test_timeout_lets_a_fast_handler_finish_and_reject_policy_applies() -> None:
    channel = await run(ok, Timeout(1))
    assert channel.calls == ACKED

    async def slow(message: Message) -> None:
        await trio.sleep(5)

    channel = await run(slow, Timeout(1), settlement=AckRequeue(on_exception=Action.REJECT))
    assert channel.calls == REJECTED


async def test_outer_cancellation_is_not_a_timeout() -> None:
    # A shutdown cancelling the chain goes through Timeout as a cancellation,
    # and the policy settles the message (requeue) before it propagates.
    async def slow(message: Message) -> None:
        await trio.sleep(100)

    with trio.move_on_after(1) as scope:
        channel = FakeChannel()
        await run(slow, Timeout(50), channel=channel)
    assert scope.cancelled_caught
    assert channel.calls == REQUEUED


@pytest.mark.parametrize("seconds", [0, -1, float("nan")])
def test_timeout_validates_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        Timeout(seconds)


# -- Logging ------------------------------------------------------------------------


def records_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


async def test_logging_one_line_with_outcome_and_no_body(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await run(ok, Logging(logger="test.messages"))
    (record,) = records_of(caplog, "test.messages")
    assert record.levelno == logging.INFO
    text = record.getMessage()
    assert "acked" in text and "'orders'" in text
    assert "secret body" not in text
    assert record.__dict__["outcome"] == "acked"
    assert record.__dict__["queue"] == "orders"
    assert record.__dict__["vhost"] == "/"
    assert record.__dict__["delivery_tag"] == 1
    assert record.__dict__["redelivered"] is False
    assert record.__dict__["duration_ms"] >= 0
    assert "body" not in record.__dict__


async def test_logging_failure_and_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    channel = await run(fail, Logging(logger="test.messages"))
    assert channel.calls == REQUEUED

    async def slow(message: Message) -> None:
        await trio.sleep(10)

    await run(slow, Logging(logger="test.messages"), Timeout(1))
    failed, timeout = records_of(caplog, "test.messages")
    assert failed.__dict__["outcome"] == "failed"
    assert failed.levelno == logging.WARNING
    assert failed.__dict__["error"] == "RuntimeError: handler failed"
    assert timeout.__dict__["outcome"] == "timeout"


async def test_logging_explicit_settlement_and_body(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def rejecting(message: Message) -> None:
        await message.reject(requeue=False)

    await run(rejecting, Logging(logger="test.messages", log_body=True, max_body=6))
    (record,) = records_of(caplog, "test.messages")
    assert record.__dict__["outcome"] == "rejected"
    assert record.__dict__["body"] == "secret... (11 bytes)"
    assert "secret..." in record.getMessage()


# -- Timing -------------------------------------------------------------------------


async def test_timing_reports_queue_name_kwargs_and_exception() -> None:
    seen: list[tuple[str, float, object, object]] = []

    async def callback(name: str, time_delta: float, **kwargs: Any) -> None:
        seen.append((name, time_delta, kwargs["exc_type"], kwargs.get("dog")))

    async def slow(message: Message) -> None:
        await trio.sleep(2)

    await run(slow, Timing(callback))
    channel = await run(fail, Timing(callback, name="custom", dog="Xablau"))
    assert channel.calls == REQUEUED
    assert seen[0][0] == "orders"
    assert seen[0][1] >= 0
    assert seen[0][2] is None
    assert seen[1][0] == "custom"
    assert seen[1][2] is RuntimeError
    assert seen[1][3] == "Xablau"


# -- Retry (what needs no broker) -------------------------------------------------


async def test_retry_leaves_a_message_the_handler_settled() -> None:
    async def handler(message: Message) -> None:
        await message.reject(requeue=False)
        raise RuntimeError("after reject")

    channel = await run(handler, Retry(3))
    assert channel.calls == REJECTED


async def test_retry_quorum_without_delay_reraises_for_the_policy() -> None:
    # x-delivery-count present and no delay: the broker counts, Retry re-raises.
    channel = FakeChannel()
    message = make_message(channel, headers={"x-delivery-count": 1})
    await run(fail, Retry(5), channel=channel, message=message)
    assert channel.calls == REQUEUED


async def test_retry_dlx_rejects_after_the_last_attempt() -> None:
    channel = FakeChannel()
    message = make_message(channel, headers={"x-delivery-count": 2})
    await run(fail, Retry(3, dead_letter="dlx"), channel=channel, message=message)
    assert channel.calls == REJECTED


async def test_retry_on_exhausted_may_settle_the_message() -> None:
    exhausted: list[BaseException] = []

    async def on_exhausted(message: Message, exc: Exception) -> None:
        exhausted.append(exc)
        await message.ack()

    channel = await run(fail, Retry(1, on_exhausted=on_exhausted))
    assert channel.calls == ACKED
    assert [type(e) for e in exhausted] == [RuntimeError]


async def test_retry_without_app_says_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    channel = await run(fail, Retry(3))
    assert channel.calls == REQUEUED
    assert any("message.app is None" in str(r.exc_info and r.exc_info[1]) for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": 1.5}, TypeError),
        ({"delay": -1}, ValueError),
        ({"delay": "1s"}, TypeError),
        ({"dead_letter": "drop"}, ValueError),
    ],
)
def test_retry_validates_its_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="Retry"):
        Retry(**kwargs)
