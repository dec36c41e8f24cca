"""Small helpers shared by the rest of the package (a leaf: imports nothing of asyncworker).

* ``only_leaf`` / ``raise_single``: trio's nurseries wrap an error in
  ``ExceptionGroup``\\ s, one per nursery it crossed; a user wants the error
  itself when there is only one.
* ``split_cancelled``: a handler's failure apart from the shutdown's
  cancellation it came with.
* ``wait_first`` / ``sleep_unless``: the two ways the runtime waits for
  "this, or that stop signal".
* ``is_async_callable``: what registration checks on handlers, hooks and
  middlewares (``functools.partial`` and objects with an ``async def
  __call__`` included).
* ``VERSION``: the version of the installed distribution, read once from
  its metadata (``pyproject.toml`` is the only place it is written).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    # Only in annotations (never evaluated at run time): no typing_extensions
    # dependency on Python < 3.13.
    if sys.version_info >= (3, 13):
        from typing import TypeIs
    else:
        from typing_extensions import TypeIs

__all__ = [
    "VERSION",
    "is_async_callable",
    "only_leaf",
    "raise_single",
    "sleep_unless",
    "split_cancelled",
    "wait_first",
]


def _version() -> str:
    try:
        return importlib.metadata.version("asyncworker")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare source tree
        return "0+unknown"


#: The version of asyncworker, from the installed distribution's metadata.
VERSION = _version()


def only_leaf(exc: BaseException) -> BaseException | None:
    """The exception inside nested single-exception groups (``exc`` itself if not a group).

    None when some group on the way holds more than one exception.
    """
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


def raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """Re-raise the only exception inside nested single-exception groups, as itself.

    Returns (and the caller re-raises the group) when there is more than one.
    The exception keeps the ``__context__`` and ``__cause__`` it had, instead
    of being chained to the group it is taken out of.
    """
    exc = only_leaf(group)
    if exc is None:
        return
    context, cause, suppress = exc.__context__, exc.__cause__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__context__, exc.__cause__, exc.__suppress_context__ = context, cause, suppress


def split_cancelled(exc: BaseException) -> tuple[BaseException | None, Exception | None]:
    """``(cancellation, failure)`` parts of what a handler (or a periodic task) raised.

    A handler whose nursery is cancelled (shutdown past its grace period)
    while one of its tasks fails raises ``BaseExceptionGroup([Cancelled,
    ValueError])``: the cancellation goes on, the failure is the handler's and
    must not reach the worker nursery (it would stop every queue).  The
    failure is None when ``exc`` is none of that (KeyboardInterrupt, ...).
    """
    if isinstance(exc, Exception):
        return None, exc
    if isinstance(exc, BaseExceptionGroup):
        cancelled, rest = exc.split(trio.Cancelled)
        # What is left is an ExceptionGroup when every other error is an Exception.
        if cancelled is not None and isinstance(rest, ExceptionGroup):
            return cancelled, rest
    return None, None


async def wait_first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of ``waits`` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:
        for wait in waits:

            async def one(wait: Callable[[], Awaitable[object]] = wait) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(one)


async def sleep_unless(event: trio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``event`` gets set."""
    with trio.move_on_after(seconds):
        await event.wait()


def is_async_callable(obj: object) -> TypeIs[Callable[..., Awaitable[Any]]]:
    """Whether calling ``obj`` returns an awaitable: an ``async def`` function, a
    ``functools.partial`` of one, or an object whose ``__call__`` is ``async def``."""
    while hasattr(obj, "func") and not inspect.isfunction(obj):  # functools.partial
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004
    )
