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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ._exceptions import StartupError
from ._util import is_async_callable, only_leaf, split_cancelled

if TYPE_CHECKING:
    from ._app import App, _Route
    from ._chain import CallNext
    from ._metrics import AppMetrics

__all__ = ["Hook", "Lifecycle", "LifecycleMixin", "PeriodicTask"]

logger = logging.getLogger("asyncworker")

#: A lifecycle hook or periodic task: ``async def hook(app) -> None``.
Hook = Callable[["App"], Awaitable[Any]]
F = TypeVar("F", bound=Hook)


@dataclass(frozen=True, slots=True)
class PeriodicTask:
    """A function registered with ``App.run_every``."""

    function: Hook
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


def _require_http_extra() -> None:
    import importlib.util

    missing = [
        name
        for name in ("hypercorn", "prometheus_client")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise RuntimeError(
            f"App(http=...) needs {' and '.join(missing)}: install the 'http' extra "
            "(pip install 'asyncworker[http]')"
        )


class Lifecycle:
    """What an App runs besides its consumers (one per App)."""

    def __init__(self, app: App, http: str | None) -> None:
        if http is not None:
            _require_http_extra()
        self.app = app
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []
        self.periodic: list[PeriodicTask] = []
        #: ``host:port`` of the HTTP server, or None.
        self.http = http
        #: The URL the HTTP server listens on while serving.
        self.http_url: str | None = None
        self.metrics: AppMetrics | None = None
        self.publishes_confirmed: dict[str, int] = {}
        self.publishes_failed: dict[str, int] = {}
        self._started = False

    # -- hooks -------------------------------------------------------------

    async def startup(self) -> None:
        """Run the startup hooks in order; raise ``StartupError`` on the first failure."""
        self._started = False
        if self.http is not None and self.metrics is None:
            from ._metrics import AppMetrics

            self.metrics = AppMetrics(self.app)
        for hook in self.startup_hooks:
            try:
                await hook(self.app)
            except Exception as exc:
                raise StartupError(
                    f"startup hook {_name(hook)!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
            logger.debug("startup hook %r done", _name(hook))
        self._started = True

    async def shutdown(self) -> None:
        """Run the shutdown hooks in order (if startup completed); log failures."""
        if not self._started:
            return
        self._started = False
        with trio.CancelScope(shield=True), trio.move_on_after(max(self.app.grace_period, 5.0)):
            for hook in self.shutdown_hooks:
                try:
                    await hook(self.app)
                except Exception:
                    logger.exception("shutdown hook %r failed", _name(hook))
                else:
                    logger.debug("shutdown hook %r done", _name(hook))

    # -- HTTP ----------------------------------------------------------------

    async def start_http(self, nursery: trio.Nursery) -> None:
        """Start the health/metrics server in ``nursery``, if the App has ``http=``."""
        if self.http is None or self.metrics is None:
            return
        from ._http import serve_http

        try:
            self.http_url = await nursery.start(serve_http, self.app, self.metrics, self.http)
        except (OSError, BaseExceptionGroup) as exc:
            # hypercorn's nurseries wrap the bind error in groups.
            leaf = only_leaf(exc)
            if not isinstance(leaf, OSError):
                raise
            raise StartupError(
                f"cannot serve health and metrics on {self.http}: {leaf.strerror or leaf}"
            ) from leaf

    def wrap_handler(self, route: _Route) -> CallNext:
        """The route's handler, timed for the metrics when the App serves HTTP."""
        handler: CallNext = route.handler
        if self.metrics is None:
            return handler
        return self.metrics.timed(handler, route.name, route.vhost)

    def count_publish(self, vhost: str, ok: bool) -> None:
        """Count one ``App.publish()`` outcome (read by the metrics)."""
        counts = self.publishes_confirmed if ok else self.publishes_failed
        counts[vhost] = counts.get(vhost, 0) + 1

    # -- periodic tasks --------------------------------------------------------

    async def run_periodic(self) -> None:
        """Run every periodic task until the App stops, then wait for runs in progress.

        Runs in progress are in a nursery the App's grace timer cancels, like
        in-flight handlers.
        """
        if not self.periodic:
            return
        app = self.app
        runs_scope: trio.CancelScope | None = None
        try:
            async with trio.open_nursery() as runs:
                runs_scope = runs.cancel_scope
                app._worker_scopes.add(runs_scope)
                async with trio.open_nursery() as schedulers:
                    for task in self.periodic:
                        schedulers.start_soon(
                            self._schedule, task, runs, name=f"asyncworker every {task.name}"
                        )
                # No new runs: leaving the nursery waits for those in progress.
        finally:
            if runs_scope is not None:
                app._worker_scopes.discard(runs_scope)

    async def _schedule(self, task: PeriodicTask, runs: trio.Nursery) -> None:
        stop = self.app._stop_event
        interval = task.interval
        running = 0

        async def run_once() -> None:
            nonlocal running
            try:
                await task.function(self.app)
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


class LifecycleMixin:
    """``App`` methods for hooks, periodic tasks and the HTTP server."""

    _lifecycle: Lifecycle
    state: dict[str, Any]

    def on_startup(self, hook: F) -> F:
        """Register ``async def hook(app)`` to run before the consumers start.

        Hooks run in registration order, each once per ``serve()``.  Put
        shared resources (database pools, HTTP clients, ...) in ``app.state``
        here: handlers reach it as ``message.app.state``.  If a hook raises,
        ``serve()`` raises ``StartupError`` naming it and nothing is consumed
        (``run()`` logs one line and exits with status 1); the shutdown
        hooks do not run then.
        """
        _check_async(hook, "on_startup hook")
        self._lifecycle.startup_hooks.append(hook)
        return hook

    def on_shutdown(self, hook: F) -> F:
        """Register ``async def hook(app)`` to run once the consumers have drained.

        Hooks run in registration order, after every in-flight handler
        finished (or was cancelled at the end of the grace period) and the
        periodic tasks stopped.  A hook that raises is logged with its
        traceback and the next one still runs.  They run shielded from
        cancellation, bounded by ``max(grace_period, 5)`` seconds in all.
        """
        _check_async(hook, "on_shutdown hook")
        self._lifecycle.shutdown_hooks.append(hook)
        return hook

    def run_every(
        self,
        interval: float | datetime.timedelta,
        *,
        max_concurrency: int = 1,
        run_at_start: bool = False,
    ) -> Callable[[F], F]:
        """Register ``async def task(app)`` to run every ``interval`` while serving.

        The first run is ``interval`` after the consumers started (at once
        with ``run_at_start=True``), then one every ``interval`` on a fixed
        cadence.  A tick that finds ``max_concurrency`` runs of the task still
        in progress is skipped (logged at DEBUG): runs never pile up, and
        ticks missed while the process was busy are not made up.  An
        exception is logged with its traceback and the schedule goes on.  On
        shutdown no new run starts; runs in progress get the grace period to
        finish, then are cancelled.

        Args:
            interval: seconds (> 0) or a ``datetime.timedelta``.
            max_concurrency: how many runs of this task may overlap (>= 1).
            run_at_start: also run once as soon as the App serves.
        """
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

        def decorator(function: F) -> F:
            _check_async(function, "periodic task")
            self._lifecycle.periodic.append(
                PeriodicTask(
                    function=function,
                    interval=seconds,
                    max_concurrency=max_concurrency,
                    run_at_start=bool(run_at_start),
                )
            )
            return function

        return decorator

    @property
    def http_url(self) -> str | None:
        """The URL of the health/metrics server while serving (None without ``http=``)."""
        return self._lifecycle.http_url
