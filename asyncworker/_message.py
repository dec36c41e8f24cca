"""The message a handler receives, and its settlement."""

from __future__ import annotations

import enum
import json
import logging
from typing import TYPE_CHECKING, Any

from ._exceptions import MessageDecodeError

if TYPE_CHECKING:
    from ._app import App
    from ._transport import Channel, Delivery, Properties

__all__ = ["Message", "Settlement"]

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
        "_settlement",
        "_state",
        "_tally",
        "app",
        "queue",
        "vhost",
    )

    def __init__(
        self,
        delivery: Delivery,
        *,
        queue: str,
        vhost: str,
        channel: Channel,
        app: App | None = None,
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
