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
* ``did_you_mean`` / ``check_keywords`` / ``suggest_keywords``: the "did you
  mean ...?" of every misspelled keyword argument or option name (Python's
  own TypeError names the unknown keyword but suggests nothing);
* ``install_hint``: the pip command that installs an optional extra the way
  this copy of asyncworker was installed (from PyPI, or a source checkout);
* ``VERSION``: the version of the installed distribution, read once from
  its metadata (``pyproject.toml`` is the only place it is written).
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import json
import sys
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

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
    "check_keywords",
    "did_you_mean",
    "install_hint",
    "is_async_callable",
    "only_leaf",
    "raise_single",
    "sleep_unless",
    "split_cancelled",
    "suggest_call_keywords",
    "suggest_keywords",
    "wait_first",
]

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


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


def did_you_mean(name: str, choices: Iterable[str], aliases: Mapping[str, str] = {}) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``name``, or ``""``.

    ``aliases`` maps names people write from habit (``hostname``) to the
    right one (``host``); a closeness score alone would pick ``name``.
    """
    choices = list(choices)
    if name in aliases and aliases[name] in choices:
        return f"; did you mean {aliases[name]!r}?"
    close = difflib.get_close_matches(name, choices, n=1)
    if not close:
        # A keyword with a suffix or prefix too many ("max_attempt" -> "max_attempts").
        close = [choice for choice in choices if choice.startswith(name) or name.startswith(choice)]
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keywords(
    given: Iterable[str],
    allowed: Collection[str],
    what: str,
    aliases: Mapping[str, str] = {},
) -> None:
    """Raise ``TypeError`` for the first of ``given`` not in ``allowed``, with a "did you mean"."""
    for name in given:
        if name not in allowed:
            hint = did_you_mean(name, allowed, aliases)
            raise TypeError(f"{what} got an unexpected keyword argument {name!r}{hint}")


def _keyword_names(function: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword arguments ``function`` takes, or None if it takes ``**kwargs``."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ) - {"self"}


def suggest_keywords(aliases: Mapping[str, str] = {}) -> Callable[[C], C]:
    """A class decorator: a misspelled keyword of the constructor gets a "did you mean".

    ::

        @suggest_keywords()
        class Retry: ...

        Retry(max_attempt=3)  # TypeError: ... 'max_attempt'; did you mean 'max_attempts'?

    It checks the keywords in ``__new__``, before ``__init__`` runs, so that
    type checkers keep seeing (and checking calls against) the real
    signature of ``__init__``.  Construction costs one set lookup per
    keyword more; nothing else changes.
    """

    def decorate(cls: C) -> C:
        parent_new: Any = cls.__new__
        # Per class constructed: a subclass may take keywords of its own.
        allowed: dict[type, frozenset[str] | None] = {}

        @functools.wraps(parent_new)
        def __new__(kind: type, *args: Any, **kwargs: Any) -> Any:
            if kwargs:
                if kind not in allowed:
                    allowed[kind] = _keyword_names(kind.__init__)  # type: ignore[misc]
                names = allowed[kind]
                if names is not None:
                    check_keywords(kwargs, names, f"{kind.__name__}()", aliases)
            if parent_new is object.__new__:
                return parent_new(kind)
            return parent_new(kind, *args, **kwargs)

        cls.__new__ = __new__  # type: ignore[assignment]
        return cls

    return decorate


def suggest_call_keywords(function: F) -> F:
    """A function decorator: a misspelled keyword argument gets a "did you mean".

    For registration methods (``App.route``), never for a per-message path:
    the check costs a loop over the keywords of every call.
    """
    allowed = _keyword_names(function)
    if allowed is None:
        return function
    what = f"{function.__qualname__}()"

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name in kwargs:
            if name not in allowed:
                check_keywords(kwargs, allowed, what)
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]


def install_hint(extra: str) -> str:
    """The pip command that adds the optional ``extra`` to this installation.

    ``pip install 'asyncworker[http]'`` from an index; for a copy installed
    from a directory (a source checkout, editable or not) the same
    directory, since an index would bring some other ``asyncworker``.
    """
    # Imported from a source tree (an editable install, or the checkout on
    # sys.path): install from that tree.
    tree = Path(__file__).resolve().parent.parent
    if (tree / "pyproject.toml").is_file() and (tree / "asyncworker" / "_util.py").is_file():
        return f"pip install -e '{tree}[{extra}]'"
    try:
        direct = importlib.metadata.distribution("asyncworker").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare source tree
        direct = None
    try:
        info = json.loads(direct or "{}")
    except ValueError:  # pragma: no cover - a broken installation
        info = {}
    url = info.get("url", "") if isinstance(info, dict) else ""
    if url.startswith("file://") and isinstance(info.get("dir_info"), dict):
        # Built from a directory (pip install /path/to/checkout).
        return f"pip install '{unquote(urlsplit(url).path)}[{extra}]'"
    return f"pip install 'asyncworker[{extra}]'"
