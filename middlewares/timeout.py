"""``Timeout``: a time limit on the rest of the chain, per message."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from .._exceptions import HandlerTimeout
from .._message import Settleable
from .._util import suggest_keywords

__all__ = ["Timeout"]


S = TypeVar("S", bound=Settleable)


@suggest_keywords()
class Timeout:
    """Cancel the rest of the chain if it runs longer than ``seconds`` on a message.

    The handler (and the middlewares after this one) run inside
    ``trio.move_on_after(seconds)``.  When the limit is reached they are
    cancelled, and ``HandlerTimeout`` is raised in their place: the settlement
    policy then requeues the message (or rejects it, with
    ``AckRequeue(on_exception=Action.REJECT)``) and logs the error.  A message
    the handler already settled stays settled.

    To count timeouts as failed attempts, put ``Retry`` *before* (outside)
    ``Timeout``: ``middlewares=[Retry(...), Timeout(30)]``.  A middleware
    inside ``Timeout`` only sees the cancellation, not ``HandlerTimeout``.

    Args:
        seconds: the time limit, in seconds (> 0).
    """

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"Timeout(seconds) takes a number of seconds, got {seconds!r}")
        if not seconds > 0 or math.isnan(seconds):
            raise ValueError(
                f"Timeout(seconds) must be > 0, got {seconds!r}; to run handlers without a "
                "time limit, leave the Timeout middleware out"
            )
        #: The time limit, in seconds.
        self.seconds = float(seconds)

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g})"

    async def __call__(self, message: S, call_next: Callable[[S], Awaitable[Any]]) -> Any:
        with trio.move_on_after(self.seconds):
            return await call_next(message)
        # Only reached when the scope caught its own cancellation: a
        # cancellation from outside (shutdown) propagates through it untouched.
        raise HandlerTimeout(message.queue, message.delivery_tag, self.seconds)
