"""Runner for ``dramatiq[rabbitmq]==2.*``: a ``Worker`` consuming one actor's queue.

Runs in ``bench/.venvs/dramatiq``.  dramatiq is thread-based: actors are plain
functions run by ``worker_threads`` (dramatiq's default, 8) threads, so the D=5ms
handler is ``time.sleep(0.005)`` and at most 8 handlers run at once.  The queue
prefetch is set to 256 via dramatiq's ``dramatiq_queue_prefetch`` environment knob.
The harness pre-fills the queue with dramatiq's own message encoding and declares
it with the dead-letter arguments dramatiq itself uses.
"""

from __future__ import annotations

import os
import threading
import time

os.environ["dramatiq_queue_prefetch"] = "256"  # noqa: SIM112 (dramatiq reads this exact name)

import dramatiq
from _common import Meter, amqp_url, parse_args
from dramatiq.brokers.rabbitmq import RabbitmqBroker

args = parse_args("dramatiq")
meter = Meter(args)
done = threading.Event()
delay = args.delay
want_latency = args.latency

broker = RabbitmqBroker(url=amqp_url(args))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=args.queue, actor_name="handle", max_retries=0)
def handle(ts: int, pad: str) -> None:
    meter.enter([ts] if want_latency else None)
    if delay:
        time.sleep(delay)
    if meter.leave():
        done.set()


worker = dramatiq.Worker(broker, worker_threads=8)
worker.start()
done.wait()
time.sleep(0.1)  # let the worker ack the last messages
meter.report()
worker.stop(timeout=5000)
broker.close()
