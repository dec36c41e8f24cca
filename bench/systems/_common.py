"""Shared, stdlib-only measurement helpers imported by every runner in this folder.

There are three kinds of runner, one file each per system: ``run_<system>.py``
consumes (modes throughput, io, paced, memory, middlewares), ``publish_<system>.py``
publishes (modes publish, scripts) and ``pipeline_<system>.py`` consumes from one
queue and publishes each message to another (mode pipeline).

A runner parses its arguments with :func:`parse_args`, builds a :class:`Meter`, and
calls ``meter.enter(payload)`` when a handler (or a publish) starts and
``meter.leave()`` when it returns (a publish: once confirmed); ``leave()`` returns
True for the N-th message.  ``meter.report()`` prints the single JSON result line
the harness reads.  A runner that cannot do what was asked with the package it has
(an API that an older asyncworker lacks) calls :func:`unsupported` instead, which
the harness reports as "n/a".

The clock (wall and CPU) starts when the first handler (publish) starts and stops
when the N-th returns, so interpreter start-up, imports and connecting are excluded
for every system alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn
from urllib.parse import quote

# What every publish and pipeline runner publishes: 100 bytes of JSON, the size of
# the consumers' messages (the same for every message: what is measured is the
# client, not building bodies).
BODY = (b'{"ts":0000000000000000000,"pad":"' + b"x" * 100)[:98] + b'"}'
assert len(BODY) == 100


def parse_args(system: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"benchmark runner for {system}")
    p.add_argument("--queue", required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="handler sleep in seconds")
    p.add_argument("--latency", action="store_true", help="record publish->handler latency")
    p.add_argument("--variant", default="default", help="system-specific variant")
    p.add_argument("--inflight", type=int, default=1, help="publish: publishes awaited at once")
    p.add_argument("--aux", default="", help="an auxiliary queue (warm-up, idle route)")
    p.add_argument("--out", default="", help="pipeline: the queue each message is published to")
    p.add_argument(
        "--stop-ok", type=int, default=0, help="pipeline check: stop after this many successes..."
    )
    p.add_argument(
        "--stop-failed", type=int, default=0, help="...and at least this many failed handlers"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--vhost", default="/")
    args = p.parse_args()
    args.system = system
    return args


def amqp_url(args: argparse.Namespace) -> str:
    """The broker's ``amqp://`` URL, for the clients that take one."""
    vhost = quote(args.vhost, safe="")  # "/" is "%2F"
    return f"amqp://{args.user}:{args.password}@{args.host}:{args.port}/{vhost}"


def _cpu() -> float:
    """Seconds on CPU of this process's threads.

    From the scheduler's exact per-thread accounting (``/proc/self/task/*/
    schedstat``) where Linux has it; ``getrusage`` samples CPU time at timer
    ticks, which biases a process that wakes 1,000 times a second.
    """
    try:
        total = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except OSError:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime


def publish_ts(payload: Any) -> int:
    """The publisher's time.time_ns() from a body (bytes), a decoded dict, or dramatiq args."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return int(bytes(payload[6:25]))
    if isinstance(payload, str):
        return int(payload[6:25])
    if isinstance(payload, dict):
        return int(payload["ts"])
    if isinstance(payload, list | tuple):
        return int(payload[0])
    raise TypeError(f"cannot find a timestamp in {type(payload)!r}")


class Meter:
    """Counts handled messages, concurrency and (optionally) latency.

    Thread-safe enough for dramatiq's worker threads (a lock guards the counters);
    for the single-threaded event loops the lock is uncontended.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.system: str = args.system
        self.target: int = args.messages
        self.want_latency: bool = args.latency
        self.extra: dict[str, Any] = {}
        self.stop_ok: int = getattr(args, "stop_ok", 0)
        self.stop_failed: int = getattr(args, "stop_failed", 0)
        self.handled = 0
        self.failed = 0
        self._stopped = False
        self.active = 0
        self.max_active = 0
        self.latencies_ns: list[int] = []
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._c0 = 0.0
        self._t1 = 0.0
        self._c1 = 0.0

    def enter(self, payload: Any = None) -> None:
        now = time.time_ns()
        with self._lock:
            if self._t0 is None:
                self._t0 = time.perf_counter()
                self._c0 = _cpu()
            self.active += 1
            if self.active > self.max_active:
                self.max_active = self.active
            if self.want_latency:
                self.latencies_ns.append(now - publish_ts(payload))

    def leave(self) -> bool:
        with self._lock:
            self.active -= 1
            self.handled += 1
            return self._done()

    def fail(self) -> bool:
        """A handler (publish) that failed; True once the run should stop.

        Only the pipeline's check uses this: it stops after ``--stop-ok``
        successes and at least ``--stop-failed`` failures (or N successes, which
        a system that ignores the broker's refusals reaches).
        """
        with self._lock:
            self.active -= 1
            self.failed += 1
            return self._done()

    async def measured(self, step: Awaitable[Any], finished: Callable[[], Any]) -> None:
        """Await ``step`` (a pipeline handler's publish) between enter() and leave().

        An exception from ``step`` counts as a failure (``fail()``) and is
        raised again, for the system to settle the message as it does on an
        error; ``finished()`` is called once the run is complete.
        """
        self.enter()
        try:
            await step
        except Exception:
            if self.fail():
                finished()
            raise
        if self.leave():
            finished()

    def publisher(self, publish: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """An async function to start ``--inflight`` times at once (any event loop).

        Together they call ``publish()`` N times, each one awaited (confirmed)
        before its task publishes the next, so K publishes are in flight.
        """
        remaining = self.target

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                self.enter()
                await publish()
                self.leave()

        return worker

    def _done(self) -> bool:
        if self._stopped:
            return False
        if self.handled == self.target or (
            self.stop_ok and self.handled >= self.stop_ok and self.failed >= self.stop_failed
        ):
            self._stopped = True
            self._t1 = time.perf_counter()
            self._c1 = _cpu()
            return True
        return False

    def extend(self) -> None:
        """Move the end of the measured window to now.

        For work a runner deferred past its last handler (log records still
        queued for a writer thread): it must be paid for inside the window.
        """
        self._t1 = time.perf_counter()
        self._c1 = _cpu()

    def report(self) -> None:
        assert self._t0 is not None, "no message was handled"
        out: dict[str, Any] = {
            "system": self.system,
            "messages": self.handled,
            "seconds": round(self._t1 - self._t0, 6),
            "cpu_seconds": round(self._c1 - self._c0, 6),
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "max_concurrency": self.max_active,
        }
        if self.failed:
            out["failed"] = self.failed
        if self.want_latency and self.latencies_ns:
            lat = sorted(self.latencies_ns)
            out["latency_p50_ms"] = round(lat[len(lat) // 2] / 1e6, 3)
            out["latency_p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6, 3)
        out.update(self.extra)
        print(json.dumps(out), flush=True)


def unsupported(system: str, reason: str) -> NoReturn:
    """Report that this runner cannot run what was asked here (e.g. an old asyncworker)."""
    print(json.dumps({"system": system, "unsupported": reason}), flush=True)
    sys.exit(0)
