"""Probe the raw throughput of the AMQP transport (``asyncworker._transports.amqp``).

Pre-fills a durable queue with N persistent 100-byte messages, then consumes
them with prefetch 256 and one ``basic.ack`` per message from an empty
handler, and prints messages per second.  ``--profile`` runs the consuming
phase under cProfile.

    python bench/probe_transport.py [-n 20000] [--prefetch 256] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time
import uuid

import trio

from asyncworker._transports import ConnectionParams, Delivery, Properties
from asyncworker._transports.amqp import connect


async def fill(params: ConnectionParams, queue: str, count: int, size: int) -> None:
    body = b"x" * size
    props = Properties(delivery_mode=2)
    async with connect(params) as conn:
        ch = await conn.channel()
        await ch.queue_declare(queue, durable=True)
        await ch.queue_purge(queue)
        await ch.confirm_select()
        # Unconfirmed publishes, then one confirmed publish as a barrier: the
        # broker confirms in order, so the queue holds everything afterwards.
        plain = await conn.channel()
        for _ in range(count - 1):
            await plain.publish(body, routing_key=queue, properties=props)
        await plain.queue_declare(queue, passive=True)  # round trip: all received
        await ch.publish(body, routing_key=queue, properties=props)
        for _ in range(200):
            if (await ch.queue_declare(queue, passive=True)).message_count >= count:
                break
            await trio.sleep(0.05)


async def consume(params: ConnectionParams, queue: str, count: int, prefetch: int) -> float:
    async with connect(params) as conn:
        ch = await conn.channel()
        await ch.qos(prefetch)
        done = trio.Event()
        received = 0
        ack = ch.ack

        def on_delivery(delivery: Delivery) -> None:
            nonlocal received
            ack(delivery.delivery_tag)
            received += 1
            if received == count:
                done.set()

        start = time.perf_counter()
        await ch.consume(queue, on_delivery)
        await done.wait()
        elapsed = time.perf_counter() - start
        await ch.queue_delete(queue)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=20000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--profile", action="store_true", help="profile the consume phase")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds to let the broker settle after filling"
    )
    args = parser.parse_args()
    params = ConnectionParams.from_url(args.url)
    for _ in range(args.repeat):
        queue = f"aw-probe-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        trio.run(fill, params, queue, args.count, args.size)
        fill_s = time.perf_counter() - t0
        time.sleep(args.settle)
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = trio.run(consume, params, queue, args.count, args.prefetch)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        print(
            f"filled {args.count} in {fill_s:.2f} s ({args.count / fill_s:,.0f} msg/s); "
            f"consumed+acked in {elapsed:.3f} s: {args.count / elapsed:,.0f} msg/s "
            f"(client CPU {cpu * 1e6 / args.count:.1f} us/msg)"
        )


if __name__ == "__main__":
    main()
