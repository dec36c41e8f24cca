"""Profile asyncworker's publish path: ``app.publish`` inside a serving App, K in flight.

The same work as the ``publish`` mode's asyncworker row (``systems/publish_asyncworker.py``):
N persistent 100-byte publishes with confirms, ``--inflight`` tasks awaiting one
each, from inside ``serve()``.  It runs once without the profiler (msg/s and CPU
µs per publish, the scheduler's figure) and then once under cProfile, and prints
the functions that cost the most per publish with their **calls per publish**:
exact counts (cProfile's times are inflated for small functions, its counts are
not), which say whether a publish pays for a lock, an event, a task start, a
run-loop pass.  ``--no-profile`` skips the second pass (to sample the first with
py-spy instead: ``py-spy record --format raw -o out.txt -- python bench/profile_publish.py
--no-profile``).

    python bench/profile_publish.py [-n 20000] [--inflight 64] [--top 30]

Runs with the project venv's python against the broker on 127.0.0.1:5672
(``--host``/``--port``...); it declares and deletes its own queues.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "systems"))
from _common import BODY, _cpu
from amqp_tool import Client

from asyncworker import App, Message

# Functions whose calls per publish answer "what does one publish cost in events,
# locks, tasks and scheduler passes" (matched on the end of "file:function").
WATCH = (
    "_core/_run.py:reschedule",
    "_core/_run.py:spawn_impl",
    "_sync.py:set",
    "_sync.py:wait",
    "_sync.py:acquire_nowait",
    "_core/_io_epoll.py:get_events",
    "_core/_run.py:checkpoint",
    "_timeouts.py:fail_after",
    "contextlib.py:__aenter__",
    "socket.py:send",
)


async def publish_all(app: App, queue: str, n: int, inflight: int) -> None:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await app.publish(BODY, routing_key=queue)

    async with trio.open_nursery() as nursery:
        for _ in range(inflight):
            nursery.start_soon(worker)


async def run(args: argparse.Namespace, queue: str, aux: str) -> None:
    app = App(host=args.host, port=args.port, user=args.user, password=args.password)

    @app.route([aux])
    async def idle(message: Message) -> None:
        return None

    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        await app.publish(BODY, routing_key=aux)  # connect outside the measured part
        t0, c0 = time.perf_counter(), _cpu()
        await publish_all(app, queue, args.messages, args.inflight)
        t1, c1 = time.perf_counter(), _cpu()
        print(
            f"unprofiled: {args.messages / (t1 - t0):,.0f} msg/s, "
            f"{(c1 - c0) / args.messages * 1e6:.1f} µs CPU per publish "
            f"({args.inflight} in flight)"
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await publish_all(app, queue, args.messages, args.inflight)
            profiler.disable()
            report(pstats.Stats(profiler), args.messages, args.top)
        await app.shutdown()


def report(stats: pstats.Stats, n: int, top: int) -> None:
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values())
    print(f"\nprofiled: {total / n * 1e6:.1f} µs of profiled time per publish; top by own time:")
    print(f"{'own µs/pub':>10} {'share':>6} {'calls/pub':>9}  function")
    rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (path, line, func), (_cc, ncalls, tt, _ct, _callers) in rows:
        where = "/".join(Path(path).parts[-2:]) if path != "~" else ""
        print(f"{tt / n * 1e6:10.2f} {tt / total:6.1%} {ncalls / n:9.2f}  {where}:{line} {func}")
    print("\ncalls per publish of what a publish may pay for:")
    for pattern in WATCH:
        calls = sum(
            nc for (path, _line, func), (_cc, nc, *_rest) in entries.items()
            if f"{path}:{func}".endswith(pattern)
        )  # fmt: skip
        print(f"{calls / n:9.2f}  {pattern}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--messages", type=int, default=20_000)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    args = p.parse_args()
    queue, aux = f"bench_profile_publish_{os.getpid()}", f"bench_profile_publish_{os.getpid()}.aux"
    c = Client(args.host, args.port, args.user, args.password, "/")
    try:
        c.declare(queue)
        c.declare(aux)
        trio.run(run, args, queue, aux)
    finally:
        c.delete(queue)
        c.delete(aux)
        c.close()


if __name__ == "__main__":
    main()
