"""The ``amqp://`` and ``amqps://`` transport: a trio-native AMQP 0-9-1 client.

Four modules, each importing only the ones below it:

* ``connection``: ``connect()`` and the connection's reader, writer and
  heartbeat tasks (its docstring tells how they share the work);
* ``handshake``: opening the socket and the AMQP handshake, which returns
  what was negotiated before any connection object exists;
* ``channel``: ``AMQPChannel``, one channel's requests, consumers, publisher
  confirms and settlement;
* ``codec``: pure encoding and decoding of frames, field tables and content
  properties, on pamqp's codec and constants.

``asyncworker._transports.connect()`` reaches ``connection.connect`` for
``amqp``/``amqps`` parameters; nothing else in asyncworker imports this
package.
"""

from .channel import AMQPChannel as AMQPChannel
from .connection import AMQPConnection as AMQPConnection
from .connection import connect as connect

__all__ = ["AMQPChannel", "AMQPConnection", "connect"]
