"""Building a route's middleware chain, once, at startup.

A chain carries a ``Message`` on an ordinary route and a ``Batch`` on a bulk
route; the aliases below name both shapes, so that a bulk route's
middlewares are typed for what they receive.  The standard middlewares are
generic (a type variable bound to ``Settleable``) and fit either.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

from ._message import Batch, Message, Settleable

__all__ = [
    "BulkCallNext",
    "BulkHandler",
    "BulkMiddleware",
    "CallNext",
    "Handler",
    "Middleware",
    "build_chain",
]

#: A message handler: ``async def handler(message) -> None``.
Handler: TypeAlias = Callable[[Message], Awaitable[Any]]
#: What a middleware calls to run the rest of the chain.
CallNext: TypeAlias = Callable[[Message], Awaitable[Any]]
#: A middleware: any async callable ``(message, call_next)``.
Middleware: TypeAlias = Callable[[Message, CallNext], Awaitable[Any]]

#: A bulk route's handler: ``async def handler(batch) -> None``.
BulkHandler: TypeAlias = Callable[[Batch], Awaitable[Any]]
#: What a middleware of a bulk route calls to run the rest of the chain.
BulkCallNext: TypeAlias = Callable[[Batch], Awaitable[Any]]
#: A middleware of a bulk route: any async callable ``(batch, call_next)``.
BulkMiddleware: TypeAlias = Callable[[Batch, BulkCallNext], Awaitable[Any]]

S = TypeVar("S", bound=Settleable)

#: True in the tasks that run chains (set once per worker task, not per message).
_IN_WORKER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asyncworker.in_worker", default=False
)


def build_chain(
    handler: Callable[[S], Awaitable[Any]],
    middlewares: Sequence[Callable[[S, Callable[[S], Awaitable[Any]]], Awaitable[Any]]],
) -> Callable[[S], Awaitable[Any]]:
    """Wrap ``handler`` in ``middlewares``; the first one is the outermost.

    The result is one async callable per route.  Nothing is allocated per
    message beyond what the middlewares themselves do.
    """
    call = handler
    for middleware in reversed(middlewares):
        call = _link(middleware, call)
    return call


def _link(
    middleware: Callable[[S, Callable[[S], Awaitable[Any]]], Awaitable[Any]],
    call_next: Callable[[S], Awaitable[Any]],
) -> Callable[[S], Awaitable[Any]]:
    async def step(message: S) -> Any:
        return await middleware(message, call_next)

    step.__qualname__ = f"chain step {getattr(middleware, '__qualname__', middleware)!r}"
    return step
