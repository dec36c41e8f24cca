"""How ``App.run()`` runs an App in its own process, and what ``asyncworker run`` tells it.

``run_until_signal`` is the body of ``App.run()``: it configures logging
(``configure_logging``), runs ``serve`` in ``trio.run`` until SIGINT or
SIGTERM (a first signal drains, a second one cancels the handlers still
running), and turns a startup failure into one log line and exit status 1.
It is handed the App's narrow values (``serve``, the stop callbacks, the
grace period), never the App.

``importing_for_cli`` is the one piece of state the command line shares with
it: while ``asyncworker run`` imports the user's module, a module-level
``app.run()`` (the README's first example, written for ``python worker.py``)
is skipped with a one-line warning, as Flask skips ``app.run()`` under
``flask run``: the command runs the App itself, once, after the import (and
the parent of ``--workers N`` never consumes at all).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from ._exceptions import AsyncWorkerError
from ._logging import configure_logging
from ._util import only_leaf

__all__ = ["importing_for_cli", "run_until_signal", "skipped_under_cli"]

logger = logging.getLogger("asyncworker")

#: The modules ``asyncworker run`` is importing right now (innermost last).
_importing: list[str] = []


@contextmanager
def importing_for_cli(module: str) -> Iterator[None]:
    """While this block imports ``module``, ``App.run()`` is skipped (``skipped_under_cli``)."""
    _importing.append(module)
    try:
        yield
    finally:
        _importing.pop()


def skipped_under_cli(depth: int = 2) -> bool:
    """Whether ``App.run()`` must return at once: ``asyncworker run`` is importing its module.

    Then it prints one line on stderr naming the call (``depth`` frames up:
    the caller of ``App.run``) and the fix.
    """
    if not _importing:
        return False
    frame = sys._getframe(depth)  # noqa: SLF001 - the user's line, for the warning
    where = f"{os.path.relpath(frame.f_code.co_filename)}, line {frame.f_lineno}"
    print(
        f"asyncworker: ignoring app.run() ({where}) while `asyncworker run` imports "
        f"{_importing[-1]!r}: the command runs the App itself; keep app.run() under "
        "if __name__ == '__main__': to silence this",
        file=sys.stderr,
        flush=True,
    )
    return True


def run_until_signal(
    serve: Callable[[], Awaitable[None]],
    *,
    request_stop: Callable[[], None],
    force_stop: Callable[[], None],
    grace_period: Callable[[], float],
) -> None:
    """``App.run()``: serve until SIGINT/SIGTERM, then drain; exit 1 if it cannot start."""
    # Text (or JSON) log lines on stderr, at ASYNCWORKER_LOG_LEVEL/_FORMAT.
    configure_logging()
    try:
        trio.run(_until_signal, serve, request_stop, force_stop, grace_period)
    except BaseException as exc:
        leaf = only_leaf(exc)
        if isinstance(leaf, (AsyncWorkerError, RuntimeError)):
            logger.error("asyncworker cannot start: %s", leaf)
            sys.exit(1)
        raise


async def _until_signal(
    serve: Callable[[], Awaitable[None]],
    request_stop: Callable[[], None],
    force_stop: Callable[[], None],
    grace_period: Callable[[], float],
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        logger.info("%s received: draining (grace %.0f s)", name, grace_period())
                        # Not shutdown(): that ignores a signal received
                        # before serve() began, and startup may hang.
                        request_stop()
                    else:
                        logger.warning("%s received again: cancelling in-flight handlers", name)
                        force_stop()

            # Listening before serve() starts: a signal during startup
            # (a slow connection, a hanging startup hook) stops it too.
            nursery.start_soon(on_signals)
            await serve()
            nursery.cancel_scope.cancel()
