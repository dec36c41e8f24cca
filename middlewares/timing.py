"""``Timing``: report how long each message took, with ``Timeit``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .._message import Settleable
from ..utils import Timeit, TimeitCallback

__all__ = ["Timing"]


S = TypeVar("S", bound=Settleable)


class Timing:
    """Time the rest of the chain on every message and report it to ``callback``.

    ``callback`` has the ``Timeit`` signature::

        async def callback(name, time_delta, exc_type=None, exc_val=None, exc_tb=None, **kwargs)

    ``name`` is the queue the message came from unless ``name`` is given;
    ``time_delta`` is in seconds; the exception data describe what the chain
    raised (None when it returned); ``kwargs`` are the extra keyword arguments
    given here.  A sync callback works too.  The exception, if any, goes on
    to the settlement policy untouched.

    Place it first in the App's middlewares to time everything a message
    goes through, or in a route's middlewares to time just that route.

    Args:
        callback: receives each timing (async or sync).
        name: the name reported; the message's queue name by default.
        **kwargs: extra keyword arguments passed to the callback.
    """

    __slots__ = ("_timeits", "callback", "callback_kwargs", "name")

    def __init__(self, callback: TimeitCallback, name: str | None = None, **kwargs: Any) -> None:
        if not callable(callback):
            raise TypeError(
                f"Timing(callback) must be callable, got {callback!r}: pass a function "
                "such as `async def callback(name, time_delta, exc_type=None, exc_val=None, "
                "exc_tb=None)`"
            )
        #: The callback.
        self.callback = callback
        #: The fixed name reported, or None for the queue name.
        self.name = name
        #: The extra keyword arguments passed to the callback.
        self.callback_kwargs = kwargs
        # One Timeit per reported name (queue), made on first use.
        self._timeits: dict[str, Timeit] = {}

    def __repr__(self) -> str:
        return f"Timing({self.callback!r}, name={self.name!r})"

    async def __call__(self, message: S, call_next: Callable[[S], Awaitable[Any]]) -> Any:
        name = self.name if self.name is not None else message.queue
        timeit = self._timeits.get(name)
        if timeit is None:
            timeit = self._timeits[name] = Timeit(
                name=name, callback=self.callback, **self.callback_kwargs
            )
        # Timeit's decorator path, inlined: the start time is a local, which
        # is cheaper than the context manager's per-task bookkeeping.
        start = timeit.clock()
        try:
            result = await call_next(message)
        except BaseException as exc:
            await timeit.report(timeit.clock() - start, type(exc), exc, exc.__traceback__)
            raise
        await timeit.report(timeit.clock() - start, None, None, None)
        return result
