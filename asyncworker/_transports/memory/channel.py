"""One channel of the memory broker, behaving as RabbitMQ's channel does.

``MemoryChannel`` implements the seam's ``Channel``: every AMQP method runs
synchronously on the model (``model``) after one checkpoint, with
RabbitMQ's checks, reply codes and texts; a refusal closes the channel (or,
for a connection-level error, the connection) before it raises, as the
broker would.  Deliveries and cancel notifications go through the
connection's dispatcher (``_post``), never straight to a callback.

What the channel uses of its connection is spelt out by ``_Connection``
below: ``transport`` imports this module, never the other way round.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol

import pamqp.exceptions
import trio
from pamqp.constants import REPLY_SUCCESS

from ..._exceptions import (
    ChannelClosed,
    ConnectionClosed,
    ExchangeNotFound,
    PublishNacked,
    QueueNotFound,
    Unroutable,
)
from ..base import (
    CancelCallback,
    CloseOnce,
    Delivery,
    DeliveryCallback,
    Properties,
    QueueInfo,
    fresh,
)
from ..params import ConnectionParams
from .arguments import (
    EXCHANGE_TYPES,
    Refusal,
    check_exchange_equivalent,
    check_queue_equivalent,
    queue_settings,
)
from .model import Consumer, Exchange, Message, Queue, VHost, copy_properties, current_time
from .routing import check_x_match

if TYPE_CHECKING:
    from ..base import Channel
    from .model import ConsumerChannel

__all__ = ["MemoryChannel"]

logger = logging.getLogger("asyncworker.memory")

# The AMQP reply codes RabbitMQ answers with, as pamqp defines them.
NO_ROUTE: Final[int] = pamqp.exceptions.AMQPNoRoute.value
ACCESS_REFUSED: Final[int] = pamqp.exceptions.AMQPAccessRefused.value
NOT_FOUND: Final[int] = pamqp.exceptions.AMQPNotFound.value
RESOURCE_LOCKED: Final[int] = pamqp.exceptions.AMQPResourceLocked.value
PRECONDITION_FAILED: Final[int] = pamqp.exceptions.AMQPPreconditionFailed.value
COMMAND_INVALID: Final[int] = pamqp.exceptions.AMQPCommandInvalid.value
NOT_ALLOWED: Final[int] = pamqp.exceptions.AMQPNotAllowed.value


class _Connection(Protocol):
    """What a channel uses of its connection (``transport.MemoryConnection``)."""

    #: The vhost the connection is open on.
    vhost: VHost
    #: Exclusive queues declared on the connection (deleted with it).
    exclusive_queues: list[Queue]

    @property
    def params(self) -> ConnectionParams: ...

    def release(self, channel_id: int) -> None: ...

    def post(self, channel: MemoryChannel, callback: Callable[[Any], None], arg: Any) -> None: ...

    async def flush(self) -> None: ...

    def fail(self, reply_code: int, reply_text: str) -> NoReturn: ...


class MemoryChannel(CloseOnce):
    """A channel of a ``MemoryConnection``; implements the seam's ``Channel``.

    Closed (``base.CloseOnce``) when the client or the broker closes it, or
    with its connection; it is open exactly while ``_reason`` is None.
    """

    _closed_error = ChannelClosed
    _what = "channel"

    def __init__(self, connection: _Connection, channel_id: int) -> None:
        super().__init__()
        self._connection = connection
        self._vhost = connection.vhost
        self._channel_id = channel_id
        self._prefetch = 0
        self._confirm = False
        self._next_tag = 1
        # delivery tag -> (message, consumer or None for basic.get); insertion
        # order is tag order, which multiple-acks rely on.
        self._unacked: dict[int, tuple[Message, Consumer | None]] = {}
        self._consumers: dict[str, Consumer] = {}
        self._last_queue = ""

    def __repr__(self) -> str:
        return f"<MemoryChannel {self._channel_id} {self._state()}>"

    @property
    def channel_id(self) -> int:
        """The channel number, from 1."""
        return self._channel_id

    # -- failure helpers ------------------------------------------------------

    def _check_open_sync(self) -> None:
        # Settlement always reports a closed channel as ChannelClosed (seam rule).
        reason = self._reason
        if reason is not None:
            if isinstance(reason, ChannelClosed):
                raise fresh(reason)
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
            ExchangeNotFound if kind == "exchange" else QueueNotFound,
        )

    def _refused(self, refusal: Refusal) -> NoReturn:
        self._fail(refusal.reply_code, refusal.reply_text)

    def _lookup_queue(self, name: str) -> Queue:
        if name == "":
            name = self._last_queue
        queue = self._vhost.queues.get(name)
        if queue is None:
            self._not_found("queue", name)
        self._check_owner(queue)
        return queue

    def _check_owner(self, queue: Queue) -> None:
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
        if self.mark_closed(reason):
            self.requeue_unacked()

    def _on_closed(self, reason: BaseException) -> None:
        """First half of a close (``mark_closed``): no more consumers."""
        consumers = list(self._consumers.values())
        self._consumers.clear()
        for consumer in consumers:
            self._remove_consumer(consumer)
        self._connection.release(self._channel_id)

    def requeue_unacked(self) -> None:
        """Second half of a close: return the unacked messages to their queues."""
        entries = list(self._unacked.values())
        self._unacked.clear()
        self._requeue_entries(entries)
        self._vhost.changed()

    def _remove_consumer(self, consumer: Consumer) -> None:
        consumer.active = False
        queue = consumer.queue
        try:
            queue.consumers.remove(consumer)
        except ValueError:
            return
        if queue.auto_delete and not queue.consumers and queue.had_consumers:
            self._vhost.delete_queue(queue)

    def _requeue_entries(
        self, entries: list[tuple[Message, Consumer | None]], rejected: bool = False
    ) -> None:
        by_queue: dict[Queue, list[Message]] = {}
        for message, consumer in entries:
            queue = message.queue
            queue.unacked -= 1
            if consumer is not None:
                consumer.unacked -= 1
            by_queue.setdefault(queue, []).append(message)
        for queue, messages in by_queue.items():
            queue.requeue(messages, rejected=rejected)

    def _take(self, delivery_tag: int, multiple: bool) -> list[tuple[Message, Consumer | None]]:
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

    # -- called by the model (``model.ConsumerChannel``) ----------------------------

    def deliver(self, consumer: Consumer, message: Message, properties: Properties) -> None:
        """Number a delivery to ``consumer``, keep it unacked, post it to the dispatcher."""
        tag = self._next_tag
        self._next_tag = tag + 1
        self._unacked[tag] = (message, consumer)
        self._connection.post(
            self,
            consumer.on_delivery,
            Delivery(
                consumer.tag,
                tag,
                message.redelivered,
                message.exchange,
                message.routing_key,
                message.body,
                properties,
            ),
        )

    def consumer_cancelled(self, consumer: Consumer) -> None:
        """The queue of ``consumer`` was deleted: the consumer-cancel notification."""
        self._consumers.pop(consumer.tag, None)
        if consumer.on_cancel is not None and self._reason is None:
            self._connection.post(self, consumer.on_cancel, consumer.tag)

    # -- basic ---------------------------------------------------------------

    async def qos(self, prefetch_count: int) -> None:
        """Set the prefetch of consumers started later on this channel (0 = unlimited)."""
        await trio.lowlevel.checkpoint()
        self.check_open()
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
        self.check_open()
        q = self._lookup_queue(queue)
        tag = consumer_tag or f"amq.ctag-{secrets.token_urlsafe(16)}"
        if tag in self._consumers:
            self._connection.fail(
                NOT_ALLOWED, f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"
            )
        if q.consumers and (exclusive or q.consumers[0].exclusive):
            self._fail(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - queue '{q.name}' in vhost '{self._vhost.name}' in exclusive use",
            )
        consumer = Consumer(tag, self, q, on_delivery, on_cancel, self._prefetch, exclusive)
        self._consumers[tag] = consumer
        q.consumers.append(consumer)
        q.had_consumers = True
        q.dispatch()
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """``basic.cancel``; deliveries handed to the dispatcher arrive before it returns."""
        await trio.lowlevel.checkpoint()
        self.check_open()
        consumer = self._consumers.pop(consumer_tag, None)
        if consumer is None:
            return
        self._remove_consumer(consumer)
        await self._connection.flush()

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """Acknowledge a delivery (all up to it with ``multiple``)."""
        self._check_open_sync()
        touched: dict[Queue, None] = {}
        for message, consumer in self._take(delivery_tag, multiple):
            queue = message.queue
            queue.unacked -= 1
            queue.stats.acked += 1
            if consumer is not None:
                consumer.unacked -= 1
            touched[queue] = None
        for queue in touched:
            queue.dispatch()
        self._vhost.changed()

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
            touched: dict[Queue, None] = {}
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
        self._vhost.changed()

    async def confirm_select(self) -> None:
        """Turn on publisher confirms for this channel."""
        await trio.lowlevel.checkpoint()
        self.check_open()
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
        self.check_open()
        if properties is None:
            props = Properties()
        else:
            # Copy once: the publisher may reuse or mutate its Properties.
            headers = properties.headers
            props = copy_properties(properties, dict(headers) if headers is not None else None)
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
        if props.user_id is not None and props.user_id != self._connection.params.user:
            self._fail(
                PRECONDITION_FAILED,
                f"PRECONDITION_FAILED - user_id property set to '{props.user_id}' but "
                f"authenticated user was '{self._connection.params.user}'",
            )
        ex = self._vhost.exchange(exchange)
        if ex is None:
            self._not_found("exchange", exchange)
        queues = ex.route(routing_key, props.headers)
        if not queues:
            if mandatory and self._confirm:
                raise Unroutable(exchange, routing_key, "NO_ROUTE", NO_ROUTE)
            return
        now = (
            current_time()
            if props.expiration is not None or any(q.ttl is not None for q in queues)
            else None
        )
        refused = False
        for q in queues:
            message = Message(q, body, props, exchange, routing_key, q.expiry_for(message_ttl, now))
            if not q.push(message):
                refused = True
        self._vhost.changed()
        if refused and self._confirm:
            raise PublishNacked(
                f"message to exchange {exchange!r} with routing key {routing_key!r} was "
                "nacked: a queue is full (x-overflow reject-publish)"
            )

    async def get(self, queue: str, *, no_ack: bool = False) -> Delivery | None:
        """``basic.get``: one message, or None if the queue is empty."""
        await trio.lowlevel.checkpoint()
        self.check_open()
        q = self._lookup_queue(queue)
        if q.expire_heads(current_time()):
            self._vhost.changed()
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
        self._vhost.changed()
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
        self.check_open()
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
                try:
                    check_queue_equivalent(
                        queue,
                        vhost.name,
                        durable=durable,
                        auto_delete=auto_delete,
                        args=args,
                        current_durable=existing.durable,
                        current_auto_delete=existing.auto_delete,
                        current_args=existing.arguments,
                    )
                except Refusal as refusal:
                    self._refused(refusal)
                q = existing
            else:
                try:
                    settings = queue_settings(queue, vhost.name, args)
                except Refusal as refusal:
                    self._refused(refusal)
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
                q = Queue(
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
                    self._connection.exclusive_queues.append(q)
                vhost.changed()
        if q.expire_heads(current_time()):
            vhost.changed()
        self._last_queue = q.name
        return QueueInfo(name=q.name, message_count=len(q.ready), consumer_count=len(q.consumers))

    async def queue_delete(
        self, queue: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """Delete a queue; return how many ready messages it had (0 if it did not exist)."""
        await trio.lowlevel.checkpoint()
        self.check_open()
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
        self.check_open()
        q = self._lookup_queue(queue)
        count = len(q.ready)
        q.ready.clear()
        self._vhost.changed()
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
        self.check_open()
        q = self._lookup_queue(queue)
        ex = self._bindable(exchange)
        args = dict(arguments or {})
        if ex.kind == "headers":
            problem = check_x_match(args)
            if problem is not None:
                self._fail(PRECONDITION_FAILED, problem)
        ex.bind(q, routing_key, args)
        self._vhost.changed()

    async def queue_unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Remove a binding; as in RabbitMQ 3.10, a missing queue, exchange or binding
        is no error."""
        await trio.lowlevel.checkpoint()
        self.check_open()
        q = self._vhost.queues.get(queue or self._last_queue)
        ex = self._vhost.exchange(exchange)
        if ex is not None and ex.kind == "default":
            self._bindable(exchange)  # refused, as binding it is
        if q is None or ex is None:
            return
        self._check_owner(q)
        ex.unbind(q, routing_key, dict(arguments or {}))
        self._vhost.changed()

    def _bindable(self, exchange: str) -> Exchange:
        ex = self._vhost.exchange(exchange)
        if ex is None:
            self._not_found("exchange", exchange)
        if ex.kind == "default":
            self._fail(
                ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange",
            )
        return ex

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
        self.check_open()
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
        if exchange_type not in EXCHANGE_TYPES:
            self._connection.fail(
                COMMAND_INVALID, f"COMMAND_INVALID - unknown exchange type '{exchange_type}'"
            )
        args = dict(arguments or {})
        if existing is not None:
            # Redeclaring an existing exchange, a pre-declared amq.* one included,
            # is fine when it is equivalent (RabbitMQ compares the same fields).
            try:
                check_exchange_equivalent(
                    exchange,
                    vhost.name,
                    (exchange_type, durable, auto_delete, args),
                    (existing.kind, existing.durable, existing.auto_delete, existing.arguments),
                )
            except Refusal as refusal:
                self._refused(refusal)
            return
        if exchange.startswith("amq."):
            self._fail(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - exchange name '{exchange}' contains reserved prefix 'amq.*'",
            )
        vhost.exchanges[exchange] = Exchange(
            vhost,
            exchange,
            exchange_type,
            durable=durable,
            auto_delete=auto_delete,
            arguments=args,
        )
        vhost.changed()

    async def exchange_delete(self, exchange: str) -> None:
        """Delete an exchange and its bindings (no-op if it does not exist)."""
        await trio.lowlevel.checkpoint()
        self.check_open()
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
        self._vhost.changed()

    async def close(self) -> None:
        """Close the channel; its unacknowledged deliveries are requeued."""
        self._teardown(ChannelClosed("Normal shutdown", REPLY_SUCCESS))
        await trio.lowlevel.cancel_shielded_checkpoint()


if TYPE_CHECKING:

    def _implements(channel: MemoryChannel) -> tuple[Channel, ConsumerChannel]:
        return channel, channel
