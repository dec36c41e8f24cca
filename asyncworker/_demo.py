"""``asyncworker demo``: an example App on a private in-memory broker.

The example is deterministic so that its summary can be checked:

* messages ``1..N`` alternate between two queues: odd ids go to
  ``demo.orders``, even ids to ``demo.emails``;
* ``demo.orders`` has ``Retry(max_attempts=3)``: an id divisible by 7 always
  fails (it is retried twice, then dead-lettered into ``demo.orders.dlq``); an
  id divisible by 5 (and not by 7) fails on its first attempt only (one retry);
* ``demo.emails`` has no Retry: an id divisible by 7 is an invalid address,
  which the handler rejects without requeue, so the queue's dead-letter
  exchange moves it to ``demo.emails.dlq``; an id divisible by 5 (and not by
  7) fails on its first delivery, is requeued by the default settlement
  policy and succeeds when redelivered.

Both routes go through the App middlewares ``[Logging(level=DEBUG),
Timing(callback)]``; the Timing callback gives the time per message.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import trio

from ._app import App
from ._message import Message
from .middlewares import Logging, Retry, Timing
from .middlewares.retry import ATTEMPT_HEADER

__all__ = ["DemoResult", "QueueSummary", "expected_summary", "run_demo"]

ORDERS = "demo.orders"
EMAILS = "demo.emails"
QUEUES = (ORDERS, EMAILS)
MAX_ATTEMPTS = 3


def queue_of(message_id: int) -> str:
    """The queue message ``message_id`` is published to."""
    return ORDERS if message_id % 2 else EMAILS


def always_fails(message_id: int) -> bool:
    """Whether handling message ``message_id`` fails on every attempt."""
    return message_id % 7 == 0


def fails_once(message_id: int) -> bool:
    """Whether handling message ``message_id`` fails on its first attempt only."""
    return message_id % 5 == 0 and not always_fails(message_id)


@dataclass
class QueueSummary:
    """What happened to the messages of one queue."""

    published: int = 0
    #: Handler calls (redeliveries and retries included).
    processed: int = 0
    #: Messages handled successfully.
    ok: int = 0
    acked: int = 0
    requeued: int = 0
    #: Copies Retry republished for another attempt.
    retried: int = 0
    dead_lettered: int = 0
    #: Seconds measured by the Timing middleware, over ``processed`` calls.
    seconds: float = 0.0
    timings: int = 0

    def numbers(self) -> tuple[int, int, int, int, int, int, int]:
        """(published, processed, ok, acked, requeued, retried, dead_lettered)."""
        return (
            self.published,
            self.processed,
            self.ok,
            self.acked,
            self.requeued,
            self.retried,
            self.dead_lettered,
        )


@dataclass
class DemoResult:
    """The per-queue summaries and the wall time of a demo run."""

    queues: dict[str, QueueSummary] = field(default_factory=dict)
    elapsed: float = 0.0


def expected_summary(messages: int) -> dict[str, tuple[int, int, int, int, int, int, int]]:
    """The numbers ``run_demo(messages)`` must report, derived from the failure rule."""
    result = {}
    for queue in QUEUES:
        ids = [i for i in range(1, messages + 1) if queue_of(i) == queue]
        poison = sum(1 for i in ids if always_fails(i))
        once = sum(1 for i in ids if fails_once(i))
        if queue == ORDERS:
            # Every attempt is acked (Retry acks the original after republishing).
            processed = len(ids) + once + poison * (MAX_ATTEMPTS - 1)
            result[queue] = (
                len(ids),
                processed,
                len(ids) - poison,
                processed,
                0,
                once + poison * (MAX_ATTEMPTS - 1),
                poison,
            )
        else:
            processed = len(ids) + once
            result[queue] = (
                len(ids),
                processed,
                len(ids) - poison,
                len(ids) - poison,
                once,
                0,
                poison,
            )
    return result


def build_app(summary: DemoResult) -> App:
    """The example App; it records what it does in ``summary``."""
    queues = summary.queues

    def timing(name: str, time_delta: float, **_: Any) -> None:
        record = queues[name]
        record.seconds += time_delta
        record.timings += 1

    app = App(
        url="memory://",
        prefetch_count=10,
        grace_period=5,
        middlewares=[Logging(level=logging.DEBUG), Timing(timing)],
        loop_block_threshold=None,
    )

    async def work(message: Message) -> int:
        message_id = int(message.json()["id"])
        queues[message.queue].processed += 1
        # Pretend to do some I/O: 10 to 50 ms.
        await trio.sleep((message_id % 5 + 1) / 100)
        return message_id

    @app.route([ORDERS], middlewares=[Retry(max_attempts=MAX_ATTEMPTS)])
    async def handle_order(message: Message) -> None:
        message_id = await work(message)
        first_attempt = ATTEMPT_HEADER not in message.headers
        if always_fails(message_id):
            raise ValueError(f"order {message_id} references an unknown product")
        if fails_once(message_id) and first_attempt:
            raise ConnectionError(f"payment service timed out for order {message_id}")
        queues[ORDERS].ok += 1

    @app.route([EMAILS])
    async def send_email(message: Message) -> None:
        message_id = await work(message)
        if always_fails(message_id):
            await message.reject(requeue=False)  # invalid address: to the dead-letter queue
            return
        if fails_once(message_id) and not message.redelivered:
            raise ConnectionError(f"SMTP server busy for email {message_id}")
        queues[EMAILS].ok += 1

    return app


def run_demo(messages: int = 200, *, out: IO[str] | None = None) -> int:
    """Run the demo, print progress and the summary to ``out``; return the exit status."""
    stream = out if out is not None else sys.stdout
    result = trio.run(_demo, messages, stream)
    _print_summary(result, stream)
    return 0


async def _demo(messages: int, out: IO[str]) -> DemoResult:
    result = DemoResult(queues={queue: QueueSummary() for queue in QUEUES})
    app = build_app(result)
    dead_letter_args = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{EMAILS}.dlq",
    }
    client = app.test_client(queues={EMAILS: dead_letter_args, f"{EMAILS}.dlq": None})
    start = time.perf_counter()
    async with client:
        print(
            f"asyncworker demo: {messages} messages to {ORDERS!r} (Retry, 3 attempts) and "
            f"{EMAILS!r} (requeue, dead-letter exchange) on the embedded broker",
            file=out,
        )
        for message_id in range(1, messages + 1):
            queue = queue_of(message_id)
            result.queues[queue].published += 1
            await client.publish(queue, json.dumps({"id": message_id}).encode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_show_progress, result, messages, out)
            await client.wait_until_idle()
            nursery.cancel_scope.cancel()
        result.elapsed = time.perf_counter() - start
        for queue, record in result.queues.items():
            record.acked = client.acked(queue)
            record.requeued = client.requeued(queue)
            record.retried = client.stats(queue).published - record.published
            record.dead_lettered = client.dead_lettered(queue)
    _progress_line(result, messages, out, final=True)
    return result


def _done(result: DemoResult) -> int:
    return sum(record.ok for record in result.queues.values())


async def _show_progress(result: DemoResult, messages: int, out: IO[str]) -> None:
    interactive = out.isatty()
    while True:
        _progress_line(result, messages, out)
        await trio.sleep(0.1 if interactive else 0.5)


def _progress_line(result: DemoResult, messages: int, out: IO[str], final: bool = False) -> None:
    parts = [
        f"{queue} {record.processed} handled, {record.ok} ok"
        for queue, record in result.queues.items()
    ]
    line = f"  progress: {' | '.join(parts)}"
    if out.isatty():
        # One line, rewritten in place.
        out.write("\r\x1b[K" + line + ("\n" if final else ""))
    else:
        out.write(line + "\n")
    out.flush()


def _print_summary(result: DemoResult, out: IO[str]) -> None:
    header = (
        "queue",
        "published",
        "processed",
        "ok",
        "acked",
        "requeued",
        "retried",
        "dead-lettered",
        "ms/message",
    )
    rows: list[tuple[str, ...]] = []
    totals = QueueSummary()
    for queue, record in result.queues.items():
        rows.append(_row(queue, record))
        for name in ("published", "processed", "ok", "acked", "requeued", "retried"):
            setattr(totals, name, getattr(totals, name) + getattr(record, name))
        totals.dead_lettered += record.dead_lettered
        totals.seconds += record.seconds
        totals.timings += record.timings
    rows.append(_row("total", totals))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )

    print("", file=out)
    print(fmt(header), file=out)
    print("  ".join("-" * width for width in widths), file=out)
    for row in rows:
        print(fmt(row), file=out)
    print("", file=out)
    orders, emails = result.queues[ORDERS], result.queues[EMAILS]
    print(
        f"{orders.dead_lettered} orders failed {MAX_ATTEMPTS} attempts and went to "
        f"'{ORDERS}.dlq' (Retry); {emails.dead_lettered} emails were rejected into "
        f"'{EMAILS}.dlq' (the queue's dead-letter exchange).",
        file=out,
    )
    print(
        "(processed: handler calls; ok: handled successfully; acked: acks the broker received,\n"
        " one per attempt on demo.orders, since Retry acks a failed message once its copy is\n"
        " republished; retried: copies Retry republished; ms/message: average handler time,\n"
        " with up to 10 handlers per queue running at once.)",
        file=out,
    )
    print(
        f"Done in {result.elapsed:.2f} s.  --verbose shows one log line per message; "
        "the code is asyncworker/_demo.py.",
        file=out,
    )


def _row(name: str, record: QueueSummary) -> tuple[str, ...]:
    per_message = record.seconds / record.timings * 1000 if record.timings else math.nan
    return (
        name,
        *(str(n) for n in record.numbers()),
        f"{per_message:.1f}",
    )
