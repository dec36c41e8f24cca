"""The CPU floor of a consumer woken once per message, per event loop.

At a paced 1,000 msg/s every message arrives on its own, so each one costs at
least one wake-up of the event loop: an epoll wait returning, a ``recv``, and
the loop's own bookkeeping.  This script measures that floor with nothing else
around it: a forked child sends 150-byte messages on a socket pair at 1,000/s
and the parent receives them with a plain blocking loop, with asyncio, and
with trio, reporting on-CPU time per message from ``/proc/self/schedstat``
(exact, unlike tick-sampled rusage).  See docs/benchmarks.md.

    python bench/wakeup_floor.py [--messages 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from collections.abc import Callable

import trio


def cpu_ns() -> int:
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0])


def paced_sender(sock: socket.socket, count: int, rate: float) -> None:
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sock.send(b"x" * 150)


def blocking(sock: socket.socket, count: int) -> None:
    received = 0
    while received < count:
        received += len(sock.recv(65536)) // 150


def with_asyncio(sock: socket.socket, count: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        received = 0
        while received < count:
            received += len(await loop.sock_recv(sock, 65536)) // 150

    asyncio.run(main())


def with_trio(sock: socket.socket, count: int) -> None:
    async def main() -> None:
        tsock = trio.socket.from_stdlib_socket(sock)
        received = 0
        while received < count:
            received += len(await tsock.recv(65536)) // 150

    trio.run(main)


def measure(receive: Callable[[socket.socket, int], None], count: int) -> float:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the sender
        ours.close()
        paced_sender(theirs, count, 1000.0)
        os._exit(0)
    theirs.close()
    start = cpu_ns()
    receive(ours, count)
    used = cpu_ns() - start
    os.waitpid(pid, 0)
    ours.close()
    return used / count / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    for name, receive in [
        ("blocking recv", blocking),
        ("asyncio", with_asyncio),
        ("trio", with_trio),
    ]:
        print(
            f"{name:14s} {measure(receive, args.messages):6.1f} µs CPU per message at 1,000 msg/s"
        )


if __name__ == "__main__":
    main()
