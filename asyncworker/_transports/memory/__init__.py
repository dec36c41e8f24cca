"""The embedded in-memory AMQP broker behind ``memory://NAME`` URLs.

It implements the transport seam (``asyncworker._transports.base``) without
a network: ``connect(params)`` opens a connection to the process-wide broker
named ``params.host`` ("default" for ``memory://``), created on first use,
and ``connect(params, broker=...)`` to a broker of the caller's own.  The
same behaviour tests run against RabbitMQ and against this broker, so it
follows RabbitMQ 3.10 where workers can observe the difference, with the same
reply codes and texts (``404 NOT_FOUND``, ``406 PRECONDITION_FAILED``, ...).

Modules, each importing only the ones below it:

* ``transport``: ``connect()`` and ``MemoryConnection``, whose dispatcher
  task runs the delivery callbacks;
* ``channel``: ``MemoryChannel``, the AMQP methods with RabbitMQ's checks;
* ``broker``: ``MemoryBroker`` (vhosts, the TTL timer, the inspection tests
  use) and the registry of ``memory://`` names;
* ``arguments``: the checks of queue and exchange arguments (406),
  with RabbitMQ's texts;
* ``model``: queues, exchanges and messages: routing, requeueing,
  dead-lettering and expiry;
* ``routing``: how a topic pattern or a headers binding matches a message.

Modelled:

* vhosts (``/`` exists; ``MemoryBroker.add_vhost``; an unknown vhost is a
  ``ConnectError``);
* the default exchange (also as ``amq.default``), the pre-declared
  ``amq.direct``/``amq.fanout``/``amq.topic``/``amq.headers``/``amq.match``,
  user exchanges of type ``direct``, ``fanout``, ``topic`` (``*`` is one word,
  ``#`` zero or more) and ``headers`` (``x-match`` ``all``/``any``/
  ``all-with-x``/``any-with-x``, void values as "present", ``x-`` arguments
  left out except in the ``-with-x`` modes; an invalid ``x-match`` is 406),
  queue bindings with their arguments, ``queue.unbind`` (a missing binding is
  no error), ``exchange.declare`` (passive too; equivalence of type, durable,
  auto-delete and ``alternate-exchange`` -> 406; a new name with the ``amq.``
  prefix is reserved, 403, while redeclaring a pre-declared one is fine) and
  ``exchange.delete``;
* ``queue.declare`` (passive, server-named ``amq.gen-...`` queues, argument
  validation and equivalence checks -> 406, with RabbitMQ 3.10's texts),
  ``queue.delete`` (``if_unused``/``if_empty``; consumers get the
  consumer-cancel notification), ``queue.purge``,
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
  close) and ``x-delivery-limit`` (dead-lettered with reason
  ``delivery_limit`` once returned more times than the limit); quorum
  queues must be durable, non-exclusive and not auto-delete, and refuse
  ``x-max-priority`` and ``x-queue-mode``, as classic queues refuse
  ``x-delivery-limit`` (406);
* ``x-single-active-consumer``: only the first consumer registered gets
  messages, the next one takes over when it leaves (``MemoryBroker.consumers``
  reports which is active);
* ``x-max-priority`` on classic queues (1 to 255): ready messages are served
  highest priority first, FIFO within one; no priority counts as 0 and one
  above the maximum as the maximum; a requeued message goes back to its place
  within its priority;
* ``x-max-length`` with ``x-overflow`` ``drop-head`` (dead-letters with reason
  ``maxlen``), ``reject-publish`` and ``reject-publish-dlx`` (publisher nack);
* publisher confirms (every routed publish is confirmed at once; a mandatory
  publish without a route raises ``Unroutable`` 312; a nack from
  ``reject-publish`` raises ``PublishNacked``), the ``user_id`` check (406) and
  invalid ``expiration`` values (406);
* ``MemoryBroker.close_connections(name)``, as ``rabbitmqctl
  close_connection``: 320 CONNECTION_FORCED, for reconnection tests.

Not modelled: a negative ``x-delivery-limit`` (RabbitMQ 3.10 accepts one; the
memory broker refuses it, 406, and ``Queue`` refuses it too),
exchange-to-exchange bindings, alternate exchanges,
``x-expires``, ``x-max-length-bytes``, streams, consumer priorities,
auto-delete exchanges, transactions, ``basic.recover``, flow control,
persistence (``durable`` is only compared) and authentication (any user and
password are accepted).

Differences in timing (both allowed by AMQP): a publish to a missing exchange
raises ``ExchangeNotFound`` from ``publish`` itself, with or without confirms
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

from .broker import ConsumerInfo as ConsumerInfo
from .broker import MemoryBroker as MemoryBroker
from .broker import get_broker as get_broker
from .broker import register_broker as register_broker
from .broker import unregister_broker as unregister_broker
from .channel import MemoryChannel as MemoryChannel
from .model import QueueStats as QueueStats
from .transport import MemoryConnection as MemoryConnection
from .transport import connect as connect

__all__ = [
    "ConsumerInfo",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryConnection",
    "QueueStats",
    "connect",
    "get_broker",
    "register_broker",
    "unregister_broker",
]
