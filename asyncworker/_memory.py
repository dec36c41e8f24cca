"""The embedded in-memory AMQP broker behind ``memory://NAME`` URLs.

It implements the transport seam of ``asyncworker._transport`` without a
network: ``connect(params)`` opens a connection to the process-wide broker
named ``params.host`` ("default" for ``memory://``), created on first use.
The same behaviour tests run against RabbitMQ and against this broker, so it
follows RabbitMQ 3.10 where workers can observe the difference, with the same
reply codes and texts (``404 NOT_FOUND``, ``406 PRECONDITION_FAILED``, ...).

Modelled:

* vhosts (``/`` exists; ``MemoryBroker.add_vhost``; an unknown vhost is a
  ``ConnectError``);
* the default exchange (also as ``amq.default``), the pre-declared
  ``amq.direct``/``amq.fanout``/``amq.topic``, user exchanges of type
  ``direct``, ``fanout`` and ``topic`` (``*`` is one word, ``#`` zero or more),
  queue bindings, ``exchange.declare`` (passive too; the ``amq.`` prefix is
  reserved, 403) and ``exchange.delete``;
* ``queue.declare`` (passive, server-named ``amq.gen-...`` queues, argument
  equivalence checks -> 406), ``queue.delete`` (``if_unused``/``if_empty``;
  consumers get the consumer-cancel notification), ``queue.purge``,
  exclusive queues (owned by their connection, 405 RESOURCE_LOCKED for others,
  deleted with it) and auto-delete queues (deleted when the last consumer
  goes);
* consumers with per-consumer prefetch (``qos`` applies to consumers started
  after it, 0 = unlimited), round-robin between a queue's consumers, exclusive
  consumers (403), ``basic.get``, FIFO delivery per consumer, delivery tags per
  channel from 1;
* ``ack``/``reject``/``nack`` (``multiple`` too; tag 0 with ``multiple`` means
  all); requeued messages go back to the queue with ``redelivered=True``:
  in a classic queue at their original position (in
  publish order among the other requeued ones, as RabbitMQ does); in a quorum
  queue, as RabbitMQ 3.10 does, a message returned by a closing channel goes
  to the head (after the messages returned before it) and one requeued by
  ``reject``/``nack`` to the back of the queue; an unknown delivery tag
  closes the channel with 406; unacknowledged messages are requeued when
  their channel or connection closes;
* dead-lettering (``x-dead-letter-exchange``, ``x-dead-letter-routing-key``)
  for reasons ``rejected``, ``expired``, ``maxlen`` and ``delivery_limit``,
  with RabbitMQ's ``x-death`` header (count, reason, queue, time, exchange,
  routing-keys, original-expiration), the ``x-first-death-*`` headers, the
  ``expiration`` property removed, and RabbitMQ's dead-letter cycle detection
  (a cycle without a rejection drops the message);
* message TTL from ``x-message-ttl`` and the per-message ``expiration``
  property.  As in RabbitMQ, messages only expire at the head of the queue (a
  long-lived message blocks the expiry of the ones behind it); a background
  timer on trio's clock expires them without any consumer, so a TTL "delay
  queue" dead-lettering back into a work queue works, and under
  ``trio.testing.MockClock(autojump_threshold=0)`` a 30 s TTL takes no time;
* ``x-queue-type: quorum`` queues: the ``x-delivery-count`` header (absent on
  a consumer's first delivery, 0 in a first ``basic.get-ok``, then the number
  of earlier returned deliveries, which grows on requeue and on channel
  close) and ``x-delivery-limit``; quorum
  queues must be durable, non-exclusive and not auto-delete (406);
* ``x-max-length`` with ``x-overflow`` ``drop-head`` (dead-letters with reason
  ``maxlen``), ``reject-publish`` and ``reject-publish-dlx`` (publisher nack);
* publisher confirms (every routed publish is confirmed at once; a mandatory
  publish without a route raises ``Unroutable`` 312; a nack from
  ``reject-publish`` raises ``PublishNacked``), the ``user_id`` check (406) and
  invalid ``expiration`` values (406).

Not modelled: message priorities (``x-max-priority`` is accepted and
ignored), headers exchanges, exchange-to-exchange bindings, alternate
exchanges, ``x-expires``, ``x-max-length-bytes``, single active consumer,
streams, consumer priorities, auto-delete exchanges, transactions,
``basic.recover``, flow control, persistence (``durable`` is only compared)
and authentication (any user and password are accepted).

Differences in timing (both allowed by AMQP): a publish to a missing exchange
raises ``QueueNotFound`` from ``publish`` itself, with or without confirms
(RabbitMQ closes the channel asynchronously, so the real transport reports it
at the next operation); a mandatory publish without a route and without
confirms is silently dropped; an ack of an unknown delivery tag closes the
channel (``close_reason`` has code 406) without raising from ``ack`` itself,
as with the real transport, and the next operation raises.

Deliveries are never made re-entrantly: routing and settlement only append to
a per-connection outbox, and a dispatcher task in the nursery of
``connect()`` calls the ``on_delivery``/``on_cancel`` callbacks in order, so a
handler's ``ack()`` cannot recurse into the consumer.  The broker keeps
expiry deadlines in trio time, so a broker (and the messages in it) should
not outlive the ``trio.run`` that filled it; use a fresh broker per test
(``MemoryBroker()`` + ``register_broker``) or ``MemoryBroker.reset()``.
"""

from __future__ import annotations

import datetime
import heapq
import itertools
import logging
import math
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio

from ._exceptions import (
    ChannelClosed,
    ConnectError,
    ConnectionClosed,
    PublishNacked,
    QueueNotFound,
    Unroutable,
)
from ._transport import (
    CancelCallback,
    ConnectionParams,
    Delivery,
    DeliveryCallback,
    Properties,
    QueueInfo,
)

if TYPE_CHECKING:
    from ._transport import Channel, Connection

__all__ = [
    "MemoryBroker",
    "MemoryChannel",
    "MemoryConnection",
    "QueueStats",
    "connect",
    "get_broker",
    "register_broker",
    "unregister_broker",
]

logger = logging.getLogger("asyncworker.memory")

# AMQP reply codes, as RabbitMQ uses them.
REPLY_SUCCESS: Final = 200
NO_ROUTE: Final = 312
ACCESS_REFUSED: Final = 403
NOT_FOUND: Final = 404
RESOURCE_LOCKED: Final = 405
PRECONDITION_FAILED: Final = 406
COMMAND_INVALID: Final = 503
NOT_ALLOWED: Final = 530

_EXCHANGE_TYPES: Final = frozenset({"direct", "fanout", "topic"})
_OVERFLOW_MODES: Final = frozenset({"drop-head", "reject-publish", "reject-publish-dlx"})
# Queue arguments RabbitMQ compares when a queue is redeclared (others are ignored).
_EQUIVALENCE_ARGS: Final = (
    "x-message-ttl",
    "x-expires",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-max-priority",
    "x-queue-mode",
    "x-delivery-limit",
    "x-single-active-consumer",
)
# How many callbacks the dispatcher runs before it lets other tasks run.
_DISPATCH_BATCH: Final = 256


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counters of one queue since it was declared.

    Attributes:
        published: messages that entered the queue (published or dead-lettered into it).
        delivered: deliveries to consumers and ``basic.get`` answers, redeliveries included.
        acked: messages acknowledged.
        rejected: messages rejected or nacked (with or without requeue).
        requeued: messages returned to the queue (reject/nack with requeue, channel close).
        dead_lettered: messages sent to the queue's dead-letter exchange, for any reason.
        expired: messages whose TTL ran out in the queue (dead-lettered or dropped).
    """

    published: int = 0
    delivered: int = 0
    acked: int = 0
    rejected: int = 0
    requeued: int = 0
    dead_lettered: int = 0
    expired: int = 0


class _Stats:
    __slots__ = (
        "acked",
        "dead_lettered",
        "delivered",
        "expired",
        "published",
        "rejected",
        "requeued",
    )

    def __init__(self) -> None:
        self.published = 0
        self.delivered = 0
        self.acked = 0
        self.rejected = 0
        self.requeued = 0
        self.dead_lettered = 0
        self.expired = 0

    def snapshot(self) -> QueueStats:
        return QueueStats(
            published=self.published,
            delivered=self.delivered,
            acked=self.acked,
            rejected=self.rejected,
            requeued=self.requeued,
            dead_lettered=self.dead_lettered,
            expired=self.expired,
        )


def _now() -> float | None:
    """Trio's current time, or None outside ``trio.run`` (no expiry then)."""
    try:
        return trio.current_time()
    except RuntimeError:
        return None


def _copy_properties(p: Properties, headers: dict[str, Any] | None) -> Properties:
    # Written out rather than dataclasses.replace(): this is on the hot path.
    return Properties(
        content_type=p.content_type,
        content_encoding=p.content_encoding,
        headers=headers,
        delivery_mode=p.delivery_mode,
        priority=p.priority,
        correlation_id=p.correlation_id,
        reply_to=p.reply_to,
        expiration=p.expiration,
        message_id=p.message_id,
        timestamp=p.timestamp,
        type=p.type,
        user_id=p.user_id,
        app_id=p.app_id,
    )


def _clone_error(exc: BaseException) -> BaseException:
    """A fresh copy of a close reason, so that raising it twice does not chain tracebacks."""
    if isinstance(exc, ChannelClosed | ConnectionClosed):
        return type(exc)(exc.reply_text, exc.reply_code)
    return exc


def _topic_matches(pattern: tuple[str, ...], words: list[str], i: int = 0, j: int = 0) -> bool:
    """Whether the words of a routing key match a topic binding pattern."""
    np_, nw = len(pattern), len(words)
    while i < np_:
        token = pattern[i]
        if token == "#":
            while i + 1 < np_ and pattern[i + 1] == "#":
                i += 1
            if i + 1 == np_:
                return True
            return any(_topic_matches(pattern, words, i + 1, k) for k in range(j, nw + 1))
        if j == nw or (token != "*" and token != words[j]):
            return False
        i += 1
        j += 1
    return j == nw


def _words(key: str) -> list[str]:
    # RabbitMQ treats the empty key as zero words, so "*" does not match it but "#" does.
    return key.split(".") if key else []


def _is_dead_letter_cycle(queue: str, deaths: list[Any]) -> bool:
    """RabbitMQ's rule: a cycle back to ``queue`` with no rejection on the way is dropped."""
    for death in deaths:
        if not isinstance(death, Mapping):
            continue
        if death.get("reason") == "rejected":
            return False
        if death.get("queue") == queue:
            return True
    return False


class _Message:
    """One message in one queue.  The body and properties are shared, never copied."""

    __slots__ = (
        "body",
        "delivery_count",
        "exchange",
        "expires_at",
        "properties",
        "queue",
        "redelivered",
        "returned",
        "routing_key",
        "seq",
    )

    def __init__(
        self,
        queue: _Queue,
        body: bytes,
        properties: Properties,
        exchange: str,
        routing_key: str,
        expires_at: float | None,
    ) -> None:
        self.queue = queue
        self.body = body
        self.properties = properties
        self.exchange = exchange
        self.routing_key = routing_key
        self.expires_at = expires_at
        self.redelivered = False
        self.returned = False  # in a quorum queue's "returns", served before the rest
        self.delivery_count = 0
        self.seq = 0  # set by _Queue.push: the publish order within the queue


def _seq_of(message: _Message) -> int:
    return message.seq


class _Consumer:
    __slots__ = (
        "active",
        "channel",
        "exclusive",
        "on_cancel",
        "on_delivery",
        "prefetch",
        "queue",
        "tag",
        "unacked",
    )

    def __init__(
        self,
        tag: str,
        channel: MemoryChannel,
        queue: _Queue,
        on_delivery: DeliveryCallback,
        on_cancel: CancelCallback | None,
        prefetch: int,
        exclusive: bool,
    ) -> None:
        self.tag = tag
        self.channel = channel
        self.queue = queue
        self.on_delivery = on_delivery
        self.on_cancel = on_cancel
        self.prefetch = prefetch
        self.exclusive = exclusive
        self.unacked = 0
        self.active = True


class _Queue:
    """A queue: ready messages in a deque, its consumers, its counters."""

    def __init__(
        self,
        vhost: _VHost,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        owner: MemoryConnection | None,
        arguments: dict[str, Any],
        ttl: int | None,
        dlx: str | None,
        dlrk: str | None,
        max_length: int | None,
        overflow: str,
        quorum: bool,
        delivery_limit: int | None,
    ) -> None:
        self.vhost = vhost
        self.broker = vhost.broker
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.owner = owner
        self.arguments = arguments
        self.ttl = ttl
        self.dlx = dlx
        self.dlrk = dlrk
        self.max_length = max_length
        self.overflow = overflow
        self.quorum = quorum
        self.delivery_limit = delivery_limit
        self.ready: deque[_Message] = deque()
        self._seq = 0
        self.consumers: deque[_Consumer] = deque()
        self.unacked = 0
        self.stats = _Stats()
        self.had_consumers = False
        self.deleted = False
        # The earliest expiry deadline this queue has in the broker's timer heap.
        self.timer_at: float | None = None

    # -- entering the queue -------------------------------------------------

    def expiry_for(self, message_ttl: int | None, now: float | None) -> float | None:
        ttl = self.ttl
        if message_ttl is not None and (ttl is None or message_ttl < ttl):
            ttl = message_ttl
        if ttl is None or now is None:
            return None
        return now + ttl / 1000.0

    def push(self, message: _Message) -> bool:
        """Append a routed message; False if ``x-overflow`` rejected it."""
        ready = self.ready
        limit = self.max_length
        if limit is not None and len(ready) >= limit:
            if self.overflow != "drop-head":
                if self.overflow == "reject-publish-dlx":
                    self.dead_letter(message, "maxlen")
                return False
            while ready and len(ready) >= limit:
                self.dead_letter(ready.popleft(), "maxlen")
            if limit == 0:
                self.stats.published += 1
                self.dead_letter(message, "maxlen")
                return True
        self._seq += 1
        message.seq = self._seq
        ready.append(message)
        self.stats.published += 1
        if self.consumers:
            self.dispatch()
        elif len(ready) == 1:
            self.reschedule()
        return True

    def requeue(self, messages: list[_Message], *, rejected: bool = False) -> None:
        """Return messages (in delivery order) to the queue.

        ``rejected``: requeued by ``basic.reject``/``basic.nack`` rather than
        returned by a closing channel or connection (quorum queues differ).
        """
        if self.deleted:
            return
        ready = self.ready
        returned: list[_Message] = []
        limit = self.delivery_limit
        for message in messages:
            if self.quorum:
                message.delivery_count += 1
                if limit is not None and message.delivery_count > limit:
                    self.dead_letter(message, "delivery_limit")
                    continue
            message.redelivered = True
            returned.append(message)
        if not returned:
            return
        self.stats.requeued += len(returned)
        head: list[_Message] = []
        if self.quorum and rejected:
            # RabbitMQ 3.10's quorum queues requeue a rejected message at the
            # back, so that a poison message cannot block the head.
            for message in returned:
                message.returned = False
                self._seq += 1
                message.seq = self._seq
            ready.extend(returned)
        elif self.quorum:
            # Messages returned by a closing channel are served first, in the
            # order they came back.
            while ready and ready[0].returned:
                head.append(ready.popleft())
            for message in returned:
                message.returned = True
            head.extend(returned)
        else:
            # A classic queue puts them back at their original position: merge
            # by publish sequence with the returned messages already at the head.
            returned.sort(key=_seq_of)
            top = returned[-1].seq
            while ready and ready[0].seq < top:
                head.append(ready.popleft())
            head = list(heapq.merge(head, returned, key=_seq_of)) if head else returned
        if head:
            ready.extendleft(reversed(head))
        self.dispatch()
        self.reschedule()

    # -- leaving the queue --------------------------------------------------

    def pick_consumer(self) -> _Consumer | None:
        consumers = self.consumers
        for _ in range(len(consumers)):
            consumer = consumers[0]
            # Rotate before checking so that the next pick starts after this one.
            consumers.rotate(-1)
            if consumer.prefetch == 0 or consumer.unacked < consumer.prefetch:
                return consumer
        return None

    def dispatch(self) -> None:
        """Hand ready messages to consumers with spare prefetch (into their outboxes)."""
        ready = self.ready
        if not ready or not self.consumers or self.deleted:
            return
        now = _now()
        while ready:
            consumer = self.pick_consumer()
            if consumer is None:
                break
            message = ready.popleft()
            # Strictly earlier: a TTL-0 message is delivered if a consumer is ready, as in RabbitMQ.
            if message.expires_at is not None and now is not None and message.expires_at < now:
                self.expire(message)
                continue
            self.deliver(consumer, message)
        self.reschedule()

    def delivery_properties(self, message: _Message, get: bool = False) -> Properties:
        # Each delivery gets its own Properties, so a handler mutating them
        # cannot change what the next delivery (or a dead-lettered copy) sees.
        # RabbitMQ 3.10 adds x-delivery-count to a quorum queue's basic.get-ok
        # always, to a consumer's delivery only once it was returned.
        props = message.properties
        headers = props.headers
        if self.quorum and (message.delivery_count or get):
            headers = dict(headers) if headers else {}
            headers["x-delivery-count"] = message.delivery_count
        elif headers is not None:
            headers = dict(headers)
        return _copy_properties(props, headers)

    def deliver(self, consumer: _Consumer, message: _Message) -> None:
        channel = consumer.channel
        tag = channel._next_tag
        channel._next_tag = tag + 1
        channel._unacked[tag] = (message, consumer)
        consumer.unacked += 1
        self.unacked += 1
        self.stats.delivered += 1
        delivery = Delivery(
            consumer_tag=consumer.tag,
            delivery_tag=tag,
            redelivered=message.redelivered,
            exchange=message.exchange,
            routing_key=message.routing_key,
            body=message.body,
            properties=self.delivery_properties(message),
        )
        channel._connection._post(channel, consumer.on_delivery, delivery)

    # -- expiry and dead-lettering -----------------------------------------

    def reschedule(self) -> None:
        """Make sure the broker's timer wakes up for the head message's expiry."""
        if not self.ready:
            return
        expires_at = self.ready[0].expires_at
        if expires_at is not None and (self.timer_at is None or expires_at < self.timer_at):
            self.timer_at = expires_at
            self.broker._schedule(expires_at, self)

    def expire_heads(self, now: float | None) -> bool:
        """Expire messages at the head whose TTL ran out; True if any did."""
        if now is None:
            return False
        ready = self.ready
        expired = False
        while ready:
            expires_at = ready[0].expires_at
            if expires_at is None or expires_at > now:
                break
            self.expire(ready.popleft())
            expired = True
        return expired

    def expire(self, message: _Message) -> None:
        self.stats.expired += 1
        self.dead_letter(message, "expired")

    def dead_letter(self, message: _Message, reason: str) -> None:
        """Send a message that left the queue for ``reason`` to the DLX, or drop it."""
        if self.dlx is None:
            return
        exchange = self.vhost.exchanges.get(self.dlx)
        if exchange is None:
            # RabbitMQ drops the message silently when the DLX does not exist.
            return
        self.stats.dead_lettered += 1
        routing_key = self.dlrk if self.dlrk is not None else message.routing_key
        old = message.properties
        headers: dict[str, Any] = dict(old.headers) if old.headers else {}
        deaths: list[Any] = []
        current: dict[str, Any] | None = None
        previous = headers.get("x-death")
        if isinstance(previous, list):
            for death in previous:
                if (
                    current is None
                    and isinstance(death, Mapping)
                    and death.get("queue") == self.name
                    and death.get("reason") == reason
                ):
                    current = dict(death)
                    current["count"] = int(current.get("count", 0)) + 1
                else:
                    deaths.append(death)
        if current is None:
            current = {
                "count": 1,
                "reason": reason,
                "queue": self.name,
                "time": datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0),
                "exchange": message.exchange,
                "routing-keys": [message.routing_key],
            }
            if old.expiration is not None:
                current["original-expiration"] = old.expiration
        deaths.insert(0, current)
        headers["x-death"] = deaths
        if "x-first-death-reason" not in headers:
            headers["x-first-death-reason"] = reason
            headers["x-first-death-queue"] = self.name
            headers["x-first-death-exchange"] = message.exchange
        props = _copy_properties(old, headers)
        props.expiration = None
        now = _now()
        for queue in exchange.route(routing_key):
            if _is_dead_letter_cycle(queue.name, deaths):
                logger.warning(
                    "memory broker: dead-letter cycle without rejection detected; message "
                    "from queue %r to queue %r dropped (as RabbitMQ does)",
                    self.name,
                    queue.name,
                )
                continue
            queue.push(
                _Message(
                    queue,
                    message.body,
                    props,
                    exchange.name,
                    routing_key,
                    queue.expiry_for(None, now),
                )
            )


class _Exchange:
    """An exchange and its bindings, with a routing index per type."""

    def __init__(
        self,
        vhost: _VHost,
        name: str,
        kind: str,
        *,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        builtin: bool = False,
    ) -> None:
        self.vhost = vhost
        self.name = name
        self.kind = kind  # "direct", "fanout", "topic", or "default" for ""
        self.durable = durable
        self.auto_delete = auto_delete
        self.arguments = arguments or {}
        self.builtin = builtin
        # (routing key, queue name) -> queue; the indexes below are derived from it.
        self.bindings: dict[tuple[str, str], _Queue] = {}
        self._direct: dict[str, list[_Queue]] = {}
        self._fanout: list[_Queue] = []
        self._topic: list[tuple[tuple[str, ...], _Queue]] = []
        self._topic_cache: dict[str, list[_Queue]] = {}

    def bind(self, queue: _Queue, routing_key: str) -> None:
        key = (routing_key, queue.name)
        if key not in self.bindings:
            self.bindings[key] = queue
            self._reindex()

    def unbind_queue(self, queue: _Queue) -> None:
        stale = [key for key, bound in self.bindings.items() if bound is queue]
        if stale:
            for key in stale:
                del self.bindings[key]
            self._reindex()

    def _reindex(self) -> None:
        # Bindings change rarely and routing is hot: rebuild the indexes whole.
        direct: dict[str, list[_Queue]] = {}
        fanout: dict[_Queue, None] = {}
        topic: list[tuple[tuple[str, ...], _Queue]] = []
        for (routing_key, _), queue in self.bindings.items():
            direct.setdefault(routing_key, []).append(queue)
            fanout[queue] = None
            topic.append((tuple(_words(routing_key)), queue))
        self._direct = direct
        self._fanout = list(fanout)
        self._topic = topic
        self._topic_cache = {}

    def route(self, routing_key: str) -> list[_Queue]:
        """The queues a message with this routing key goes to (each at most once)."""
        kind = self.kind
        if kind == "default":
            queue = self.vhost.queues.get(routing_key)
            return [queue] if queue is not None else []
        if kind == "direct":
            return self._direct.get(routing_key, [])
        if kind == "fanout":
            return self._fanout
        cached = self._topic_cache.get(routing_key)
        if cached is None:
            words = _words(routing_key)
            matched: dict[_Queue, None] = {}
            for pattern, queue in self._topic:
                if queue not in matched and _topic_matches(pattern, words):
                    matched[queue] = None
            cached = list(matched)
            if len(self._topic_cache) > 4096:
                self._topic_cache.clear()
            self._topic_cache[routing_key] = cached
        return cached


class _VHost:
    def __init__(self, name: str, broker: MemoryBroker) -> None:
        self.name = name
        self.broker = broker
        self.queues: dict[str, _Queue] = {}
        self.exchanges: dict[str, _Exchange] = {}
        for name_, kind in (
            ("", "default"),
            ("amq.direct", "direct"),
            ("amq.fanout", "fanout"),
            ("amq.topic", "topic"),
        ):
            self.exchanges[name_] = _Exchange(self, name_, kind, builtin=True)

    def exchange(self, name: str) -> _Exchange | None:
        return self.exchanges.get("" if name == "amq.default" else name)

    def delete_queue(self, queue: _Queue) -> int:
        """Delete a queue; its consumers get the consumer-cancel notification."""
        if queue.deleted:
            return 0
        queue.deleted = True
        count = len(queue.ready)
        queue.ready.clear()
        self.queues.pop(queue.name, None)
        for exchange in self.exchanges.values():
            if exchange.bindings:
                exchange.unbind_queue(queue)
        consumers = list(queue.consumers)
        queue.consumers.clear()
        for consumer in consumers:
            consumer.active = False
            channel = consumer.channel
            channel._consumers.pop(consumer.tag, None)
            if consumer.on_cancel is not None and channel._open:
                channel._connection._post(channel, consumer.on_cancel, consumer.tag)
        self.broker._changed()
        return count


class MemoryBroker:
    """An in-memory AMQP broker: vhosts, exchanges, queues and their messages.

    ``connect()`` finds brokers by name in a process-wide registry
    (``get_broker``/``register_broker``).  The inspection helpers below are
    for tests; they take the vhost first, like RabbitMQ's management API.
    """

    def __init__(self) -> None:
        #: The name under which the broker is registered, or None.
        self.name: str | None = None
        self._vhosts: dict[str, _VHost] = {"/": _VHost("/", self)}
        self._connections: dict[MemoryConnection, None] = {}
        # Expiry timer: a heap of (deadline, seq, queue), driven by one task
        # hosted in the nursery of one open connection at a time.
        self._heap: list[tuple[float, int, _Queue]] = []
        self._seq = itertools.count()
        self._timer_owner: MemoryConnection | None = None
        self._timer_wake: trio.Event | None = None
        self._timer_target = math.inf
        self._version = 0
        self._change_waiter: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.name!r} vhosts={sorted(self._vhosts)}>"

    @property
    def url(self) -> str:
        """The ``memory://`` URL that connects to this broker (it must be registered)."""
        if self.name is None:
            raise RuntimeError("this MemoryBroker is not registered: call register_broker() first")
        return f"memory://{self.name}"

    # -- administration -----------------------------------------------------

    def add_vhost(self, name: str) -> None:
        """Create a vhost (no-op if it exists)."""
        if name not in self._vhosts:
            self._vhosts[name] = _VHost(name, self)

    def vhosts(self) -> list[str]:
        """The names of the vhosts, sorted."""
        return sorted(self._vhosts)

    def reset(self) -> None:
        """Forget every queue, exchange and vhost except an empty ``/``.

        Open connections are not closed, but their channels' unacknowledged
        deliveries are forgotten; call it between tests, not during one.
        """
        for vhost in self._vhosts.values():
            for queue in list(vhost.queues.values()):
                queue.deleted = True
        self._vhosts = {"/": _VHost("/", self)}
        self._heap.clear()
        self._changed()

    # -- inspection ---------------------------------------------------------

    def _queue(self, vhost: str, queue: str) -> _Queue:
        try:
            vh = self._vhosts[vhost]
        except KeyError:
            raise KeyError(f"no vhost {vhost!r} in memory broker {self.name!r}") from None
        try:
            q = vh.queues[queue]
        except KeyError:
            raise KeyError(f"no queue {queue!r} in vhost {vhost!r}") from None
        if q.expire_heads(_now()):
            self._changed()
        return q

    def queue_names(self, vhost: str = "/") -> list[str]:
        """The names of the queues of a vhost, sorted."""
        return sorted(self._vhosts[vhost].queues)

    def exchange_names(self, vhost: str = "/") -> list[str]:
        """The names of the exchanges of a vhost (``""`` is the default exchange), sorted."""
        return sorted(self._vhosts[vhost].exchanges)

    def bindings(self, vhost: str, queue: str) -> list[tuple[str, str]]:
        """The ``(exchange, routing_key)`` bindings of a queue, the default one excluded."""
        q = self._queue(vhost, queue)
        return sorted(
            (exchange.name, routing_key)
            for exchange in self._vhosts[vhost].exchanges.values()
            for (routing_key, _), bound in exchange.bindings.items()
            if bound is q
        )

    def queue_size(self, vhost: str, queue: str) -> int:
        """The number of ready messages (expired ones are removed first)."""
        return len(self._queue(vhost, queue).ready)

    def unacked_count(self, vhost: str, queue: str) -> int:
        """The number of delivered, not yet settled messages of a queue."""
        return self._queue(vhost, queue).unacked

    def consumer_count(self, vhost: str, queue: str) -> int:
        """The number of consumers of a queue."""
        return len(self._queue(vhost, queue).consumers)

    def stats(self, vhost: str, queue: str) -> QueueStats:
        """A snapshot of the counters of a queue."""
        return self._queue(vhost, queue).stats.snapshot()

    def ready_messages(self, vhost: str, queue: str) -> list[Delivery]:
        """The ready messages of a queue, head first, without removing them.

        ``delivery_tag`` is 0 and ``consumer_tag`` empty; the properties are copies.
        """
        q = self._queue(vhost, queue)
        return [
            Delivery(
                consumer_tag="",
                delivery_tag=0,
                redelivered=m.redelivered,
                exchange=m.exchange,
                routing_key=m.routing_key,
                body=m.body,
                properties=q.delivery_properties(m),
            )
            for m in q.ready
        ]

    def is_idle(self, vhost: str | None = None) -> bool:
        """True if no queue (of ``vhost``, or of any vhost) has ready or unacked messages.

        Messages waiting in a TTL "delay queue" count as ready.
        """
        vhosts = self._vhosts.values() if vhost is None else (self._vhosts[vhost],)
        return not any(q.ready or q.unacked for vh in vhosts for q in vh.queues.values())

    @property
    def version(self) -> int:
        """A counter that grows on every change of messages or topology."""
        return self._version

    async def wait_for_change(self) -> None:
        """Return at the next change of messages or topology (see ``version``)."""
        if self._change_waiter is None:
            self._change_waiter = trio.Event()
        await self._change_waiter.wait()

    async def wait_until_idle(self, vhost: str | None = None) -> None:
        """Return once ``is_idle(vhost)``, without polling.

        It also runs due TTL expiries itself, so it works even when no
        connection is open to host the broker's timer.
        """
        while True:
            now = trio.current_time()
            self._expire_due(now)
            if self.is_idle(vhost):
                return
            deadline = self._heap[0][0] if self._heap else math.inf
            with trio.move_on_at(deadline):
                await self.wait_for_change()

    # -- internals ------------------------------------------------------------

    def _changed(self) -> None:
        self._version += 1
        waiter = self._change_waiter
        if waiter is not None:
            self._change_waiter = None
            waiter.set()

    def _schedule(self, deadline: float, queue: _Queue) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), queue))
        if deadline < self._timer_target:
            self._wake_timer()

    def _wake_timer(self) -> None:
        wake = self._timer_wake
        if wake is not None:
            self._timer_wake = None
            self._timer_target = -math.inf
            wake.set()

    def _expire_due(self, now: float) -> None:
        heap = self._heap
        expired = False
        while heap and heap[0][0] <= now:
            deadline, _, queue = heapq.heappop(heap)
            if queue.timer_at == deadline:
                queue.timer_at = None
            if queue.deleted:
                continue
            if queue.expire_heads(now):
                expired = True
            queue.reschedule()
        if expired:
            self._changed()

    async def _run_timer(self, owner: MemoryConnection) -> None:
        # Runs in the nursery of ``owner``; exits when ownership moves on.
        try:
            while self._timer_owner is owner and owner._open:
                self._expire_due(trio.current_time())
                deadline = self._heap[0][0] if self._heap else math.inf
                wake = self._timer_wake = trio.Event()
                self._timer_target = deadline
                with trio.move_on_at(deadline):
                    await wake.wait()
        except Exception:
            # Background tasks never raise into the connection's owner; a bug
            # here stops TTL expiry (inspection and wait_until_idle still expire).
            logger.exception("memory broker: the TTL timer failed")
            if self._timer_owner is owner:
                self._timer_owner = None

    def _attach(self, connection: MemoryConnection) -> None:
        self._connections[connection] = None
        owner = self._timer_owner
        if owner is None or not owner._open or owner._token is not connection._token:
            self._start_timer(connection)

    def _start_timer(self, connection: MemoryConnection) -> None:
        self._wake_timer()
        self._timer_owner = connection
        connection._nursery.start_soon(self._run_timer, connection)

    def _detach(self, connection: MemoryConnection) -> None:
        self._connections.pop(connection, None)
        if self._timer_owner is connection:
            self._timer_owner = None
            self._wake_timer()
            for other in self._connections:
                if other._open and other._token is connection._token:
                    self._start_timer(other)
                    break


_registry: dict[str, MemoryBroker] = {}
_anonymous = itertools.count(1)


def get_broker(name: str = "default") -> MemoryBroker:
    """The broker that ``memory://NAME`` connects to, created on first use."""
    broker = _registry.get(name)
    if broker is None:
        broker = MemoryBroker()
        broker.name = name
        _registry[name] = broker
    return broker


def register_broker(broker: MemoryBroker, name: str | None = None) -> str:
    """Register ``broker`` for ``memory://NAME`` URLs; return the name.

    Without ``name`` a unique one is chosen.  Raises ``ValueError`` if the
    name belongs to another broker.
    """
    if name is None:
        name = f"broker-{next(_anonymous)}-{secrets.token_hex(4)}"
    existing = _registry.get(name)
    if existing is not None and existing is not broker:
        raise ValueError(f"a memory broker named {name!r} is already registered")
    if broker.name is not None and broker.name != name and _registry.get(broker.name) is broker:
        del _registry[broker.name]
    broker.name = name
    _registry[name] = broker
    return name


def unregister_broker(name: str) -> None:
    """Remove a broker from the registry (no-op if absent).  Open connections keep working."""
    broker = _registry.pop(name, None)
    if broker is not None and broker.name == name:
        broker.name = None


class MemoryChannel:
    """A channel of a ``MemoryConnection``; implements ``asyncworker._transport.Channel``."""

    def __init__(self, connection: MemoryConnection, channel_id: int) -> None:
        self._connection = connection
        self._vhost = connection._vhost
        self._channel_id = channel_id
        self._open = True
        self._reason: BaseException | None = None
        self._closed = trio.Event()
        self._prefetch = 0
        self._confirm = False
        self._next_tag = 1
        # delivery tag -> (message, consumer or None for basic.get); insertion
        # order is tag order, which multiple-acks rely on.
        self._unacked: dict[int, tuple[_Message, _Consumer | None]] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._last_queue = ""

    def __repr__(self) -> str:
        state = "open" if self._open else f"closed ({self._reason})"
        return f"<MemoryChannel {self._channel_id} {state}>"

    @property
    def channel_id(self) -> int:
        """The channel number, from 1."""
        return self._channel_id

    @property
    def is_open(self) -> bool:
        """Whether the channel can be used."""
        return self._open

    @property
    def close_reason(self) -> BaseException | None:
        """Why the channel closed (a ``ChannelClosed`` or ``ConnectionClosed``), or None."""
        return self._reason

    async def wait_closed(self) -> None:
        """Return once the channel is closed, for whatever reason."""
        await self._closed.wait()

    # -- failure helpers ------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            assert self._reason is not None
            raise _clone_error(self._reason)

    def _check_open_sync(self) -> None:
        # Settlement always reports a closed channel as ChannelClosed (seam rule).
        if not self._open:
            reason = self._reason
            if isinstance(reason, ChannelClosed):
                raise _clone_error(reason)
            text = reason.reply_text if isinstance(reason, ConnectionClosed) else "closed"
            raise ChannelClosed(f"connection closed: {text}")

    def _fail(
        self, reply_code: int, reply_text: str, cls: type[ChannelClosed] = ChannelClosed
    ) -> NoReturn:
        """Close the channel as the broker would, and raise."""
        self._teardown(cls(reply_text, reply_code))
        raise cls(reply_text, reply_code)

    def _not_found(self, kind: str, name: str) -> NoReturn:
        self._fail(
            NOT_FOUND,
            f"NOT_FOUND - no {kind} '{name}' in vhost '{self._vhost.name}'",
            QueueNotFound,
        )

    def _lookup_queue(self, name: str) -> _Queue:
        if name == "":
            name = self._last_queue
        queue = self._vhost.queues.get(name)
        if queue is None:
            self._not_found("queue", name)
        self._check_owner(queue)
        return queue

    def _check_owner(self, queue: _Queue) -> None:
        if queue.owner is not None and queue.owner is not self._connection:
            self._fail(
                RESOURCE_LOCKED,
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                f"'{queue.name}' in vhost '{self._vhost.name}'. It could be originally "
                "declared on another connection or the exclusive property value does not "
                "match that of the original declaration.",
            )

    def _teardown(self, reason: BaseException) -> None:
        """Close the channel: drop its consumers and requeue its unacked messages."""
        if self._mark_closed(reason):
            self._requeue_unacked()

    def _mark_closed(self, reason: BaseException) -> bool:
        """First half of a close: no more consumers.  False if it was closed already."""
        if not self._open:
            return False
        self._open = False
        self._reason = reason
        consumers = list(self._consumers.values())
        self._consumers.clear()
        for consumer in consumers:
            self._remove_consumer(consumer)
        self._connection._channels.pop(self._channel_id, None)
        self._closed.set()
        return True

    def _requeue_unacked(self) -> None:
        """Second half of a close: return the unacked messages to their queues."""
        entries = list(self._unacked.values())
        self._unacked.clear()
        self._requeue_entries(entries)
        self._vhost.broker._changed()

    def _remove_consumer(self, consumer: _Consumer) -> None:
        consumer.active = False
        queue = consumer.queue
        try:
            queue.consumers.remove(consumer)
        except ValueError:
            return
        if queue.auto_delete and not queue.consumers and queue.had_consumers:
            self._vhost.delete_queue(queue)

    def _requeue_entries(
        self, entries: list[tuple[_Message, _Consumer | None]], rejected: bool = False
    ) -> None:
        by_queue: dict[_Queue, list[_Message]] = {}
        for message, consumer in entries:
            queue = message.queue
            queue.unacked -= 1
            if consumer is not None:
                consumer.unacked -= 1
            by_queue.setdefault(queue, []).append(message)
        for queue, messages in by_queue.items():
            queue.requeue(messages, rejected=rejected)

    def _take(self, delivery_tag: int, multiple: bool) -> list[tuple[_Message, _Consumer | None]]:
        """Remove and return the unacked entries a settlement covers.

        An unknown tag closes the channel with 406, as RabbitMQ does; the
        caller sees it through ``close_reason`` and the next operation.
        """
        unacked = self._unacked
        if multiple:
            if delivery_tag == 0:
                entries = list(unacked.values())
                unacked.clear()
                return entries
            if delivery_tag in unacked:
                tags: list[int] = []
                for tag in unacked:
                    if tag > delivery_tag:
                        break
                    tags.append(tag)
                return [unacked.pop(tag) for tag in tags]
        else:
            entry = unacked.pop(delivery_tag, None)
            if entry is not None:
                return [entry]
        logger.error(
            "memory broker: unknown delivery tag %d on channel %d; closing the channel "
            "(PRECONDITION_FAILED, as RabbitMQ does)",
            delivery_tag,
            self._channel_id,
        )
        self._teardown(
            ChannelClosed(
                f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}", PRECONDITION_FAILED
            )
        )
        return []

    # -- basic ---------------------------------------------------------------

    async def qos(self, prefetch_count: int) -> None:
        """Set the prefetch of consumers started later on this channel (0 = unlimited)."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        if not 0 <= prefetch_count <= 65535:
            raise ValueError(f"prefetch_count must be between 0 and 65535, not {prefetch_count}")
        self._prefetch = prefetch_count

    async def consume(
        self,
        queue: str,
        on_delivery: DeliveryCallback,
        on_cancel: CancelCallback | None = None,
        *,
        consumer_tag: str = "",
        exclusive: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        """Start a consumer; return its tag.  Raises ``QueueNotFound`` (and the
        channel is closed) if the queue does not exist."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        q = self._lookup_queue(queue)
        tag = consumer_tag or f"amq.ctag-{secrets.token_urlsafe(16)}"
        if tag in self._consumers:
            self._connection._fail(
                NOT_ALLOWED, f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"
            )
        if q.consumers and (exclusive or q.consumers[0].exclusive):
            self._fail(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - queue '{q.name}' in vhost '{self._vhost.name}' in exclusive use",
            )
        consumer = _Consumer(tag, self, q, on_delivery, on_cancel, self._prefetch, exclusive)
        self._consumers[tag] = consumer
        q.consumers.append(consumer)
        q.had_consumers = True
        q.dispatch()
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """``basic.cancel``; deliveries handed to the dispatcher arrive before it returns."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        consumer = self._consumers.pop(consumer_tag, None)
        if consumer is None:
            return
        self._remove_consumer(consumer)
        await self._connection._flush()

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """Acknowledge a delivery (all up to it with ``multiple``)."""
        self._check_open_sync()
        touched: dict[_Queue, None] = {}
        for message, consumer in self._take(delivery_tag, multiple):
            queue = message.queue
            queue.unacked -= 1
            queue.stats.acked += 1
            if consumer is not None:
                consumer.unacked -= 1
            touched[queue] = None
        for queue in touched:
            queue.dispatch()
        self._vhost.broker._changed()

    def reject(self, delivery_tag: int, requeue: bool = True) -> None:
        """Reject one delivery: requeue it at the head, or dead-letter/drop it."""
        self._settle_negative(delivery_tag, False, requeue)

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """Reject a delivery (all up to it with ``multiple``)."""
        self._settle_negative(delivery_tag, multiple, requeue)

    def _settle_negative(self, delivery_tag: int, multiple: bool, requeue: bool) -> None:
        self._check_open_sync()
        entries = self._take(delivery_tag, multiple)
        if requeue:
            for message, _ in entries:
                message.queue.stats.rejected += 1
            self._requeue_entries(entries, rejected=True)
        else:
            touched: dict[_Queue, None] = {}
            for message, consumer in entries:
                queue = message.queue
                queue.unacked -= 1
                queue.stats.rejected += 1
                if consumer is not None:
                    consumer.unacked -= 1
                if not queue.deleted:
                    queue.dead_letter(message, "rejected")
                touched[queue] = None
            for queue in touched:
                queue.dispatch()
        self._vhost.broker._changed()

    async def confirm_select(self) -> None:
        """Turn on publisher confirms for this channel."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        self._confirm = True

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> None:
        """Publish a message; it is routed (and confirmed) before this returns.

        Raises ``QueueNotFound`` (the channel is closed) if the exchange does
        not exist, with or without confirms; ``Unroutable`` for a mandatory
        message without a route and ``PublishNacked`` when a queue's
        ``x-overflow: reject-publish`` refused it, in confirm mode only.
        """
        await trio.lowlevel.checkpoint()
        self._check_open()
        if properties is None:
            props = Properties()
        else:
            # Copy once: the publisher may reuse or mutate its Properties.
            headers = properties.headers
            props = _copy_properties(properties, dict(headers) if headers is not None else None)
        message_ttl: int | None = None
        if props.expiration is not None:
            try:
                message_ttl = int(props.expiration)
            except ValueError:
                message_ttl = -1
            if message_ttl < 0:
                self._fail(
                    PRECONDITION_FAILED,
                    f"PRECONDITION_FAILED - invalid expiration '{props.expiration}'",
                )
        if props.user_id is not None and props.user_id != self._connection._params.user:
            self._fail(
                PRECONDITION_FAILED,
                f"PRECONDITION_FAILED - user_id property set to '{props.user_id}' but "
                f"authenticated user was '{self._connection._params.user}'",
            )
        ex = self._vhost.exchange(exchange)
        if ex is None:
            self._not_found("exchange", exchange)
        queues = ex.route(routing_key)
        if not queues:
            if mandatory and self._confirm:
                raise Unroutable(exchange, routing_key, "NO_ROUTE", NO_ROUTE)
            return
        now = (
            _now()
            if props.expiration is not None or any(q.ttl is not None for q in queues)
            else None
        )
        refused = False
        for q in queues:
            message = _Message(
                q, body, props, exchange, routing_key, q.expiry_for(message_ttl, now)
            )
            if not q.push(message):
                refused = True
        self._vhost.broker._changed()
        if refused and self._confirm:
            raise PublishNacked(
                f"message to exchange {exchange!r} with routing key {routing_key!r} was "
                "nacked: a queue is full (x-overflow reject-publish)"
            )

    async def get(self, queue: str, *, no_ack: bool = False) -> Delivery | None:
        """``basic.get``: one message, or None if the queue is empty."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        q = self._lookup_queue(queue)
        if q.expire_heads(_now()):
            self._vhost.broker._changed()
        if not q.ready:
            return None
        message = q.ready.popleft()
        q.stats.delivered += 1
        tag = self._next_tag
        self._next_tag = tag + 1
        if not no_ack:
            self._unacked[tag] = (message, None)
            q.unacked += 1
        q.reschedule()
        self._vhost.broker._changed()
        return Delivery(
            consumer_tag="",
            delivery_tag=tag,
            redelivered=message.redelivered,
            exchange=message.exchange,
            routing_key=message.routing_key,
            body=message.body,
            properties=q.delivery_properties(message, get=True),
            message_count=len(q.ready),
        )

    # -- queues ---------------------------------------------------------------

    def _queue_settings(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Validate queue arguments like RabbitMQ (406 on a bad value)."""

        def bad(arg: str, why: str) -> NoReturn:
            self._fail(
                PRECONDITION_FAILED,
                f"PRECONDITION_FAILED - invalid arg '{arg}' for queue '{name}' in vhost "
                f"'{self._vhost.name}': {why}",
            )

        def non_negative_int(arg: str) -> int | None:
            value = args.get(arg)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(arg, f"{value!r} is not a non-negative integer")
            return value

        dlx = args.get("x-dead-letter-exchange")
        dlrk = args.get("x-dead-letter-routing-key")
        if dlx is not None and not isinstance(dlx, str):
            bad("x-dead-letter-exchange", f"{dlx!r} is not a string")
        if dlrk is not None:
            if not isinstance(dlrk, str):
                bad("x-dead-letter-routing-key", f"{dlrk!r} is not a string")
            if dlx is None:
                bad("x-dead-letter-routing-key", "Key x-dead-letter-exchange not set")
        overflow = args.get("x-overflow", "drop-head")
        if overflow not in _OVERFLOW_MODES:
            bad("x-overflow", f"{overflow!r} is not one of {sorted(_OVERFLOW_MODES)}")
        queue_type = args.get("x-queue-type", "classic")
        if queue_type not in ("classic", "quorum"):
            bad("x-queue-type", f"{queue_type!r}: the memory broker models classic and quorum")
        return {
            "ttl": non_negative_int("x-message-ttl"),
            "dlx": dlx,
            "dlrk": dlrk,
            "max_length": non_negative_int("x-max-length"),
            "overflow": overflow,
            "quorum": queue_type == "quorum",
            "delivery_limit": non_negative_int("x-delivery-limit"),
        }

    def _check_equivalent(
        self, q: _Queue, durable: bool, auto_delete: bool, args: dict[str, Any]
    ) -> None:
        def inequivalent(arg: str, received: Any, current: Any) -> NoReturn:
            self._fail(
                PRECONDITION_FAILED,
                f"PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{q.name}' in "
                f"vhost '{self._vhost.name}': received {received!r} but current is {current!r}",
            )

        if durable != q.durable:
            inequivalent("durable", durable, q.durable)
        if auto_delete != q.auto_delete:
            inequivalent("auto_delete", auto_delete, q.auto_delete)
        received_type = args.get("x-queue-type", "classic")
        current_type = q.arguments.get("x-queue-type", "classic")
        if received_type != current_type:
            inequivalent("x-queue-type", received_type, current_type)
        for key in _EQUIVALENCE_ARGS:
            if args.get(key) != q.arguments.get(key):
                inequivalent(key, args.get(key), q.arguments.get(key))

    async def queue_declare(
        self,
        queue: str,
        *,
        passive: bool = False,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> QueueInfo:
        """Declare a queue (or check it exists, with ``passive``)."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        vhost = self._vhost
        if passive:
            q = self._lookup_queue(queue)
        else:
            args = dict(arguments or {})
            if queue == "":
                queue = f"amq.gen-{secrets.token_urlsafe(16)}"
            elif queue.startswith("amq."):
                self._fail(
                    ACCESS_REFUSED,
                    f"ACCESS_REFUSED - queue name '{queue}' contains reserved prefix 'amq.*'",
                )
            existing = vhost.queues.get(queue)
            if existing is not None:
                self._check_owner(existing)
                self._check_equivalent(existing, durable, auto_delete, args)
                q = existing
            else:
                settings = self._queue_settings(queue, args)
                if settings["quorum"]:
                    for flag, prop in (
                        (not durable, "non-durable"),
                        (exclusive, "exclusive-owner"),
                        (auto_delete, "auto-delete"),
                    ):
                        if flag:
                            self._fail(
                                PRECONDITION_FAILED,
                                f"PRECONDITION_FAILED - invalid property '{prop}' for queue "
                                f"'{queue}' in vhost '{vhost.name}'",
                            )
                q = _Queue(
                    vhost,
                    queue,
                    durable=durable,
                    auto_delete=auto_delete,
                    owner=self._connection if exclusive else None,
                    arguments=args,
                    **settings,
                )
                vhost.queues[queue] = q
                if exclusive:
                    self._connection._exclusive_queues.append(q)
                vhost.broker._changed()
        if q.expire_heads(_now()):
            vhost.broker._changed()
        self._last_queue = q.name
        return QueueInfo(name=q.name, message_count=len(q.ready), consumer_count=len(q.consumers))

    async def queue_delete(
        self, queue: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """Delete a queue; return how many ready messages it had (0 if it did not exist)."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        q = self._vhost.queues.get(queue or self._last_queue)
        if q is None:
            return 0  # queue.delete is idempotent in RabbitMQ
        self._check_owner(q)
        where = f"queue '{q.name}' in vhost '{self._vhost.name}'"
        if if_unused and q.consumers:
            self._fail(PRECONDITION_FAILED, f"PRECONDITION_FAILED - {where} in use")
        if if_empty and q.ready:
            self._fail(PRECONDITION_FAILED, f"PRECONDITION_FAILED - {where} not empty")
        return self._vhost.delete_queue(q)

    async def queue_purge(self, queue: str) -> int:
        """Remove the ready messages of a queue; return how many there were."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        q = self._lookup_queue(queue)
        count = len(q.ready)
        q.ready.clear()
        self._vhost.broker._changed()
        return count

    async def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Bind a queue to an exchange (idempotent)."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        q = self._lookup_queue(queue)
        ex = self._vhost.exchange(exchange)
        if ex is None:
            self._not_found("exchange", exchange)
        if ex.kind == "default":
            self._fail(
                ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange",
            )
        ex.bind(q, routing_key)
        self._vhost.broker._changed()

    # -- exchanges --------------------------------------------------------------

    async def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        *,
        passive: bool = False,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Declare an exchange (or check it exists, with ``passive``)."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        vhost = self._vhost
        existing = vhost.exchange(exchange)
        if passive:
            if existing is None:
                self._not_found("exchange", exchange)
            return
        if exchange == "" or exchange == "amq.default":
            self._fail(
                ACCESS_REFUSED, "ACCESS_REFUSED - operation not permitted on the default exchange"
            )
        if exchange.startswith("amq."):
            self._fail(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - exchange name '{exchange}' contains reserved prefix 'amq.*'",
            )
        if exchange_type not in _EXCHANGE_TYPES:
            self._connection._fail(
                COMMAND_INVALID,
                f"COMMAND_INVALID - unknown exchange type '{exchange_type}' (the memory "
                f"broker models {', '.join(sorted(_EXCHANGE_TYPES))})",
            )
        if existing is not None:
            for arg, received, current in (
                ("type", exchange_type, existing.kind),
                ("durable", durable, existing.durable),
                ("auto_delete", auto_delete, existing.auto_delete),
            ):
                if received != current:
                    self._fail(
                        PRECONDITION_FAILED,
                        f"PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange "
                        f"'{exchange}' in vhost '{vhost.name}': received {received!r} but "
                        f"current is {current!r}",
                    )
            return
        vhost.exchanges[exchange] = _Exchange(
            vhost,
            exchange,
            exchange_type,
            durable=durable,
            auto_delete=auto_delete,
            arguments=dict(arguments or {}),
        )
        vhost.broker._changed()

    async def exchange_delete(self, exchange: str) -> None:
        """Delete an exchange and its bindings (no-op if it does not exist)."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        ex = self._vhost.exchange(exchange)
        if ex is None:
            return  # exchange.delete is idempotent in RabbitMQ
        if ex.builtin:
            if ex.kind == "default":
                text = "ACCESS_REFUSED - operation not permitted on the default exchange"
            else:
                text = f"ACCESS_REFUSED - deletion of system exchange '{exchange}' not allowed"
            self._fail(ACCESS_REFUSED, text)
        del self._vhost.exchanges[ex.name]
        self._vhost.broker._changed()

    async def close(self) -> None:
        """Close the channel; its unacknowledged deliveries are requeued."""
        self._teardown(ChannelClosed("Normal shutdown", REPLY_SUCCESS))
        await trio.lowlevel.cancel_shielded_checkpoint()


class MemoryConnection:
    """A connection to one vhost of a ``MemoryBroker``; implements ``Connection``.

    Its dispatcher task (in the nursery of ``connect()``) calls the delivery
    and cancel callbacks of all its channels, in order.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        vhost: _VHost,
        params: ConnectionParams,
        nursery: trio.Nursery,
    ) -> None:
        self._broker = broker
        self._vhost = vhost
        self._params = params
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._open = True
        self._reason: BaseException | None = None
        self._closed = trio.Event()
        self._channels: dict[int, MemoryChannel] = {}
        self._next_channel = 1
        self._exclusive_queues: list[_Queue] = []
        self._outbox: deque[tuple[MemoryChannel, Callable[[Any], None], Any]] = deque()
        self._wake: trio.Event | None = None
        self._posted = 0
        self._done = 0
        self._progress: trio.Event | None = None

    def __repr__(self) -> str:
        state = "open" if self._open else f"closed ({self._reason})"
        return f"<MemoryConnection {self._params.display} {state}>"

    @property
    def params(self) -> ConnectionParams:
        """The parameters this connection was opened with."""
        return self._params

    @property
    def broker(self) -> MemoryBroker:
        """The broker this connection belongs to."""
        return self._broker

    @property
    def is_open(self) -> bool:
        """Whether the connection can be used."""
        return self._open

    @property
    def blocked(self) -> str | None:
        """Always None: the in-memory broker never blocks publishers."""
        return None

    @property
    def close_reason(self) -> BaseException | None:
        """Why the connection closed (a ``ConnectionClosed``), or None."""
        return self._reason

    async def wait_closed(self) -> None:
        """Return once the connection is closed."""
        await self._closed.wait()

    async def channel(self) -> MemoryChannel:
        """Open a new channel."""
        await trio.lowlevel.checkpoint()
        if not self._open:
            assert self._reason is not None
            raise _clone_error(self._reason)
        channel = MemoryChannel(self, self._next_channel)
        self._channels[self._next_channel] = channel
        self._next_channel += 1
        return channel

    async def aclose(self) -> None:
        """Close the connection; unacknowledged deliveries are requeued."""
        self._teardown(ConnectionClosed("Normal shutdown", REPLY_SUCCESS))
        await trio.lowlevel.cancel_shielded_checkpoint()

    # -- internals ------------------------------------------------------------

    def _fail(self, reply_code: int, reply_text: str) -> NoReturn:
        """Close the connection as the broker would (a connection exception), and raise."""
        self._teardown(ConnectionClosed(reply_text, reply_code))
        raise ConnectionClosed(reply_text, reply_code)

    def _teardown(self, reason: ConnectionClosed) -> None:
        if not self._open:
            return
        self._open = False
        self._reason = reason
        # Close every channel before requeueing anything, so that a message
        # returned by one channel is not delivered to (and returned by)
        # another channel of this connection, which would count twice.
        channels = [c for c in list(self._channels.values()) if c._mark_closed(reason)]
        for channel in channels:
            channel._requeue_unacked()
        for queue in self._exclusive_queues:
            queue.vhost.delete_queue(queue)
        self._exclusive_queues.clear()
        self._outbox.clear()
        self._wake_dispatcher()
        self._notify_progress()
        self._closed.set()
        self._broker._detach(self)
        self._broker._changed()

    def _post(self, channel: MemoryChannel, callback: Callable[[Any], None], arg: Any) -> None:
        """Queue a callback for the dispatcher (never call it from here: no re-entrancy)."""
        self._outbox.append((channel, callback, arg))
        self._posted += 1
        if self._wake is not None:
            self._wake_dispatcher()

    def _wake_dispatcher(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def _notify_progress(self) -> None:
        progress = self._progress
        if progress is not None:
            self._progress = None
            progress.set()

    async def _flush(self) -> None:
        """Wait until the dispatcher ran every callback posted so far."""
        target = self._posted
        while self._open and self._done < target:
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()

    async def _run_dispatcher(self) -> None:
        outbox = self._outbox
        try:
            while self._open:
                if not outbox:
                    wake = self._wake = trio.Event()
                    await wake.wait()
                    continue
                for _ in range(_DISPATCH_BATCH):
                    if not outbox:
                        break
                    channel, callback, arg = outbox.popleft()
                    self._done += 1
                    # Deliveries of a closed channel were requeued already.
                    if channel._open:
                        callback(arg)
                self._notify_progress()
                if outbox:
                    await trio.lowlevel.checkpoint()
        except Exception as exc:
            # The seam forbids callbacks to raise; treat it like a dead reader task.
            logger.exception("memory broker: a delivery callback raised; closing the connection")
            self._teardown(ConnectionClosed(f"a delivery callback raised {exc!r}"))


@asynccontextmanager
async def _connect(params: ConnectionParams) -> AsyncIterator[MemoryConnection]:
    broker = get_broker(params.host)
    vhost = broker._vhosts.get(params.vhost)
    if vhost is None:
        raise ConnectError(
            f"cannot connect to {params.display}: vhost {params.vhost!r} does not exist "
            f"(NOT_ALLOWED - vhost {params.vhost} not found); create it with "
            "MemoryBroker.add_vhost()"
        )
    await trio.lowlevel.checkpoint()
    async with trio.open_nursery() as nursery:
        connection = MemoryConnection(broker, vhost, params, nursery)
        nursery.start_soon(connection._run_dispatcher)
        broker._attach(connection)
        try:
            yield connection
        finally:
            connection._teardown(ConnectionClosed("Normal shutdown", REPLY_SUCCESS))
            nursery.cancel_scope.cancel()


def connect(params: ConnectionParams) -> AbstractAsyncContextManager[Connection]:
    """Open a connection to the memory broker ``params.host``, vhost ``params.vhost``.

    Raises ``ConnectError`` naming the vhost if it does not exist.  Leaving
    the context closes the connection and requeues its unacked messages.
    """
    return _connect(params)


if TYPE_CHECKING:
    # Structural checks against the seam's protocols.
    def _check_channel(channel: MemoryChannel) -> Channel:
        return channel

    def _check_connection(connection: MemoryConnection) -> Connection:
        return connection
