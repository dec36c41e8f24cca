"""The embedded in-memory AMQP broker behind ``memory://NAME`` URLs.

It implements the transport seam (``asyncworker._transports.base``) without
a network: ``connect(params)`` opens a connection to the process-wide broker
named ``params.host`` ("default" for ``memory://``), created on first use,
and ``connect(params, broker=...)`` to a broker of the caller's own.  The
same behaviour tests run against RabbitMQ and against this broker, so it
follows RabbitMQ 3.10 where workers can observe the difference, with the same
reply codes and texts (``404 NOT_FOUND``, ``406 PRECONDITION_FAILED``, ...).

Four modules, each importing only the ones below it:

* ``transport``: ``connect()`` and ``MemoryConnection``, whose dispatcher
  task runs the delivery callbacks;
* ``channel``: ``MemoryChannel``, the AMQP methods with RabbitMQ's checks;
* ``broker``: ``MemoryBroker`` (vhosts, the TTL timer, the inspection tests
  use) and the registry of ``memory://`` names;
* ``model``: queues, exchanges and messages: routing, requeueing,
  dead-lettering and expiry.

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

Deliveries are never made re-entrantly (see ``transport``): a handler's
``ack()`` cannot recurse into the consumer.  The broker keeps expiry
deadlines in trio time, so a broker (and the messages in it) should not
outlive the ``trio.run`` that filled it; use a fresh broker per test
(``MemoryBroker()``, handed to ``connect(params, broker=...)`` or
registered with ``register_broker``) or ``MemoryBroker.reset()``.
"""

from .broker import MemoryBroker as MemoryBroker
from .broker import get_broker as get_broker
from .broker import register_broker as register_broker
from .broker import unregister_broker as unregister_broker
from .channel import MemoryChannel as MemoryChannel
from .model import QueueStats as QueueStats
from .transport import MemoryConnection as MemoryConnection
from .transport import connect as connect

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
