"""``Logging``: one structured log line per message."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .._exceptions import HandlerTimeout
from .._message import Batch, Message, Settleable, Settlement
from .._util import suggest_keywords

__all__ = ["Logging"]

_SETTLED = {
    Settlement.ACK: "acked",
    Settlement.REQUEUE: "requeued",
    Settlement.REJECT: "rejected",
    Settlement.LOST: "lost",
}


S = TypeVar("S", bound=Settleable)


@suggest_keywords()
class Logging:
    """Write one log line per message: where it came from, how it ended, how long it took.

    The line reads like::

        message 7 from queue 'orders' (vhost '/', redelivered=False): acked in 12.3 ms

    and the same data is attached to the record as ``extra`` fields, so that a
    JSON formatter picks them up: ``queue``, ``vhost``, ``delivery_tag``,
    ``redelivered``, ``outcome``, ``duration_ms``, plus ``error`` (the
    exception's type and message) when the chain raised, and ``body`` when
    ``log_body`` is on.

    ``outcome`` is what the chain did, as seen from this middleware:

    * ``acked``, ``requeued``, ``rejected``: the chain returned and the message
      was settled that way, by the handler or a middleware after this one
      (``Retry`` acks the original of a message it republished or
      dead-lettered).  A message still unsettled when the chain returns is
      reported ``acked``: the settlement policy acks it right after (unless it
      was configured with another ``on_success`` action).
    * ``lost``: the channel closed before the message could be settled; the
      broker redelivers it.
    * ``failed``: the chain raised; the settlement policy requeues or rejects
      the message and logs the traceback.
    * ``timeout``: the chain raised ``HandlerTimeout`` (a ``Timeout``
      middleware after this one fired).
    * ``cancelled``: the worker was shut down while the message was handled.

    On a bulk route (the chain receives a ``Batch``, a ``list[Message]``)
    one line is written per batch, with ``batch_size`` instead of
    ``delivery_tag`` and an outcome such as ``"3 acked, 1 rejected"``;
    bodies are not logged.

    Successes are logged at ``level``; ``failed``, ``timeout`` and
    ``cancelled`` at ``level`` or WARNING, whichever is higher.  Bodies are
    never logged unless ``log_body`` is true (they may hold personal data);
    then at most ``max_body`` bytes, decoded as UTF-8 with replacement
    characters.  Exceptions go on to the settlement policy untouched.

    Args:
        logger: a ``logging.Logger``, or a logger name; ``"asyncworker"`` by default.
        level: the level of the line for a message that succeeded: a number
            (``logging.INFO``) or a level name as the standard library knows
            it (``"INFO"``, ``"debug"``).
        log_body: also log (the start of) the body.
        max_body: how many bytes of the body to log, at most (>= 0).
    """

    __slots__ = ("level", "log_body", "logger", "max_body")

    def __init__(
        self,
        logger: logging.Logger | str | None = None,
        level: int | str = logging.INFO,
        log_body: bool = False,
        max_body: int = 1024,
    ) -> None:
        if isinstance(level, str):
            # What logging.Logger.setLevel accepts, whatever its case.
            named = logging.getLevelNamesMapping().get(level.strip().upper())
            if named is None:
                raise ValueError(
                    f"Logging(level={level!r}): unknown level name; use DEBUG, INFO, WARNING, "
                    "ERROR or CRITICAL (or a number such as logging.INFO)"
                )
            level = named
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(
                "Logging(level=...) takes a logging level such as logging.INFO or 'INFO', "
                f"got {level!r}"
            )
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
            raise ValueError(f"Logging(max_body=...) must be an int >= 0, got {max_body!r}")
        if logger is None:
            logger = logging.getLogger("asyncworker")
        elif isinstance(logger, str):
            logger = logging.getLogger(logger)
        elif not isinstance(logger, logging.Logger):
            raise TypeError(
                f"Logging(logger=...) takes a logging.Logger or a logger name, got {logger!r}"
            )
        #: Where the lines go.
        self.logger: logging.Logger = logger
        #: The level of a success line (a number).
        self.level: int = level
        #: Whether the body is logged.
        self.log_body = log_body
        #: How many bytes of the body are logged, at most.
        self.max_body = max_body

    def __repr__(self) -> str:
        return (
            f"Logging(logger={self.logger.name!r}, level={logging.getLevelName(self.level)}, "
            f"log_body={self.log_body})"
        )

    async def __call__(self, message: S, call_next: Callable[[S], Awaitable[Any]]) -> Any:
        start = time.perf_counter()
        try:
            result = await call_next(message)
        except BaseException as exc:
            if isinstance(exc, HandlerTimeout):
                outcome = "timeout"
            elif isinstance(exc, Exception):
                outcome = "failed"
            else:
                # trio.Cancelled (shutdown), KeyboardInterrupt, groups of them.
                outcome = "cancelled"
            self._emit(message, outcome, start, exc)
            raise
        settlement = message.settlement
        self._emit(message, "acked" if settlement is None else _SETTLED[settlement], start, None)
        return result

    def _emit(
        self, message: Settleable, outcome: str, start: float, exc: BaseException | None
    ) -> None:
        level = self.level if exc is None else max(self.level, logging.WARNING)
        if not self.logger.isEnabledFor(level):
            return
        duration_ms = round((time.perf_counter() - start) * 1000, 3)
        if isinstance(message, Batch):
            self._emit_batch(message, outcome, duration_ms, exc)
            return
        extra: dict[str, Any] = {
            "queue": message.queue,
            "vhost": message.vhost,
            "delivery_tag": message.delivery_tag,
            "redelivered": message.redelivered,
            "outcome": outcome,
            "duration_ms": duration_ms,
        }
        text = "message %d from queue %r (vhost %r, redelivered=%s): %s in %.1f ms"
        args: list[Any] = [
            message.delivery_tag,
            message.queue,
            message.vhost,
            message.redelivered,
            outcome,
            duration_ms,
        ]
        if exc is not None:
            extra["error"] = _describe(exc)
            text += ": %s"
            args.append(extra["error"])
        if self.log_body and isinstance(message, Message):
            body = message.body
            shown = body[: self.max_body].decode("utf-8", errors="replace")
            if len(body) > self.max_body:
                shown += f"... ({len(body)} bytes)"
            extra["body"] = shown
            text += "; body %r"
            args.append(shown)
        _log(self.logger, level, text, args, extra)

    def _emit_batch(
        self, batch: Batch, outcome: str, duration_ms: float, exc: BaseException | None
    ) -> None:
        # A bulk route: one line per batch, with how its messages were settled
        # (the unsettled ones count as settled by the policy's success action).
        if exc is None:
            counts: dict[str, int] = {}
            for message in batch:
                settled = message.settlement
                key = "acked" if settled is None else _SETTLED[settled]
                counts[key] = counts.get(key, 0) + 1
            outcome = ", ".join(f"{count} {key}" for key, count in sorted(counts.items()))
        queue = batch.queue
        vhost = batch.vhost
        extra: dict[str, Any] = {
            "queue": queue,
            "vhost": vhost,
            "batch_size": len(batch),
            "outcome": outcome,
            "duration_ms": duration_ms,
        }
        text = "batch of %d messages from queue %r (vhost %r): %s in %.1f ms"
        args: list[Any] = [len(batch), queue, vhost, outcome, duration_ms]
        level = self.level
        if exc is not None:
            level = max(level, logging.WARNING)
            extra["error"] = _describe(exc)
            text += ": %s"
            args.append(extra["error"])
        _log(self.logger, level, text, args, extra)


def _log(
    logger: logging.Logger, level: int, text: str, args: list[Any], extra: dict[str, Any]
) -> None:
    # Logger.log() would walk the stack to find the caller (findCaller), a
    # third of the cost of a line; the caller is always this middleware.
    record = logger.makeRecord(
        logger.name, level, __file__, 0, text, tuple(args), None, "Logging", extra
    )
    logger.handle(record)


def _describe(exc: BaseException) -> str:
    detail = str(exc)
    name = type(exc).__qualname__
    return f"{name}: {detail}" if detail else name
