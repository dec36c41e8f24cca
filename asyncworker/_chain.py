"""Building a route's middleware chain, once, at startup."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

from ._message import Message

__all__ = ["CallNext", "Handler", "Middleware", "build_chain"]

#: A message handler: ``async def handler(message) -> None``.
Handler: TypeAlias = Callable[[Message], Awaitable[Any]]
#: What a middleware calls to run the rest of the chain.
CallNext: TypeAlias = Callable[[Message], Awaitable[Any]]
#: A middleware: any async callable ``(message, call_next)``.
Middleware: TypeAlias = Callable[[Message, CallNext], Awaitable[Any]]


#: True in the tasks that run chains (set once per worker task, not per message).
_IN_WORKER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asyncworker.in_worker", default=False
)


def build_chain(handler: CallNext, middlewares: Sequence[Middleware]) -> CallNext:
    """Wrap ``handler`` in ``middlewares``; the first one is the outermost.

    The result is one async callable per route.  Nothing is allocated per
    message beyond what the middlewares themselves do.
    """
    call: CallNext = handler
    for middleware in reversed(middlewares):
        call = _link(middleware, call)
    return call


def _link(middleware: Middleware, call_next: CallNext) -> CallNext:
    async def step(message: Message) -> Any:
        return await middleware(message, call_next)

    step.__qualname__ = f"chain step {getattr(middleware, '__qualname__', middleware)!r}"
    return step
