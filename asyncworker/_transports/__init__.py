"""The transports: how asyncworker talks to a broker.

Layout (arrows point down; nothing below imports what is above it)::

    __init__.py      connect(params): the only module that names both transports
    amqp/            amqp:// and amqps://: a trio-native AMQP 0-9-1 client
        connection   the socket, handshake, reader/writer/heartbeat tasks, connect()
        channel      one channel: requests and replies, consumers, confirms, settlement
        codec        pure encoding and decoding of frames, field tables, properties
    memory/          memory://: an embedded broker modelling RabbitMQ, for tests
        transport    the seam adapter: connections, their dispatcher, connect()
        channel      the seam adapter: one channel, as RabbitMQ's channel behaves
        broker       MemoryBroker: vhosts, the TTL timer, inspection, the name registry
        model        queues, exchanges, messages: routing, dead-lettering, expiry
    base             the seam: records, Protocols, callback types
    params           ConnectionParams and the parsing of broker URLs

The rest of the package imports the names below from here and nothing from
the implementations, except ``asyncworker.testing``, which uses the memory
broker's public inspection methods.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from .base import CancelCallback as CancelCallback
from .base import Channel as Channel
from .base import Connection as Connection
from .base import Delivery as Delivery
from .base import DeliveryCallback as DeliveryCallback
from .base import Properties as Properties
from .base import QueueInfo as QueueInfo
from .params import ConnectionParams as ConnectionParams
from .params import redact_url as redact_url

__all__ = [
    "CancelCallback",
    "Channel",
    "Connection",
    "ConnectionParams",
    "Delivery",
    "DeliveryCallback",
    "Properties",
    "QueueInfo",
    "connect",
    "redact_url",
]


def connect(params: ConnectionParams) -> AbstractAsyncContextManager[Connection]:
    """Open a connection with the transport that ``params.scheme`` selects.

    ``memory://NAME`` reaches the memory broker registered under ``NAME``
    (created on first use).  Raises ``ConnectError`` (or
    ``AuthenticationError``) with a message naming the host, port and vhost
    if the connection cannot be opened.
    """
    # Imported here, so that a memory-only program never loads the AMQP
    # client, and an AMQP worker never loads the broker model.
    if params.scheme == "memory":
        from .memory.transport import connect as connect_memory

        return connect_memory(params)
    from .amqp.connection import connect as connect_amqp

    return connect_amqp(params)
