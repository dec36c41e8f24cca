"""Utilities for handlers: ``Timeit``, to time a block or a coroutine function.

``Timeit`` is the one documented in the original async-worker README::

    async with Timeit(name="xablau-access-time", callback=log_callback, dog="Xablau"):
        await access_some_remote_content()

It only uses anyio primitives, so it works under ``trio.run`` and under
``anyio.run(..., backend="asyncio")`` alike.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, ParamSpec, TypeAlias, TypeVar

import anyio

__all__ = ["Timeit", "TimeitCallback"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: What ``Timeit`` calls when a timed block ends::
#:
#:     async def callback(name, time_delta, exc_type=None, exc_val=None, exc_tb=None, **kwargs)
#:
#: ``name`` and ``time_delta`` (seconds, a float) are passed positionally; the
#: exception data always as the keyword arguments ``exc_type``, ``exc_val`` and
#: ``exc_tb`` (all None when the block did not raise); then the extra keyword
#: arguments given to ``Timeit``.  A plain (synchronous) function works too.
TimeitCallback: TypeAlias = Callable[..., Any]

# The start times of the blocks currently being timed, innermost last.  A
# context variable (holding an immutable tuple) rather than an attribute, so
# one Timeit can time nested blocks and blocks running concurrently in several
# tasks: every task sees its own copy.
_RUNNING: contextvars.ContextVar[tuple[tuple[Timeit, float], ...]] = contextvars.ContextVar(
    "asyncworker.utils.Timeit", default=()
)


class Timeit:
    """Time a block of code, or every call of a coroutine function, and report it.

    As an async context manager::

        async with Timeit(name="xablau-access-time", callback=log_callback):
            await access_some_remote_content()

    or as a decorator of a coroutine function (each call is timed on its own)::

        @Timeit(name="fetch", callback=log_callback)
        async def fetch(url): ...

    When the block (or the call) ends, ``callback`` is called as
    ``callback(name, time_delta, exc_type=..., exc_val=..., exc_tb=..., **kwargs)``
    and awaited if it returns an awaitable:

    * ``time_delta`` is the elapsed time in seconds, measured with ``clock``
      (``time.perf_counter``, a high-resolution monotonic clock, by default);
    * ``exc_type``, ``exc_val`` and ``exc_tb`` describe the exception that
      ended the block, or are all None when it finished normally;
    * ``kwargs`` are the extra keyword arguments given here (the seed's
      ``dog="Xablau"``).  Because of that, ``name``, ``callback`` and ``clock``
      cannot be passed through to the callback.

    An exception raised by the block is never swallowed: it propagates once
    the callback returned.  If the callback itself raises, its exception
    propagates instead, chained to the block's one.

    If the block was cancelled (a timeout, a shutdown), the callback still
    runs, inside a shielded cancel scope, so the timing is reported; keep such
    callbacks short, since nothing can interrupt them.

    A ``Timeit`` holds no per-use state: the same instance may be entered
    again, nested, or from many tasks at once, and each use is timed from its
    own start.

    Args:
        name: the name reported to the callback.
        callback: called with the timing when the block ends (async or sync).
        clock: returns the current time in seconds; ``time.perf_counter`` by
            default.  Tests can inject a fake clock here.
        **kwargs: extra keyword arguments passed to the callback.
    """

    __slots__ = ("callback", "callback_kwargs", "clock", "name")

    def __init__(
        self,
        name: str,
        callback: TimeitCallback,
        *,
        clock: Callable[[], float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(callback):
            raise TypeError(
                f"Timeit callback must be callable, got {callback!r}: pass a function "
                "such as `async def callback(name, time_delta, exc_type=None, exc_val=None, "
                "exc_tb=None)`"
            )
        #: The name reported to the callback.
        self.name = name
        #: The callback.
        self.callback = callback
        #: The extra keyword arguments passed to the callback.
        self.callback_kwargs = kwargs
        #: The clock the elapsed time is measured with.
        self.clock: Callable[[], float] = clock if clock is not None else time.perf_counter

    def __repr__(self) -> str:
        return f"Timeit(name={self.name!r}, callback={self.callback!r})"

    async def __aenter__(self) -> Timeit:
        _RUNNING.set((*_RUNNING.get(), (self, self.clock())))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        end = self.clock()
        running = _RUNNING.get()
        # The innermost block this Timeit is timing in this task is the one ending.
        for index in range(len(running) - 1, -1, -1):
            if running[index][0] is self:
                start = running[index][1]
                _RUNNING.set(running[:index] + running[index + 1 :])
                break
        else:
            raise RuntimeError(
                f"{self!r} exited a block it did not enter in this task: use it as "
                "`async with Timeit(...):` or as a decorator, entered and exited by the "
                "same task"
            )
        await self.report(end - start, exc_type, exc_val, exc_tb)
        # Returning None: an exception raised by the block is never swallowed.

    def __call__(self, func: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        """Decorate a coroutine function so that each of its calls is timed."""
        if not callable(func):
            raise TypeError(f"@Timeit(...) decorates a coroutine function, got {func!r}")

        @functools.wraps(func)
        async def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            # The start time is a local: concurrent and recursive calls never
            # share it.
            start = self.clock()
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                await self.report(self.clock() - start, type(exc), exc, exc.__traceback__)
                raise
            await self.report(self.clock() - start, None, None, None)
            return result

        return timed

    async def report(
        self,
        time_delta: float,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        """Report one timing that the caller measured with ``clock``, as the end of a block does.

        The callback gets ``time_delta`` and the exception data, with the same
        rules: awaited if async, shielded when ``exc_val`` is a cancellation.
        For code that keeps the start time itself (the ``Timing`` middleware
        does, to avoid the block's per-task bookkeeping).
        """
        result = self.callback(
            self.name,
            time_delta,
            exc_type=exc_type,
            exc_val=exc_val,
            exc_tb=exc_tb,
            **self.callback_kwargs,
        )
        if not inspect.isawaitable(result):
            return  # a sync callback has run: nothing can interrupt it
        if exc_val is not None and _is_cancellation(exc_val):
            with anyio.CancelScope(shield=True):
                await result
            return
        if inspect.iscoroutine(result):
            # Run its first step here.  A cancellation is only ever delivered
            # to a task that resumes from the event loop, so a callback that
            # finishes without waiting (the usual case: it records a metric)
            # needs no shield, and only one that waits pays for the check
            # below, which walks every enclosing cancel scope.
            try:
                pending = result.send(None)
            except StopIteration:
                return
            rest: Awaitable[Any] = _resume(result, pending)
        else:
            rest = result
        if anyio.current_effective_deadline() == float("-inf"):
            # The block finished but its scope is already cancelled: the
            # callback's next checkpoint would raise before it could report.
            with anyio.CancelScope(shield=True):
                await rest
        else:
            await rest


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Go on running ``coro``, which has yielded ``pending`` to the event loop.

    What the loop sends or throws back goes to ``coro``, and what ``coro``
    yields goes to the loop, as ``await coro`` would have done from the start.
    """
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def _is_cancellation(exc: BaseException) -> bool:
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(cancelled) is not None
    return False
