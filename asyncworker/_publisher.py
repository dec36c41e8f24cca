"""Publishing with confirms: the App's publishing connections, channels, locks and counts.

``App.publish()`` encodes the body and hands it to the ``Publisher``, which
owns everything publishing needs:

* one connection per vhost of its own (opened on the first publish, held by
  a task in the App's nursery until serving ends): a broker short of memory
  or disk blocks every connection that publishes, and the consumers' acks
  must still flow on theirs;
* one confirm-mode channel per vhost on it, shared by concurrent publishes,
  behind a lock per vhost for the moment it is opened;
* the retry of a publish interrupted by a lost connection (at-least-once),
  until the caller's timeout;
* the confirmed/failed counts per vhost (``AppStatistics``).

While the App serves, a publish to a vhost it consumes waits for that
vhost's connection to be up (``connected(vhost)``, from its supervisor):
during a reconnection it goes out once the broker is back.  Not serving
(before ``serve()``, in startup and shutdown hooks), a publish opens a
short-lived connection of its own.  Node failover of the publishing
connection lands here.

Publish hooks: when tracing is configured (see ``_instrumentation``), every
publish runs inside the context manager its hook returns (the App's own hook,
``Publisher.hook``, else the process-wide one), which may add headers to the
message's properties first.  With neither, ``publish()`` hands back the
publish's own coroutine: a plain call and two attribute reads more, nothing
allocated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from . import _instrumentation
from ._declare import declare_on_channel
from ._exceptions import (
    AsyncWorkerError,
    AuthenticationError,
    ChannelClosed,
    ConnectError,
    ConnectionClosed,
    ExchangeNotFound,
    PublishTimeout,
    QueueNotFound,
)
from ._topology import Queue, Topology

if TYPE_CHECKING:
    from ._transports import Channel, Connection, ConnectionParams, Properties

__all__ = ["Publisher", "encode_body"]

logger = logging.getLogger("asyncworker")

Connector = Callable[["ConnectionParams"], AbstractAsyncContextManager["Connection"]]


class Publisher:
    """The publishing side of one App (see the module docstring)."""

    def __init__(self, params: ConnectionParams, connector: Connector) -> None:
        self._params = params
        self._connector = connector
        self._serving = False
        self._nursery: trio.Nursery | None = None
        self._consumed: frozenset[str] = frozenset()
        self._connected: Callable[[str], trio.Event | None] = _never
        self._connections: dict[str, Connection] = {}
        self._channels: dict[str, Channel] = {}
        self._locks: dict[str, trio.Lock] = {}
        #: ``publish()`` calls the broker confirmed, per vhost.
        self.confirmed: dict[str, int] = {}
        #: ``publish()`` calls that raised, per vhost.
        self.failed: dict[str, int] = {}
        #: This App's publish hook (its ``Tracing`` middleware's), or None for
        #: the process-wide one (``_instrumentation.process_hook``).
        self.hook: _instrumentation.PublishHook | None = None

    # -- the App's lifecycle --------------------------------------------------

    def configure(self, params: ConnectionParams, connector: Connector) -> None:
        """Publish with these parameters and this connector (while not serving)."""
        self._params = params
        self._connector = connector

    def open(self) -> None:
        """``serve()`` began: a publish interrupted by a lost connection is retried."""
        self._serving = True

    def attach(
        self,
        nursery: trio.Nursery,
        consumed: frozenset[str],
        connected: Callable[[str], trio.Event | None],
    ) -> None:
        """The consumers are starting: hold publishing connections in ``nursery``.

        ``connected(vhost)`` is the event set while the consumers' connection
        to ``vhost`` is up, or None once that vhost stopped (or for a vhost
        the App does not consume).
        """
        self._nursery = nursery
        self._consumed = consumed
        self._connected = connected

    async def detach(self) -> None:
        """Every vhost has drained: close the publishing connections left.

        A publish from now on (a shutdown hook) opens a short-lived connection.
        """
        self._nursery = None
        for vhost in list(self._connections):
            await self.close_vhost(vhost)

    def close(self) -> None:
        """``serve()`` ended: forget the connections and channels of this run."""
        self._serving = False
        self._nursery = None
        self._consumed = frozenset()
        self._connected = _never
        self._connections.clear()
        self._channels.clear()

    async def close_vhost(self, vhost: str) -> None:
        """Close the publishing channel and connection of ``vhost`` (once serving ends)."""
        channel = self._channels.pop(vhost, None)
        connection = self._connections.pop(vhost, None)
        with trio.CancelScope(shield=True), trio.move_on_after(5), suppress(AsyncWorkerError):
            if channel is not None and channel.is_open:
                await channel.close()
            if connection is not None:
                await connection.aclose()

    # -- publishing -------------------------------------------------------------

    def publish(
        self,
        payload: bytes,
        *,
        vhost: str,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool,
        timeout: float,
    ) -> Awaitable[None]:
        """Publish and wait for the confirm (await it); retried across reconnections while serving.

        ``properties`` is the caller's own copy: a publish hook may change it.
        Without a hook this returns the publish's own coroutine: the seam
        costs a plain call and two attribute reads, and allocates nothing.
        """
        hook = self.hook or _instrumentation.process_hook
        if hook is None:
            return self._publish(
                payload,
                vhost=vhost,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                timeout=timeout,
            )
        return self._publish_hooked(
            hook, payload, vhost, exchange, routing_key, properties, mandatory, timeout
        )

    async def _publish_hooked(
        self,
        hook: _instrumentation.PublishHook,
        payload: bytes,
        vhost: str,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool,
        timeout: float,
    ) -> None:
        # One span (or whatever the hook does) around the publish and its
        # retries across reconnections, up to the confirm or the error.
        with hook(vhost, exchange, routing_key, properties):
            await self._publish(
                payload,
                vhost=vhost,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                timeout=timeout,
            )

    async def _publish(
        self,
        payload: bytes,
        *,
        vhost: str,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool,
        timeout: float,
    ) -> None:
        """Publish and wait for the confirm; retried across reconnections while serving."""
        try:
            with trio.fail_after(timeout):
                while True:
                    async with self._channel(vhost) as channel:
                        try:
                            await channel.publish(
                                payload,
                                exchange=exchange,
                                routing_key=routing_key,
                                properties=properties,
                                mandatory=mandatory,
                            )
                            break
                        except (ConnectionClosed, ChannelClosed) as exc:
                            if not self._retry(exchange, exc):
                                raise
                    # The connection (or the channel) went down before the
                    # confirm: publish again on the next one.  The first copy
                    # may have reached the queue: at-least-once.  (A short
                    # pause: a broker dropping every connection is not hammered.)
                    await trio.sleep(0.02)
        except trio.TooSlowError:
            self._count(vhost, self.failed)
            publishing = self._connections.get(vhost)
            blocked = publishing.blocked if publishing is not None else None
            why = f" (the broker is blocking publishers: {blocked})" if blocked else ""
            raise PublishTimeout(
                f"message to exchange {exchange!r} with routing key {routing_key!r} "
                f"(vhost {vhost!r}) was not confirmed within {timeout} s{why}; it may "
                "or may not have been delivered"
            ) from None
        except Exception:
            self._count(vhost, self.failed)
            raise
        self._count(vhost, self.confirmed)

    async def declare_queue(
        self, name: str | Queue, *, vhost: str, durable: bool, arguments: dict[str, Any] | None
    ) -> None:
        """Declare a queue on a channel of its own on the publishing connection of ``vhost``.

        Of its own: a refusal (406) closes the channel it was declared on, and
        must not fail the publishes sharing the confirm channel.  A ``Queue``
        record is declared with its bindings and the exchanges they name
        (``_declare``); a refusal raises ``TopologyError``.
        """
        async with self._channel(vhost) as shared:
            connection = self._connections.get(vhost)
            own = await connection.channel() if connection is not None else shared
            try:
                if isinstance(name, Queue):
                    topology = Topology(vhost)
                    topology.add(name)
                    await declare_on_channel(own, topology)
                else:
                    await own.queue_declare(name, durable=durable, arguments=arguments)
            finally:
                if own is not shared and own.is_open:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await own.close()

    @staticmethod
    def _count(vhost: str, counts: dict[str, int]) -> None:
        counts[vhost] = counts.get(vhost, 0) + 1

    @asynccontextmanager
    async def _channel(self, vhost: str) -> AsyncIterator[Channel]:
        """A confirm-mode channel on ``vhost``; retried across reconnects while serving."""
        # A context manager yields once: retrying the body is the caller's job
        # (see publish()).  Only getting a channel is retried here.
        channel: Channel | None = None
        while channel is None:
            connected = self._connected(vhost)
            if connected is None or not self._serving:
                break
            await connected.wait()
            try:
                channel = await self._held_channel(vhost)
            except (ConnectionClosed, ChannelClosed, ConnectError) as exc:
                if isinstance(exc, QueueNotFound | ExchangeNotFound | AuthenticationError):
                    raise
                # Retried until the caller's timeout (the broker may be
                # restarting: the consumers' supervisor reconnects meanwhile).
                await trio.sleep(0.05)
        if channel is None and self._nursery is not None and vhost not in self._consumed:
            # Serving, to a vhost the App only publishes to: a publishing
            # connection is kept for it too (a connection per message would
            # cost a TCP and an AMQP handshake each time).
            channel = await self._held_channel(vhost)
        if channel is None:
            # Not serving, or that vhost's consumers have stopped: a
            # short-lived connection of its own.
            async with self._connector(replace(self._params, vhost=vhost)) as connection:
                channel = await connection.channel()
                await channel.confirm_select()
                yield channel
            return
        try:
            yield channel
        except (ConnectionClosed, ChannelClosed):
            # A dead channel is never reused (404 from a publish closes it, too).
            if self._channels.get(vhost) is channel:
                del self._channels[vhost]
            raise

    def _retry(self, exchange: str, exc: ConnectionClosed | ChannelClosed) -> bool:
        """Whether a publish that failed with ``exc`` goes again on a new channel."""
        if not self._serving:
            return False
        if isinstance(exc, ConnectionClosed) or not exc.reply_code:
            # Lost with its connection, or closed locally (a vhost that
            # finished draining closes its publishing connection): the next
            # attempt waits for the reconnection, or takes a short-lived
            # connection once that vhost has stopped.
            return True
        # A 404 naming another exchange: a concurrent publish on the shared
        # channel used a missing exchange, which closed the channel under this one.
        return isinstance(exc, ExchangeNotFound) and f"'{exchange}'" not in exc.reply_text

    async def _held_channel(self, vhost: str) -> Channel:
        channel = self._channels.get(vhost)
        if channel is not None and channel.is_open:
            return channel
        async with self._locks.setdefault(vhost, trio.Lock()):
            channel = self._channels.get(vhost)
            if channel is not None and channel.is_open:
                return channel
            connection = self._connections.get(vhost)
            if connection is None or not connection.is_open:
                if self._nursery is None:
                    raise ConnectionClosed("not serving")
                connection = await self._nursery.start(self._hold_connection, vhost)
            channel = await connection.channel()
            await channel.confirm_select()
            self._channels[vhost] = channel
            return channel

    async def _hold_connection(
        self, vhost: str, *, task_status: trio.TaskStatus[Connection]
    ) -> None:
        """Open the publishing connection to ``vhost`` and hold it until it closes.

        ``close_vhost`` closes it; a lost one is replaced by the next
        publish.  An error while opening it goes to that publish.
        """
        params = replace(
            self._params, vhost=vhost, client_name=f"{self._params.client_name} (publisher)"
        )
        started = False
        try:
            async with self._connector(params) as connection:
                self._connections[vhost] = connection
                task_status.started(connection)
                started = True
                try:
                    await connection.wait_closed()
                finally:
                    if self._connections.get(vhost) is connection:
                        del self._connections[vhost]
        except Exception as exc:
            if not started:
                raise
            # Never into the App's nursery: the next publish opens another.
            if isinstance(exc, AsyncWorkerError):
                logger.debug("publishing connection to vhost %r closed: %s", vhost, exc)
            else:
                logger.warning("publishing connection to vhost %r failed: %r", vhost, exc)


def _never(vhost: str) -> trio.Event | None:
    return None


def encode_body(body: bytes | str | Any) -> tuple[bytes, str | None]:
    """``App.publish()``'s body as bytes, and the content type it implies (if any)."""
    if isinstance(body, bytes):
        return body, None
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body), None
    if isinstance(body, str):
        return body.encode(), "text/plain"
    try:
        return json.dumps(body, separators=(",", ":")).encode(), "application/json"
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cannot publish a body of type {type(body).__name__}: pass bytes, str or a "
            f"JSON-serialisable object ({exc})"
        ) from exc
