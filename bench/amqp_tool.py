"""Blocking AMQP 0-9-1 helper used by the harness (runs in ``bench/.venvs/_harness``).

Only depends on ``pamqp``.  It pre-fills queues (publisher confirms, persistent
messages), publishes at a paced rate for the ``paced`` mode, and deletes queues.

Usage (see ``run.py``)::

    python amqp_tool.py fill   --queue Q --messages N [--format raw|dramatiq] [--args JSON]
    python amqp_tool.py paced  --queue Q --rate 1000 --seconds 10 [--format ...] [--args JSON]
    python amqp_tool.py delete --queue Q [--queue Q2 ...]
    python amqp_tool.py count  --queue Q [--queue Q2 ...] [--expect N] [--seconds 10]

``count`` reads the ready messages of existing queues (passive declares) and
prints them once the first queue holds ``--expect`` messages (without it: once
two reads 0.2 s apart agree), or after ``--seconds``: a publisher without confirms may have
messages still in flight when its process exits, and a closed connection's
unacked messages take a moment to be back in their queue.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from pamqp import body as pbody
from pamqp import commands, frame, header

BODY_SIZE = 100
FRAME_MAX = 131072
CONTENT_TYPE = "application/json"


def raw_body(ts_ns: int) -> bytes:
    """A 100-byte JSON body whose bytes 6..25 are the publish time in ns."""
    prefix = f'{{"ts":{ts_ns:019d},"pad":"'
    pad = BODY_SIZE - len(prefix) - 2
    out = (prefix + "x" * pad + '"}').encode()
    assert len(out) == BODY_SIZE
    return out


def dramatiq_body(queue: str) -> Callable[[int], bytes]:
    """dramatiq's own encoding (``dramatiq.Message(...).encode()``: compact JSON)."""

    def encode(ts_ns: int) -> bytes:
        msg = {
            "queue_name": queue,
            "actor_name": "handle",
            "args": [ts_ns, "x" * 40],
            "kwargs": {},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": ts_ns // 1_000_000,
        }
        return json.dumps(msg, separators=(",", ":")).encode()

    return encode


class Client:
    """Just enough of a synchronous AMQP client: one channel, confirms, publish."""

    def __init__(self, host: str, port: int, user: str, password: str, vhost: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(frame.marshal(header.ProtocolHeader(), 0))
        start = self.expect(commands.Connection.Start)
        self.server_properties: dict[str, Any] = dict(start.server_properties)
        self.send(
            commands.Connection.StartOk(
                client_properties={"product": "asyncworker-bench"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            )
        )
        tune = self.expect(commands.Connection.Tune)
        self.send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=min(FRAME_MAX, tune.frame_max), heartbeat=0
            )
        )
        self.send(commands.Connection.Open(virtual_host=vhost))
        self.expect(commands.Connection.OpenOk)
        self.send(commands.Channel.Open(), 1)
        self.expect(commands.Channel.OpenOk)
        self.confirming = False

    # -- framing -----------------------------------------------------------------
    def send(self, value: Any, channel: int = 0) -> None:
        self.sock.sendall(frame.marshal(value, channel))

    def read_frame(self) -> Any:
        while True:
            if len(self.buf) >= 7:
                try:
                    consumed, _channel, value = frame.unmarshal(self.buf)
                except Exception:  # incomplete frame (pamqp raises UnmarshalingException)
                    consumed = 0
                if consumed:
                    self.buf = self.buf[consumed:]
                    if isinstance(value, commands.Connection.Close | commands.Channel.Close):
                        raise RuntimeError(f"broker closed: {value.reply_code} {value.reply_text}")
                    return value
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("broker closed the socket")
            self.buf += chunk

    def expect(self, kind: type) -> Any:
        while True:
            value = self.read_frame()
            if isinstance(value, kind):
                return value
            if isinstance(value, commands.Connection.Blocked):
                print("broker says connection blocked", file=sys.stderr)

    # -- commands ------------------------------------------------------------------
    def declare(
        self, queue: str, arguments: dict[str, Any] | None = None, passive: bool = False
    ) -> commands.Queue.DeclareOk:
        self.send(
            commands.Queue.Declare(
                queue=queue, durable=True, passive=passive, arguments=arguments or {}
            ),
            1,
        )
        return self.expect(commands.Queue.DeclareOk)

    def delete(self, queue: str) -> None:
        self.send(commands.Queue.Delete(queue=queue), 1)
        self.expect(commands.Queue.DeleteOk)

    def purge(self, queue: str) -> None:
        self.send(commands.Queue.Purge(queue=queue), 1)
        self.expect(commands.Queue.PurgeOk)

    def confirm(self) -> None:
        self.send(commands.Confirm.Select(), 1)
        self.expect(commands.Confirm.SelectOk)
        self.confirming = True

    def publish_frames(self, queue: str, payload: bytes) -> bytes:
        props = commands.Basic.Properties(delivery_mode=2, content_type=CONTENT_TYPE)
        return (
            frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1)
            + frame.marshal(header.ContentHeader(0, len(payload), props), 1)
            + frame.marshal(pbody.ContentBody(payload), 1)
        )

    def wait_confirms(self, upto: int) -> None:
        """Block until the broker confirmed every publish up to sequence ``upto``."""
        confirmed = self._confirmed
        while confirmed < upto:
            value = self.read_frame()
            if isinstance(value, commands.Basic.Ack):
                confirmed = max(confirmed, value.delivery_tag)
            elif isinstance(value, commands.Basic.Nack):
                raise RuntimeError("broker nacked a publish")
        self._confirmed = confirmed

    _confirmed = 0

    def close(self) -> None:
        try:
            self.send(commands.Connection.Close(reply_code=200, reply_text="bye"))
            self.expect(commands.Connection.CloseOk)
        except Exception:
            pass
        self.sock.close()


def make_encoder(fmt: str, queue: str) -> Callable[[int], bytes]:
    return dramatiq_body(queue) if fmt == "dramatiq" else raw_body


def fill(c: Client, queue: str, n: int, encode: Callable[[int], bytes], batch: int = 2000) -> None:
    c.confirm()
    sent = 0
    while sent < n:
        k = min(batch, n - sent)
        c.sock.sendall(b"".join(c.publish_frames(queue, encode(time.time_ns())) for _ in range(k)))
        sent += k
        c.wait_confirms(sent - batch // 2 if sent < n else sent)
    c.wait_confirms(n)


def paced(
    c: Client, queue: str, rate: float, seconds: float, encode: Callable[[int], bytes]
) -> int:
    """Publish ``rate`` msg/s for ``seconds`` in 1 ms ticks; returns the count sent."""
    # wait (at most 60 s) until the consumer under test is registered on the queue
    deadline = time.monotonic() + 60
    while c.declare(queue, passive=True).consumer_count < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("no consumer showed up on " + queue)
        time.sleep(0.05)
    c.confirm()
    total = int(rate * seconds)
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            c.sock.sendall(
                b"".join(c.publish_frames(queue, encode(time.time_ns())) for _ in range(due - sent))
            )
            sent = due
        # drain confirms without blocking the pacing loop for long
        c.sock.settimeout(0.0)
        try:
            while True:
                chunk = c.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("broker closed the socket")
                c.buf += chunk
        except BlockingIOError:
            pass
        finally:
            c.sock.settimeout(30)
        next_at = start + (sent + 1) / rate
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    c.wait_confirms(total)
    return total


def count(c: Client, queues: list[str], expect: int | None, seconds: float) -> dict[str, int]:
    deadline = time.monotonic() + seconds
    last: dict[str, int] | None = None
    while True:
        now = {q: c.declare(q, passive=True).message_count for q in queues}
        if expect is not None and now[queues[0]] >= expect:
            return now
        if (expect is None and now == last) or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["fill", "paced", "delete", "declare", "count", "info"])
    p.add_argument("--queue", action="append", default=[])
    p.add_argument("--messages", type=int, default=0)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--expect", type=int, default=None, help="count: stop early at this many")
    p.add_argument("--format", choices=["raw", "dramatiq"], default="raw")
    p.add_argument("--args", default="{}", help="queue arguments (JSON)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--vhost", default="/")
    a = p.parse_args()
    c = Client(a.host, a.port, a.user, a.password, a.vhost)
    try:
        if a.action == "info":
            props = c.server_properties
            print(
                json.dumps({k: str(props.get(k, "")) for k in ("product", "version", "platform")})
            )
            return
        queue = a.queue[0]
        if a.action == "delete":
            for q in a.queue:
                c.delete(q)
            return
        if a.action == "count":
            print(json.dumps(count(c, a.queue, a.expect, a.seconds)))
            return
        ok = c.declare(queue, json.loads(a.args))
        if a.action == "declare":
            print(json.dumps({"queue": queue, "ready": ok.message_count}))
            return
        encode = make_encoder(a.format, queue)
        if a.action == "fill":
            c.purge(queue)
            fill(c, queue, a.messages, encode)
            ok = c.declare(queue, json.loads(a.args))
            print(json.dumps({"queue": queue, "ready": ok.message_count}))
        else:
            print(
                json.dumps(
                    {"queue": queue, "published": paced(c, queue, a.rate, a.seconds, encode)}
                )
            )
    finally:
        c.close()


if __name__ == "__main__":
    main()
