"""Shared, stdlib-only measurement helpers imported by every runner in this folder.

A runner parses its arguments with :func:`parse_args`, builds a :class:`Meter`, and
calls ``meter.enter(payload)`` when a handler starts and ``meter.leave()`` when it
returns; ``leave()`` returns True for the N-th handled message.  ``meter.report()``
prints the single JSON result line the harness reads.

The clock (wall and CPU) starts when the first handler starts and stops when the
N-th handler returns, so interpreter start-up, imports and connecting are excluded
for every system alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from typing import Any


def parse_args(system: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"benchmark runner for {system}")
    p.add_argument("--queue", required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="handler sleep in seconds")
    p.add_argument("--latency", action="store_true", help="record publish->handler latency")
    p.add_argument("--variant", default="default", help="system-specific variant")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--vhost", default="/")
    args = p.parse_args()
    args.system = system
    return args


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
        self.handled = 0
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
            if self.handled == self.target:
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
        if self.want_latency and self.latencies_ns:
            lat = sorted(self.latencies_ns)
            out["latency_p50_ms"] = round(lat[len(lat) // 2] / 1e6, 3)
            out["latency_p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6, 3)
        out.update(self.extra)
        print(json.dumps(out), flush=True)
