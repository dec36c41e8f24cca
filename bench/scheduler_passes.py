"""Scheduler passes per message at a paced 1,000 msg/s: trio I/O waits and task steps.

A deterministic view of the per-message overhead that CPU times, noisy on
shared machines, only show blurred: how many times trio's run loop waits for
I/O and how many task steps it runs per message, while a separate process
publishes 2,000 messages at 1,000 msg/s to an App.  Needs RabbitMQ on
127.0.0.1:5672.

    python bench/scheduler_passes.py
"""

from __future__ import annotations

import subprocess
import sys

import trio

from asyncworker import App, Message
from asyncworker._transports import ConnectionParams, connect

URL = "amqp://guest:guest@127.0.0.1/"
QUEUE = "aw-bench-scheduler-passes"
COUNT = 2000

PUBLISHER = f"""
import time, trio
from asyncworker._transports import connect, ConnectionParams
async def main():
    async with connect(ConnectionParams.from_url({URL!r})) as connection:
        channel = await connection.channel()
        start = time.perf_counter()
        for i in range({COUNT}):
            delay = start + i / 1000 - time.perf_counter()
            if delay > 0:
                await trio.sleep(delay)
            await channel.publish(b"x" * 100, routing_key={QUEUE!r})
trio.run(main)
"""


class Counter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.io_waits = 0
        self.task_steps = 0

    def after_io_wait(self, timeout: float) -> None:
        self.io_waits += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.task_steps += 1


async def main() -> None:
    async with connect(ConnectionParams.from_url(URL)) as connection:
        channel = await connection.channel()
        await channel.queue_declare(QUEUE, durable=False)
        await channel.queue_purge(QUEUE)
    app = App(url=URL, prefetch_count=256)
    done = trio.Event()
    handled = 0

    @app.route([QUEUE])
    async def handler(message: Message) -> None:
        nonlocal handled
        handled += 1
        if handled == COUNT:
            done.set()

    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER])
        trio.lowlevel.add_instrument(counter)
        await done.wait()
        trio.lowlevel.remove_instrument(counter)
        await app.shutdown()
        publisher.wait()
    async with connect(ConnectionParams.from_url(URL)) as connection:
        await (await connection.channel()).queue_delete(QUEUE)
    print(
        f"per message: {counter.io_waits / COUNT:.2f} I/O waits, "
        f"{counter.task_steps / COUNT:.2f} task steps"
    )


if __name__ == "__main__":
    trio.run(main)
