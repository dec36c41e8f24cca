"""``AckRequeue``: the settlement policy, outermost step of every chain.

It lives in the core, not among the plugins, because every chain needs one:
the App puts it around the user's middlewares (``settlement=``), and it is
re-exported from ``asyncworker.middlewares`` where users have always found
it.  It declares itself a settlement policy (``is_settlement_policy``), and
the App checks that declaration, not the class, to refuse it in
``middlewares=``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import trio

from ._message import Batch, Settleable, Settlement
from ._util import split_cancelled, suggest_keywords

__all__ = ["AckRequeue", "Action"]

logger = logging.getLogger("asyncworker")

S = TypeVar("S", bound=Settleable)


class Action(enum.Enum):
    """What to do with a message once its chain finished."""

    #: ``basic.ack``: done.
    ACK = "ack"
    #: ``basic.reject(requeue=True)``: back to the queue, delivered again.
    REQUEUE = "requeue"
    #: ``basic.reject(requeue=False)``: dropped, or dead-lettered by the queue's DLX.
    REJECT = "reject"


@suggest_keywords()
class AckRequeue:
    """Settle every message exactly once, whatever its chain did.

    By default, as the original async-worker: when the chain returns, the
    message is acked; when it raises, the exception is logged with its
    traceback and the message is requeued.  Either action can be changed::

        App(..., settlement=AckRequeue(on_exception=Action.REJECT))
        @app.route(["orders"], settlement=AckRequeue(on_exception=Action.REJECT))

    A message the chain settled itself (``message.ack()``/``reject()``) is
    left alone.  If the chain is cancelled (a ``Timeout`` middleware, or
    shutdown past its grace period), the message is settled with the
    ``on_exception`` action before the cancellation goes on; that settlement
    cannot itself be interrupted.  The exception of a handler never propagates
    further: one bad message never stops the worker or another queue.

    On a bulk route the chain receives a ``Batch`` (a ``list[Message]``):
    the action applies to every message of the batch that the handler did
    not settle itself, and a failure is logged once for the batch.

    Args:
        on_success: action when the chain returns.
        on_exception: action when it raises (or is cancelled).
    """

    __slots__ = ("on_exception", "on_success")

    #: Declares this object a settlement policy: ``App(settlement=...)`` and
    #: ``route(settlement=...)`` take it; ``middlewares=`` refuses it.
    is_settlement_policy: ClassVar[bool] = True

    def __init__(
        self, on_success: Action = Action.ACK, on_exception: Action = Action.REQUEUE
    ) -> None:
        if not isinstance(on_success, Action) or not isinstance(on_exception, Action):
            raise TypeError(
                "AckRequeue actions must be asyncworker.middlewares.Action members "
                f"(got on_success={on_success!r}, on_exception={on_exception!r})"
            )
        self.on_success = on_success
        self.on_exception = on_exception

    def __repr__(self) -> str:
        return f"AckRequeue(on_success={self.on_success}, on_exception={self.on_exception})"

    async def __call__(self, message: S, call_next: Callable[[S], Awaitable[Any]]) -> Any:
        try:
            await call_next(message)
        except trio.Cancelled:
            _settle(message, self.on_exception)
            raise
        except BaseException as exc:
            if not message.settled:
                _settle(message, self.on_exception)
            cancelled, failure = split_cancelled(exc)
            if failure is None:
                raise  # KeyboardInterrupt, SystemExit, BaseExceptionGroup of them
            if isinstance(message, Batch):
                _log_batch_failure(message, failure)
            else:
                logger.error(
                    "handler failed on message %d of queue %r (vhost %r); message %s",
                    message.delivery_tag,
                    message.queue,
                    message.vhost,
                    _OUTCOME[message.settlement],
                    exc_info=failure,
                )
            if cancelled is not None:
                raise cancelled from None
        else:
            if not message.settled:
                _settle(message, self.on_success)


def _log_batch_failure(batch: Batch, failure: Exception) -> None:
    outcomes: dict[str, int] = {}
    for message in batch:
        outcome = _OUTCOME[message.settlement].split(" (")[0]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    logger.error(
        "bulk handler failed on a batch of %d messages of queue %r (vhost %r); messages %s",
        len(batch),
        batch.queue,
        batch.vhost,
        ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items())),
        exc_info=failure,
    )


def _settle(message: Settleable, action: Action) -> None:
    # Message settlement is synchronous (it only queues a frame), so it runs to
    # completion even inside a cancelled scope: this is the shield.
    # The policy is the one caller of _settle outside _message: the
    # synchronous, uninterruptible settlement users never call directly.
    message._settle(_TO_SETTLEMENT[action])  # noqa: SLF001


_TO_SETTLEMENT = {
    Action.ACK: Settlement.ACK,
    Action.REQUEUE: Settlement.REQUEUE,
    Action.REJECT: Settlement.REJECT,
}
_OUTCOME: dict[Settlement | None, str] = {
    Settlement.ACK: "acked",
    Settlement.REQUEUE: "requeued",
    Settlement.REJECT: "rejected",
    Settlement.LOST: "not settled (its channel closed; the broker will redeliver it)",
    None: "not settled",
}
