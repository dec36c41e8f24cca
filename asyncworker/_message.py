"""What a chain carries: a ``Message``, or on a bulk route a ``Batch`` of them.

Both satisfy ``Settleable``, the protocol the settlement policy and the
standard middlewares are written against, so the type checker sees both
branches of a middleware that handles either.  ``AppHandle`` is what a
message knows of the App that consumed it (``message.app``): the few things
a handler or a middleware may do with it, publish and declare included,
without this layer importing the App.

Settlement is synchronous on purpose: it only queues a frame for the
transport's writer, so a cancelled handler or a shutdown cannot interrupt it
half-way.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ._exceptions import MessageDecodeError

if TYPE_CHECKING:
    from ._statistics import AppStatistics
    from ._topology import Queue
    from ._transports import Channel, Delivery, Properties

__all__ = ["AppHandle", "Batch", "Message", "Settleable", "Settlement", "mark_republished"]

logger = logging.getLogger("asyncworker")


class Settlement(enum.Enum):
    """How a message was settled with the broker."""

    #: ``basic.ack``: done, the broker forgets it.
    ACK = "ack"
    #: ``basic.reject(requeue=True)``: back to its queue, to be delivered again.
    REQUEUE = "requeue"
    #: ``basic.reject(requeue=False)``: dropped, or dead-lettered if the queue has a DLX.
    REJECT = "reject"
    #: Not settled here: the channel that delivered it closed first, so the
    #: broker already put it back in its queue and will deliver it again.
    LOST = "lost"


class AppHandle(Protocol):
    """The App as a message sees it (``message.app``): what handlers and middlewares use.

    ``App`` satisfies it; ``Retry`` publishes and declares through it.
    """

    #: Application state shared by handlers (database pools, clients, ...).
    state: dict[str, Any]

    @property
    def url(self) -> str:
        """The broker URL, with the password masked."""
        ...

    async def publish(
        self,
        body: bytes | str | Any,
        *,
        routing_key: str,
        exchange: str = "",
        vhost: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: Properties | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """Publish a message and wait for the broker's confirmation (``App.publish``)."""
        ...

    async def declare_queue(
        self,
        name: str | Queue,
        *,
        vhost: str | None = None,
        durable: bool = True,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Declare a queue, by name or as a ``Queue`` (``App.declare_queue``)."""
        ...

    def declared_queue(self, name: str, *, vhost: str | None = None) -> Queue | None:
        """The ``Queue`` the App declares under ``name``, or None (``App.declared_queue``)."""
        ...

    async def shutdown(self) -> None:
        """Stop gracefully (``App.shutdown``; from a handler it returns at once)."""
        ...

    def statistics(self) -> AppStatistics:
        """A snapshot of the App's connections and consumers (``App.statistics``)."""
        ...


class Settleable(Protocol):
    """What a chain carries, as the settlement policy and generic middlewares see it.

    A ``Message``, or a ``Batch`` on a bulk route.  A middleware written for
    both takes a type variable bound to ``Settleable`` and branches on
    ``isinstance(message, Batch)`` where the two differ.
    """

    @property
    def queue(self) -> str:
        """The queue it came from."""
        ...

    @property
    def vhost(self) -> str:
        """The vhost of that queue."""
        ...

    @property
    def delivery_tag(self) -> int:
        """The delivery tag (of the last message, for a batch)."""
        ...

    @property
    def redelivered(self) -> bool:
        """Whether it (any message of it, for a batch) was delivered before."""
        ...

    @property
    def settled(self) -> bool:
        """Whether it is settled (every message of it, for a batch)."""
        ...

    @property
    def settlement(self) -> Settlement | None:
        """How it was settled; None while it is not (or, for a batch, when its messages differ)."""
        ...

    @property
    def state(self) -> dict[str, Any]:
        """A dict for middlewares and handlers to pass data along."""
        ...

    def _settle(self, how: Settlement) -> bool:
        """Settle what is not settled yet with ``how`` (synchronous); True if anything was."""
        ...


class _Tally:
    """Per-consumer counters updated on every settlement (read by statistics())."""

    __slots__ = ("acked", "lost", "rejected", "requeued")

    def __init__(self) -> None:
        self.acked = 0
        self.requeued = 0
        self.rejected = 0
        self.lost = 0


class Message:
    """One delivered message, as a handler and the middlewares see it.

    A message is settled exactly once.  The first of ``ack()``,
    ``reject()`` or the route's settlement policy (ack when the handler
    returns, requeue when it raises, by default) sends the answer to the
    broker; any later call is a no-op that returns False, so a double ack can
    never reach RabbitMQ (where it would close the channel).

    Settlement always goes to the channel that delivered the message.  If that
    channel is gone (connection lost), nothing is sent: the broker has already
    put the message back in its queue and will deliver it again with
    ``redelivered=True``.
    """

    __slots__ = (
        "_channel",
        "_delivery",
        "_headers",
        "_republished",
        "_settlement",
        "_state",
        "_tally",
        "app",
        "queue",
        "vhost",
    )

    # Set by mark_republished() only (unset on most messages: never read directly).
    _republished: tuple[str, bool]

    def __init__(
        self,
        delivery: Delivery,
        *,
        queue: str,
        vhost: str,
        channel: Channel,
        app: AppHandle | None = None,
        tally: _Tally | None = None,
    ) -> None:
        self._delivery = delivery
        self._channel = channel
        self._headers: dict[str, Any] | None = delivery.properties.headers
        self._settlement: Settlement | None = None
        self._tally = tally if tally is not None else _Tally()
        #: The queue this message was consumed from.
        self.queue = queue
        #: The vhost of that queue.
        self.vhost = vhost
        #: The App that consumed it (None when built by hand in a test).
        self.app = app
        self._state: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"<Message queue={self.queue!r} vhost={self.vhost!r} "
            f"delivery_tag={self.delivery_tag} size={len(self.body)}>"
        )

    # -- content -------------------------------------------------------

    @property
    def body(self) -> bytes:
        """The raw body."""
        return self._delivery.body

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (or the ``content_encoding`` it declares).

        Raises ``MessageDecodeError`` naming the queue and delivery tag if it
        cannot be decoded.
        """
        encoding = self._delivery.properties.content_encoding or "utf-8"
        try:
            return self._delivery.body.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise MessageDecodeError(
                f"body of message {self.delivery_tag} from queue {self.queue!r} is not "
                f"valid {encoding} text: {exc}"
            ) from exc

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises ``MessageDecodeError`` naming the queue and delivery tag if the
        body is not valid JSON.
        """
        try:
            return json.loads(self._delivery.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageDecodeError(
                f"body of message {self.delivery_tag} from queue {self.queue!r} "
                f"(vhost {self.vhost!r}) is not valid JSON: {exc}"
            ) from exc

    @property
    def state(self) -> dict[str, Any]:
        """A dict for middlewares and handlers to pass per-message data along."""
        if self._state is None:
            self._state = {}  # made on first use: most messages never need one
        return self._state

    @property
    def headers(self) -> dict[str, Any]:
        """The message headers (a mutable dict; empty if it had none)."""
        if self._headers is None:
            self._headers = {}
        return self._headers

    @property
    def properties(self) -> Properties:
        """All AMQP properties: content_type, correlation_id, message_id, timestamp, ..."""
        return self._delivery.properties

    @property
    def exchange(self) -> str:
        """The exchange it was published to (``""`` for the default exchange)."""
        return self._delivery.exchange

    @property
    def routing_key(self) -> str:
        """The routing key it was published with."""
        return self._delivery.routing_key

    @property
    def delivery_tag(self) -> int:
        """The delivery tag, unique on the channel that delivered it."""
        return self._delivery.delivery_tag

    @property
    def redelivered(self) -> bool:
        """True if the broker delivered this message before (it was requeued or its
        consumer's channel closed before settling it)."""
        return self._delivery.redelivered

    # -- settlement ----------------------------------------------------

    @property
    def settled(self) -> bool:
        """Whether the message has been settled (or lost with its channel)."""
        return self._settlement is not None

    @property
    def republished_to(self) -> str | None:
        """The queue asyncworker published a copy of this message to, or None.

        ``Retry`` sets it when it republished the message for another attempt
        (to its queue, or to the delay queue) or dead-lettered it (to
        ``<queue>.dlq``: then ``dead_lettered`` is True too), before it acks
        this delivery; ``Tracing`` reports the outcome from it.
        """
        # The slot is left unset on the hot path: most messages never get one.
        republished: tuple[str, bool] | None = getattr(self, "_republished", None)
        return None if republished is None else republished[0]

    @property
    def dead_lettered(self) -> bool:
        """Whether asyncworker dead-lettered this message (its copy is in ``republished_to``).

        A message rejected without requeue (``reject(requeue=False)``,
        ``Retry(dead_letter="dlx")``) is dead-lettered by the broker, if its
        queue has a dead-letter exchange: that shows as ``Settlement.REJECT``.
        """
        republished: tuple[str, bool] | None = getattr(self, "_republished", None)
        return republished is not None and republished[1]

    @property
    def settlement(self) -> Settlement | None:
        """How it was settled, or None while it is not."""
        return self._settlement

    async def ack(self) -> bool:
        """Acknowledge the message: the broker forgets it.

        Returns True if this call settled the message, False if it was already
        settled (nothing is sent then).
        """
        return self._settle(Settlement.ACK)

    async def reject(self, requeue: bool = True) -> bool:
        """Reject the message: back to its queue if ``requeue``, else dropped or
        dead-lettered (if the queue has a dead-letter exchange).

        Returns True if this call settled the message, False if it was already
        settled (nothing is sent then).
        """
        return self._settle(Settlement.REQUEUE if requeue else Settlement.REJECT)

    def _settle_lost(self) -> None:
        """Record that the message was never settled because its channel closed."""
        if self._settlement is None:
            self._settlement = Settlement.LOST
            self._tally.lost += 1

    def _settle_requeue(self) -> None:
        self._settle(Settlement.REQUEUE)

    def _settle(self, how: Settlement) -> bool:
        # Synchronous on purpose: settlement never checkpoints, so a cancelled
        # handler or a shutdown cannot interrupt it half-way.
        if self._settlement is not None:
            return False
        channel = self._channel
        tally = self._tally
        if not channel.is_open:
            self._settle_lost()
            logger.debug(
                "not settling message %d of queue %r: its channel closed, the broker "
                "will redeliver it",
                self.delivery_tag,
                self.queue,
            )
            return False
        self._settlement = how
        if how is Settlement.ACK:
            channel.ack(self._delivery.delivery_tag)
            tally.acked += 1
        elif how is Settlement.REQUEUE:
            channel.reject(self._delivery.delivery_tag, True)
            tally.requeued += 1
        else:
            channel.reject(self._delivery.delivery_tag, False)
            tally.rejected += 1
        return True


def mark_republished(message: Message, queue: str, *, dead_letter: bool) -> None:
    """Record that a copy of ``message`` went to ``queue`` (``dead_letter``: as a dead letter).

    What republishes a message calls it once the copy is confirmed, before it
    acks the original (``Retry`` does): ``Message.republished_to`` and
    ``Message.dead_lettered`` read it.
    """
    message._republished = (queue, dead_letter)


class _BatchOwner(Protocol):
    """What a ``Batch`` asks of the collector that made it."""

    #: Batches of the consumer being handled right now.
    @property
    def running(self) -> int: ...


class Batch(list[Message]):
    """The messages a bulk handler receives: a ``list[Message]`` of one queue.

    Besides being a list, a batch answers the few attributes the settlement
    policy and the standard middlewares read on a message (it is
    ``Settleable``), so that they work on bulk routes unchanged:

    * ``queue``, ``vhost``: where every message of the batch came from;
    * ``delivery_tag``: the delivery tag of the last message;
    * ``redelivered``: whether any message was delivered before;
    * ``settled``: whether every message is settled;
    * ``settlement``: the settlement shared by every message, or None while
      any is unsettled or when they were settled differently;
    * ``state``: a dict for middlewares to pass per-batch data along.

    Settle single messages with ``message.ack()`` / ``message.reject()``
    inside the handler; the settlement policy settles the others.
    """

    __slots__ = ("_collector", "queue", "state", "vhost")

    def __init__(
        self,
        messages: Iterable[Message] = (),
        *,
        queue: str,
        vhost: str,
        collector: _BatchOwner | None = None,
    ) -> None:
        super().__init__(messages)
        #: The queue of every message in the batch.
        self.queue = queue
        #: Its vhost.
        self.vhost = vhost
        #: A dict for middlewares and handlers to pass per-batch data along.
        self.state: dict[str, Any] = {}
        self._collector = collector

    def __repr__(self) -> str:
        return f"<Batch queue={self.queue!r} vhost={self.vhost!r} size={len(self)}>"

    @property
    def delivery_tag(self) -> int:
        """The delivery tag of the last message (0 for an empty batch)."""
        return self[-1].delivery_tag if self else 0

    @property
    def redelivered(self) -> bool:
        """Whether any message of the batch was delivered before."""
        return any(message.redelivered for message in self)

    @property
    def settled(self) -> bool:
        """Whether every message of the batch is settled."""
        return all(message.settled for message in self)

    @property
    def settlement(self) -> Settlement | None:
        """The settlement shared by every message; None if any is unsettled or they differ."""
        kinds = {message.settlement for message in self}
        return kinds.pop() if len(kinds) == 1 else None

    def outcomes(self) -> dict[str, int]:
        """How many messages were settled each way (``"unsettled"`` for the others)."""
        counts: dict[str, int] = {}
        for message in self:
            key = message.settlement.value if message.settlement is not None else "unsettled"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _settle(self, how: Settlement) -> bool:
        """Settle every message not settled yet with ``how``; True if any was."""
        if how is Settlement.ACK and self._ack_all_at_once():
            return True
        done = False
        for message in self:
            done = message._settle(how) or done
        return done

    def _ack_all_at_once(self) -> bool:
        """The ``basic.ack(multiple=True)`` fast path; False when it does not apply.

        Safe only when every unacknowledged delivery of the channel up to the
        last tag is in this batch: all messages unsettled, on one open channel,
        with consecutive tags, and no other batch of the consumer in flight
        (earlier batches were settled in full by the settlement policy, and the
        buffered messages have higher tags).
        """
        collector = self._collector
        if collector is None or collector.running != 1 or len(self) < 2:
            return False
        first = self[0]
        channel = first._channel
        if not channel.is_open:
            return False
        if self[-1].delivery_tag - first.delivery_tag != len(self) - 1:
            return False
        for message in self:
            if message._settlement is not None or message._channel is not channel:
                return False
        channel.ack(self[-1].delivery_tag, True)
        for message in self:
            message._settlement = Settlement.ACK
        first._tally.acked += len(self)
        return True
