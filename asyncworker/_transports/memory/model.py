"""The memory broker's model: queues, exchanges, messages and what happens to them.

Routing (``Exchange.route``), delivery to consumers with spare prefetch
(``Queue.dispatch``), requeueing in RabbitMQ's order (``Queue.requeue``),
expiry at the head of a queue and dead-lettering with ``x-death`` headers
(``Queue.dead_letter``): everything that decides where a message goes, as
RabbitMQ 3.10 decides it.  The package docstring lists what is modelled.

It is driven from above: ``channel.MemoryChannel`` runs the AMQP methods on
it, ``broker.MemoryBroker`` owns its vhosts, their expiry timer and change
notification, and reads it for inspection.  Nothing here imports either:
what the model needs of a channel is the ``ConsumerChannel`` protocol, and
a vhost gets the broker's timer and change notification as two callables.
Nothing here blocks or calls a user callback: a delivery only reaches the
channel's outbox, and the connection's dispatcher task runs the callbacks.
"""

from __future__ import annotations

import datetime
import heapq
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..base import CancelCallback, DeliveryCallback, Properties
from .routing import headers_match, topic_matches, words

__all__ = [
    "Binding",
    "Consumer",
    "ConsumerChannel",
    "ConsumerInfo",
    "Exchange",
    "Message",
    "Queue",
    "QueueStats",
    "VHost",
    "binding_key",
    "copy_properties",
    "current_time",
]

logger = logging.getLogger("asyncworker.memory")


class ConsumerChannel(Protocol):
    """What the model needs of the channel a consumer is on (``channel.MemoryChannel``)."""

    def deliver(self, consumer: Consumer, message: Message, properties: Properties) -> None:
        """Give ``message`` a delivery tag on this channel, keep it as unacked
        and queue the delivery for the connection's dispatcher."""
        ...

    def consumer_cancelled(self, consumer: Consumer) -> None:
        """The queue of ``consumer`` was deleted: forget the consumer and queue
        its cancel notification."""
        ...


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


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """One consumer of a queue, as ``MemoryBroker.consumers`` reports it.

    Attributes:
        tag: the consumer tag.
        prefetch_count: its prefetch (``basic.qos`` before ``basic.consume``; 0 = unlimited).
        active: whether it gets messages (with ``x-single-active-consumer``, only one does).
        unacked: messages delivered to it and not settled yet.
    """

    tag: str
    prefetch_count: int
    active: bool
    unacked: int


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


def current_time() -> float | None:
    """Trio's current time, or None outside ``trio.run`` (no expiry then)."""
    try:
        return trio.current_time()
    except RuntimeError:
        return None


def copy_properties(p: Properties, headers: dict[str, Any] | None) -> Properties:
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


class Message:
    """One message in one queue.  The body and properties are shared, never copied."""

    __slots__ = (
        "body",
        "delivery_count",
        "exchange",
        "expires_at",
        "priority",
        "properties",
        "queue",
        "redelivered",
        "returned",
        "routing_key",
        "seq",
    )

    def __init__(
        self,
        queue: Queue,
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
        self.seq = 0  # set by Queue.push: the publish order within the queue
        self.priority = 0  # set by Queue.push in a priority queue (x-max-priority)


def _seq_of(message: Message) -> int:
    return message.seq


def _priority_order(message: Message) -> tuple[int, int]:
    # A priority queue serves the highest priority first, FIFO within one.
    return (-message.priority, message.seq)


class Consumer:
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
        channel: ConsumerChannel,
        queue: Queue,
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


class Queue:
    """A queue: ready messages in a deque, its consumers, its counters."""

    def __init__(
        self,
        vhost: VHost,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        owner: object | None,
        arguments: dict[str, Any],
        ttl: int | None,
        dlx: str | None,
        dlrk: str | None,
        max_length: int | None,
        overflow: str,
        quorum: bool,
        delivery_limit: int | None,
        max_priority: int | None = None,
        single_active: bool = False,
    ) -> None:
        self.vhost = vhost
        self.schedule = vhost.schedule
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
        self.max_priority = max_priority
        #: x-single-active-consumer: only the first consumer registered (and
        #: still there) gets messages; the next one takes over when it leaves.
        self.single_active = single_active
        self._order: Callable[[Message], Any] = _seq_of if max_priority is None else _priority_order
        self.ready: deque[Message] = deque()
        self._seq = 0
        self.consumers: deque[Consumer] = deque()
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

    def push(self, message: Message) -> bool:
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
        if self.max_priority is None:
            ready.append(message)
        else:
            self._insert_by_priority(message)
        self.stats.published += 1
        if self.consumers:
            self.dispatch()
        elif len(ready) == 1:
            self.reschedule()
        return True

    def _insert_by_priority(self, message: Message) -> None:
        """Put a new message behind every ready message of its priority or higher.

        As RabbitMQ: no priority counts as 0, one above ``x-max-priority``
        as the maximum.
        """
        assert self.max_priority is not None
        priority = message.properties.priority or 0
        message.priority = priority = min(max(priority, 0), self.max_priority)
        ready = self.ready
        index = len(ready)
        # New messages mostly belong at the back: scan from there.
        while index and ready[index - 1].priority < priority:
            index -= 1
        ready.insert(index, message)

    def requeue(self, messages: list[Message], *, rejected: bool = False) -> None:
        """Return messages (in delivery order) to the queue.

        ``rejected``: requeued by ``basic.reject``/``basic.nack`` rather than
        returned by a closing channel or connection (quorum queues differ).
        """
        if self.deleted:
            return
        ready = self.ready
        returned: list[Message] = []
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
        head: list[Message] = []
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
            # by publish sequence (within their priority, in a priority queue)
            # with the returned messages already at the head.
            order = self._order
            returned.sort(key=order)
            top = order(returned[-1])
            while ready and order(ready[0]) < top:
                head.append(ready.popleft())
            head = list(heapq.merge(head, returned, key=order)) if head else returned
        if head:
            ready.extendleft(reversed(head))
        self.dispatch()
        self.reschedule()

    # -- leaving the queue --------------------------------------------------

    def pick_consumer(self) -> Consumer | None:
        consumers = self.consumers
        if self.single_active:
            # The single active consumer, and nobody else, even when it is full.
            active = consumers[0]
            if active.prefetch == 0 or active.unacked < active.prefetch:
                return active
            return None
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
        now = current_time()
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

    def delivery_properties(self, message: Message, get: bool = False) -> Properties:
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
        return copy_properties(props, headers)

    def deliver(self, consumer: Consumer, message: Message) -> None:
        consumer.unacked += 1
        self.unacked += 1
        self.stats.delivered += 1
        consumer.channel.deliver(consumer, message, self.delivery_properties(message))

    # -- expiry and dead-lettering -----------------------------------------

    def reschedule(self) -> None:
        """Make sure the broker's timer wakes up for the head message's expiry."""
        if not self.ready:
            return
        expires_at = self.ready[0].expires_at
        if expires_at is not None and (self.timer_at is None or expires_at < self.timer_at):
            self.timer_at = expires_at
            self.schedule(expires_at, self)

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

    def expire(self, message: Message) -> None:
        self.stats.expired += 1
        self.dead_letter(message, "expired")

    def dead_letter(self, message: Message, reason: str) -> None:
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
        props = copy_properties(old, headers)
        props.expiration = None
        now = current_time()
        for queue in exchange.route(routing_key, headers):
            if _is_dead_letter_cycle(queue.name, deaths):
                logger.warning(
                    "memory broker: dead-letter cycle without rejection detected; message "
                    "from queue %r to queue %r dropped (as RabbitMQ does)",
                    self.name,
                    queue.name,
                )
                continue
            queue.push(
                Message(
                    queue,
                    message.body,
                    props,
                    exchange.name,
                    routing_key,
                    queue.expiry_for(None, now),
                )
            )


class Binding:
    """One binding of a queue to an exchange: its routing key and arguments."""

    __slots__ = ("arguments", "queue", "routing_key")

    def __init__(self, queue: Queue, routing_key: str, arguments: dict[str, Any]) -> None:
        self.queue = queue
        self.routing_key = routing_key
        self.arguments = arguments


def binding_key(queue: str, routing_key: str, arguments: Mapping[str, Any]) -> tuple[str, str, str]:
    """What makes a binding itself in RabbitMQ: queue, routing key and arguments.

    The arguments go in as a repr of their sorted items: they may hold lists,
    which cannot be hashed, and two bindings differing only in them (headers
    bindings) are two bindings.
    """
    return (queue, routing_key, repr(sorted(arguments.items())))


class Exchange:
    """An exchange and its bindings, with a routing index per type."""

    def __init__(
        self,
        vhost: VHost,
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
        self.kind = kind  # "direct", "fanout", "topic", "headers", or "default" for ""
        self.durable = durable
        self.auto_delete = auto_delete
        self.arguments = arguments or {}
        self.builtin = builtin
        # binding_key(...) -> binding; the indexes below are derived from it.
        self.bindings: dict[tuple[str, str, str], Binding] = {}
        self._direct: dict[str, list[Queue]] = {}
        self._fanout: list[Queue] = []
        self._topic: list[tuple[tuple[str, ...], Queue]] = []
        self._topic_cache: dict[str, list[Queue]] = {}

    def bind(self, queue: Queue, routing_key: str, arguments: dict[str, Any]) -> None:
        key = binding_key(queue.name, routing_key, arguments)
        if key not in self.bindings:
            self.bindings[key] = Binding(queue, routing_key, arguments)
            self._reindex()

    def unbind(self, queue: Queue, routing_key: str, arguments: dict[str, Any]) -> None:
        """Remove one binding (nothing happens if it does not exist, as in RabbitMQ)."""
        if self.bindings.pop(binding_key(queue.name, routing_key, arguments), None) is not None:
            self._reindex()

    def unbind_queue(self, queue: Queue) -> None:
        stale = [key for key, binding in self.bindings.items() if binding.queue is queue]
        if stale:
            for key in stale:
                del self.bindings[key]
            self._reindex()

    def _reindex(self) -> None:
        # Bindings change rarely and routing is hot: rebuild the indexes whole.
        direct: dict[str, list[Queue]] = {}
        fanout: dict[Queue, None] = {}
        topic: list[tuple[tuple[str, ...], Queue]] = []
        for binding in self.bindings.values():
            queue = binding.queue
            queues = direct.setdefault(binding.routing_key, [])
            if queue not in queues:
                queues.append(queue)
            fanout[queue] = None
            topic.append((tuple(words(binding.routing_key)), queue))
        self._direct = direct
        self._fanout = list(fanout)
        self._topic = topic
        self._topic_cache = {}

    def route(self, routing_key: str, headers: Mapping[str, Any] | None = None) -> list[Queue]:
        """The queues a message with this routing key (and these headers) goes to, each once."""
        kind = self.kind
        if kind == "default":
            queue = self.vhost.queues.get(routing_key)
            return [queue] if queue is not None else []
        if kind == "direct":
            return self._direct.get(routing_key, [])
        if kind == "fanout":
            return self._fanout
        if kind == "headers":
            matched: dict[Queue, None] = {}
            for binding in self.bindings.values():
                if binding.queue not in matched and headers_match(binding.arguments, headers):
                    matched[binding.queue] = None
            return list(matched)
        cached = self._topic_cache.get(routing_key)
        if cached is None:
            key_words = words(routing_key)
            matched = {}
            for pattern, queue in self._topic:
                if queue not in matched and topic_matches(pattern, key_words):
                    matched[queue] = None
            cached = list(matched)
            if len(self._topic_cache) > 4096:
                self._topic_cache.clear()
            self._topic_cache[routing_key] = cached
        return cached


class VHost:
    """A vhost: its queues and exchanges.

    ``schedule(deadline, queue)`` and ``changed()`` are the broker's: its
    expiry timer and its change notification (``MemoryBroker.version``).
    """

    def __init__(
        self,
        name: str,
        schedule: Callable[[float, Queue], None],
        changed: Callable[[], None],
    ) -> None:
        self.name = name
        self.schedule = schedule
        self.changed = changed
        self.queues: dict[str, Queue] = {}
        self.exchanges: dict[str, Exchange] = {}
        for name_, kind in (
            ("", "default"),
            ("amq.direct", "direct"),
            ("amq.fanout", "fanout"),
            ("amq.topic", "topic"),
            ("amq.headers", "headers"),
            ("amq.match", "headers"),
        ):
            self.exchanges[name_] = Exchange(self, name_, kind, builtin=True)

    def exchange(self, name: str) -> Exchange | None:
        return self.exchanges.get("" if name == "amq.default" else name)

    def delete_queue(self, queue: Queue) -> int:
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
            consumer.channel.consumer_cancelled(consumer)
        self.changed()
        return count
