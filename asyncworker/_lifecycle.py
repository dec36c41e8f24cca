"""Lifecycle hooks, periodic tasks and the optional HTTP server of an App.

The order of ``serve()``:

1. startup hooks, in registration order (``app.state`` is filled here); a
   failing hook aborts ``serve()`` with ``StartupError`` naming it, before
   any connection is opened, and no shutdown hook runs;
2. the HTTP server (health and metrics), if ``http=`` is set, so that
   liveness answers while the consumers connect;
3. the consumers; once every one is registered, ``serve()`` reports started;
4. the periodic tasks, each on its own schedule.

And on shutdown:

1. periodic tasks stop being scheduled; runs in progress get the grace
   period to finish, like in-flight handlers (then they are cancelled);
2. consumers drain;
3. the HTTP server stops;
4. shutdown hooks, in registration order, each failure logged and the
   others still run (shielded from cancellation, bounded by
   ``max(grace_period, 5)`` seconds in all).
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from ._exceptions import StartupError
from ._util import is_async_callable, split_cancelled

if TYPE_CHECKING:
    from ._statistics import AppStatistics

__all__ = ["Lifecycle", "PeriodicTask", "ShutdownReport", "grace_timer", "serving_line"]

logger = logging.getLogger("asyncworker")

#: Seconds between reports of handlers still running after the grace period.
_STUCK_REPORT_SECONDS = 10.0

#: What hooks and periodic tasks receive (the App).
A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class PeriodicTask(Generic[A]):
    """A function registered with ``App.run_every``."""

    function: Callable[[A], Awaitable[Any]]
    interval: float
    max_concurrency: int
    run_at_start: bool

    @property
    def name(self) -> str:
        """The function's qualified name."""
        return _name(self.function)


def _name(function: object) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def _check_async(function: object, what: str) -> None:
    if not is_async_callable(function):
        raise TypeError(
            f"{what} {_name(function)!r} must be an async function taking the app "
            "(async def function(app): ...)"
        )


class Lifecycle(Generic[A]):
    """An App's hooks and periodic tasks; each is called with ``owner`` (the App)."""

    def __init__(self, owner: A) -> None:
        self._owner = owner
        self.startup_hooks: list[Callable[[A], Awaitable[Any]]] = []
        self.shutdown_hooks: list[Callable[[A], Awaitable[Any]]] = []
        self.periodic: list[PeriodicTask[A]] = []
        self._started = False

    # -- registration ------------------------------------------------------

    def add_startup_hook(self, hook: Callable[[A], Awaitable[Any]]) -> None:
        """Register a startup hook (``TypeError`` if it is not async)."""
        _check_async(hook, "on_startup hook")
        self.startup_hooks.append(hook)

    def add_shutdown_hook(self, hook: Callable[[A], Awaitable[Any]]) -> None:
        """Register a shutdown hook (``TypeError`` if it is not async)."""
        _check_async(hook, "on_shutdown hook")
        self.shutdown_hooks.append(hook)

    def periodic_task(
        self,
        interval: float | datetime.timedelta,
        *,
        max_concurrency: int,
        run_at_start: bool,
    ) -> Callable[[Callable[[A], Awaitable[Any]]], None]:
        """Validate ``run_every()``'s options; returns what registers the function."""
        if isinstance(interval, datetime.timedelta):
            seconds = interval.total_seconds()
        elif isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"run_every() takes seconds or a datetime.timedelta, got {interval!r}")
        else:
            seconds = float(interval)
        if not seconds > 0 or not math.isfinite(seconds):
            raise ValueError(
                f"run_every() interval must be a finite duration > 0, got {interval!r}"
            )
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError(f"max_concurrency must be an int, got {max_concurrency!r}")
        if max_concurrency < 1:
            raise ValueError(
                f"max_concurrency must be >= 1, got {max_concurrency}: it is how many runs of "
                "the task may be in progress at once"
            )

        def register(function: Callable[[A], Awaitable[Any]]) -> None:
            _check_async(function, "periodic task")
            self.periodic.append(
                PeriodicTask(
                    function=function,
                    interval=seconds,
                    max_concurrency=max_concurrency,
                    run_at_start=bool(run_at_start),
                )
            )

        return register

    # -- hooks -------------------------------------------------------------

    async def startup(self) -> None:
        """Run the startup hooks in order; raise ``StartupError`` on the first failure."""
        self._started = False
        for hook in self.startup_hooks:
            try:
                await hook(self._owner)
            except Exception as exc:
                raise StartupError(
                    f"startup hook {_name(hook)!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
            logger.debug("startup hook %r done", _name(hook))
        self._started = True

    async def shutdown(self, seconds: float) -> None:
        """Run the shutdown hooks in order (if startup completed); log failures.

        Shielded from cancellation, and bounded by ``seconds`` in all.
        """
        if not self._started:
            return
        self._started = False
        with trio.CancelScope(shield=True), trio.move_on_after(seconds):
            for hook in self.shutdown_hooks:
                try:
                    await hook(self._owner)
                except Exception:
                    logger.exception("shutdown hook %r failed", _name(hook))
                else:
                    logger.debug("shutdown hook %r done", _name(hook))

    # -- periodic tasks --------------------------------------------------------

    async def run_periodic(self, stop: trio.Event, scopes: set[trio.CancelScope]) -> None:
        """Run every periodic task until the App stops, then wait for runs in progress.

        Runs in progress are in a nursery whose cancel scope is in ``scopes``
        (the App's grace timer cancels those), like in-flight handlers.
        """
        if not self.periodic:
            return
        runs_scope: trio.CancelScope | None = None
        try:
            async with trio.open_nursery() as runs:
                runs_scope = runs.cancel_scope
                scopes.add(runs_scope)
                async with trio.open_nursery() as schedulers:
                    for task in self.periodic:
                        schedulers.start_soon(
                            self._schedule, task, runs, stop, name=f"asyncworker every {task.name}"
                        )
                # No new runs: leaving the nursery waits for those in progress.
        finally:
            if runs_scope is not None:
                scopes.discard(runs_scope)

    async def _schedule(self, task: PeriodicTask[A], runs: trio.Nursery, stop: trio.Event) -> None:
        interval = task.interval
        running = 0

        async def run_once() -> None:
            nonlocal running
            try:
                await task.function(self._owner)
            except BaseException as exc:
                # A failure grouped with the Cancelled of a shutdown is still
                # the task's own: logged, never raised into serve().
                cancelled, failure = split_cancelled(exc)
                if failure is None:
                    raise
                logger.error(
                    "periodic task %r failed; it runs again in %g s",
                    task.name,
                    interval,
                    exc_info=failure,
                )
                if cancelled is not None:
                    raise cancelled from None
            finally:
                running -= 1

        next_run = trio.current_time() + (0.0 if task.run_at_start else interval)
        while True:
            with trio.move_on_at(next_run):
                await stop.wait()
            if stop.is_set():
                return
            if running < task.max_concurrency:
                running += 1
                runs.start_soon(run_once, name=f"asyncworker periodic {task.name}")
            else:
                logger.debug(
                    "periodic task %r skipped a run: %d run(s) still in progress "
                    "(max_concurrency=%d)",
                    task.name,
                    running,
                    task.max_concurrency,
                )
            # Ticks missed while the loop was busy are skipped, not piled up.
            now = trio.current_time()
            next_run += interval
            if next_run <= now:
                next_run += math.ceil((now - next_run) / interval + 1e-9) * interval


async def grace_timer(
    stop: trio.Event,
    grace_period: Callable[[], float],
    cancel_handlers: Callable[[], None],
    statistics: Callable[[], AppStatistics],
) -> None:
    """Once ``stop`` is set, give in-flight handlers ``grace_period()`` s, then cancel them.

    Runs until cancelled (the App cancels it once every vhost has drained).
    """
    await stop.wait()
    seconds = grace_period()
    await trio.sleep(seconds)
    logger.warning(
        "grace period of %.0f s is over: cancelling in-flight handlers (their messages "
        "are requeued)",
        seconds,
    )
    cancel_handlers()
    # A handler that shields itself from cancellation keeps serve() open;
    # say which one, since trio cannot leave it behind.
    while True:
        await trio.sleep(_STUCK_REPORT_SECONDS)
        stuck = [
            f"{c.vhost}/{c.queue} ({c.in_flight})" for c in statistics().consumers if c.in_flight
        ]
        if stuck:
            logger.error(
                "shutdown is waiting for handlers that ignore cancellation: %s",
                ", ".join(stuck),
            )


def serving_line(queues: Mapping[str, Sequence[str]], periodic: int, address: str) -> str:
    """The "serving" log line: every queue consumed, by vhost, and the broker's address."""
    tasks = f"; {periodic} periodic task(s)" if periodic else ""
    if not queues:
        return f"serving no queues{tasks}"
    served = "; ".join(
        f"{', '.join(repr(queue) for queue in names)} in vhost {vhost!r}"
        for vhost, names in queues.items()
    )
    count = sum(len(names) for names in queues.values())
    return f"serving {count} queue(s): {served}{tasks}, on {address}"


@dataclass(frozen=True, slots=True)
class _Drain:
    """What a shutdown's drain started with."""

    started: float
    in_flight: int
    waiting: int
    cancelled_before: int


class ShutdownReport:
    """Counts the handlers shutdowns cancelled, and writes the final "stopped" line.

    The App calls ``cancelling(n)`` whenever it cancels ``n`` in-flight
    handlers (the grace period ran out, or a second signal came), runs
    ``watch()`` while serving (it notes what the drain starts with, from
    ``statistics()`` only), and calls ``log_stopped()`` once ``serve()`` is
    over.  ``cancelled`` is what ``AppStatistics.handlers_cancelled`` reports
    and what gives ``asyncworker run`` its exit status 3.
    """

    def __init__(self) -> None:
        #: Handlers cancelled on shutdown since the App started.
        self.cancelled = 0
        self._drain: _Drain | None = None

    def cancelling(self, in_flight: int) -> None:
        """``in_flight`` handlers are being cancelled."""
        self.cancelled += in_flight

    async def watch(self, stop: trio.Event, statistics: Callable[[], AppStatistics]) -> None:
        """Once ``stop`` is set, note what the drain starts with; then return."""
        await stop.wait()
        consumers = statistics().consumers
        self._drain = _Drain(
            started=trio.current_time(),
            in_flight=sum(c.in_flight for c in consumers),
            waiting=sum(c.waiting for c in consumers),
            cancelled_before=self.cancelled,
        )

    def log_stopped(self) -> None:
        """Log the final line of a ``serve()`` that started: what the drain did."""
        drain, self._drain = self._drain, None
        if drain is None:  # serve() ended without a stop request
            logger.info("stopped")
            return
        cancelled = self.cancelled - drain.cancelled_before
        finished = max(drain.in_flight - cancelled, 0)
        grace = (
            f"the grace period cancelled {cancelled} (their messages were requeued)"
            if cancelled
            else "none was cancelled"
        )
        unstarted = (
            f"; {drain.waiting} delivered message(s) not yet handled were requeued"
            if drain.waiting
            else ""
        )
        logger.info(
            "stopped: %d handler(s) in flight at shutdown finished, %s%s; drained in %.1f s",
            finished,
            grace,
            unstarted,
            trio.current_time() - drain.started,
            extra={
                "drained": finished,
                "cancelled": cancelled,
                "requeued_unstarted": drain.waiting,
            },
        )
