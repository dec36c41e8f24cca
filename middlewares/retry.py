"""``Retry``: retry failed messages a bounded number of times, then dead-letter them."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeAlias

from .._chain import CallNext
from .._exceptions import TopologyError
from .._message import AppHandle, Message, mark_republished
from .._topology import Queue, dead_letter_queue, delay_queue
from .._util import suggest_keywords

__all__ = ["Retry"]

logger = logging.getLogger("asyncworker")

#: Header Retry maintains on the copies it republishes: the number of the
#: attempt the copy is (2 for the first retry).
ATTEMPT_HEADER = "x-asyncworker-attempt"
#: Header on republished copies: a short repr of the exception of the last attempt.
LAST_ERROR_HEADER = "x-asyncworker-last-error"
#: Header on dead-lettered messages (``dead_letter="dlq"``): the exception type and message.
ERROR_HEADER = "x-asyncworker-error"
#: Header on dead-lettered messages: how many attempts were made.
ATTEMPTS_HEADER = "x-asyncworker-attempts"
#: Header on dead-lettered messages: the queue the message was consumed from.
ORIGINAL_QUEUE_HEADER = "x-asyncworker-original-queue"
#: Header RabbitMQ sets on messages from quorum queues: previous deliveries.
DELIVERY_COUNT_HEADER = "x-delivery-count"

#: ``delay``: None, seconds, or a function of the failed attempt number returning seconds.
Delay: TypeAlias = float | Callable[[int], float] | None
#: ``on_exhausted(message, exc)``, sync or async.
OnExhausted: TypeAlias = Callable[[Message, Exception], Any]

_MAX_ERROR_LENGTH = 1024
# The (vhost, queue) siblings found with other arguments and used as they are:
# warned about once per process.
_USED_AS_IS: set[tuple[str, str]] = set()
_MAX_LAST_ERROR_LENGTH = 256


@suggest_keywords(
    {"max_retries": "max_attempts", "retries": "max_attempts", "attempts": "max_attempts"}
)
class Retry:
    """Retry a failing message up to ``max_attempts`` times, then dead-letter it.

    Protects a queue from poison messages: without it, a message whose
    handler always raises is requeued and redelivered forever.

    **Counting attempts.**  The attempt number of a delivery is the value of
    the ``x-asyncworker-attempt`` header (set by Retry on the copies it
    republishes; 1 when absent) plus RabbitMQ's ``x-delivery-count`` header
    (set by quorum queues to the number of previous deliveries; absent on a
    first delivery and on classic queues).  Either one alone gives the usual
    count; together they also count a republished copy that was later
    requeued.

    **When an attempt fails** (the rest of the chain raised an ``Exception``
    and did not settle the message itself):

    * with attempts left, and ``delay`` None on a quorum queue (the message
      has an ``x-delivery-count``): the exception is re-raised, the settlement
      policy requeues the message and the broker counts the delivery;
    * with attempts left otherwise: a copy of the message (same body and
      properties, headers plus ``x-asyncworker-attempt`` incremented and
      ``x-asyncworker-last-error``) is published, straight back to the queue
      through the default exchange, or, with a delay, to the queue
      ``<queue>.retry.<delay_ms>`` (declared with ``x-message-ttl`` =
      delay_ms, ``x-dead-letter-exchange`` = ``""`` and
      ``x-dead-letter-routing-key`` = ``<queue>``, so the broker moves it
      back after the delay; of the type of the queue served, see below).
      Once the broker confirmed the copy, the original is acked.  A warning
      is logged;
    * after the last attempt: ``on_exhausted(message, exc)`` is called if
      given (it may settle the message itself, e.g. ack it after storing it
      elsewhere, and then nothing more is done), then the message is
      dead-lettered and an error is logged.  With ``dead_letter="dlq"``, it
      is published to the durable queue ``<queue>.dlq`` (declared if needed)
      with the headers ``x-asyncworker-error`` (exception type and message),
      ``x-asyncworker-attempts`` and ``x-asyncworker-original-queue``, then the
      original is acked; ``dead_letter=Queue(...)`` does the same into that
      queue, declared as given.  With ``dead_letter="dlx"``, it is rejected
      without requeue, so that the queue's own ``x-dead-letter-exchange``
      takes it (a queue without one drops it).

    **Sibling queues.**  ``<queue>.dlq`` and the delay queues match the queue
    Retry serves when the App declares it as a ``Queue``: a quorum queue gets
    quorum siblings (replicated like it), a classic one classic siblings.  A
    queue the route names only by string gets classic siblings.  A sibling
    that exists with other arguments (406 PRECONDITION_FAILED) is used as it
    is, with a warning: Retry never loops on a refused declaration.

    A message is never lost on the way: if a publish fails or is not
    confirmed, the original exception is re-raised and the settlement policy
    requeues the message.  (If the connection drops between the confirm and
    the ack, the broker redelivers the original too: at-least-once.)

    **Order.**  Retry only sees exceptions raised after it in the chain.  To
    retry timeouts, put it *before* (outside) ``Timeout``:
    ``middlewares=[Retry(3), Timeout(30)]``; a Retry placed after a Timeout is
    cancelled along with the handler and never sees the ``HandlerTimeout``.
    The quorum re-raise path relies on the settlement policy requeueing
    (the default ``AckRequeue()``).

    Retry publishes through ``message.app`` (``App.publish`` with publisher
    confirms, ``App.declare_queue``): it works on messages consumed by an App.

    Args:
        max_attempts: how many times a message is handled at most (>= 1).
        delay: None (retry at once), seconds (>= 0), or a function
            ``attempt -> seconds`` of the number of the attempt that failed
            (1 for the first), e.g. ``lambda n: 0.5 * 2 ** n`` for an
            exponential backoff.  Each distinct delay gets its own delay queue.
        dead_letter: ``"dlq"`` (publish to ``<queue>.dlq``), a ``Queue``
            (publish to that queue, declared as given), or ``"dlx"`` (reject
            to the queue's dead-letter exchange).
        on_exhausted: called as ``on_exhausted(message, exc)`` (sync or
            async) when the last attempt failed, before dead-lettering.
    """

    __slots__ = ("dead_letter", "delay", "max_attempts", "on_exhausted")

    #: Retry republishes one message at a time: bulk routes refuse it.
    supports_bulk: ClassVar[bool] = False

    def __init__(
        self,
        max_attempts: int = 5,
        *,
        delay: Delay = None,
        dead_letter: Literal["dlq", "dlx"] | Queue = "dlq",
        on_exhausted: OnExhausted | None = None,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError(f"Retry(max_attempts) must be an int >= 1, got {max_attempts!r}")
        if max_attempts < 1:
            raise ValueError(
                f"Retry(max_attempts) must be >= 1 (1 means: no retry, dead-letter on the "
                f"first failure), got {max_attempts}"
            )
        if delay is not None and not callable(delay):
            if isinstance(delay, bool) or not isinstance(delay, (int, float)):
                raise TypeError(
                    "Retry(delay=...) must be None, a number of seconds or a function "
                    f"attempt -> seconds, got {delay!r}"
                )
            if not delay >= 0 or not math.isfinite(delay):
                raise ValueError(
                    f"Retry(delay=...) must be a finite number of seconds >= 0, got {delay!r}"
                )
        if not isinstance(dead_letter, Queue) and dead_letter not in ("dlq", "dlx"):
            raise ValueError(
                f"Retry(dead_letter=...) must be 'dlq' (publish to <queue>.dlq), a Queue(...) "
                f"(publish to it) or 'dlx' (reject to the queue's dead-letter exchange), got "
                f"{dead_letter!r}"
            )
        if on_exhausted is not None and not callable(on_exhausted):
            raise TypeError(
                f"Retry(on_exhausted=...) must be a function (message, exc), got {on_exhausted!r}"
            )
        #: How many times a message is handled at most.
        self.max_attempts = max_attempts
        #: The delay before a retry (None, seconds, or attempt -> seconds).
        self.delay = delay
        #: ``"dlq"``, ``"dlx"`` or the ``Queue`` dead-lettered messages go to.
        self.dead_letter = dead_letter
        #: Called when the last attempt failed.
        self.on_exhausted = on_exhausted

    def __repr__(self) -> str:
        return (
            f"Retry(max_attempts={self.max_attempts}, delay={self.delay!r}, "
            f"dead_letter={self.dead_letter!r})"
        )

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        try:
            return await call_next(message)
        except Exception as exc:
            # A message the chain settled itself was decided upon: leave it.
            if message.settled or not await self._handle_failure(message, exc):
                raise
        return None

    # -- failure handling ---------------------------------------------------------

    async def _handle_failure(self, message: Message, exc: Exception) -> bool:
        """Retry or dead-letter ``message``; True if it was settled, False to re-raise."""
        attempt = attempt_number(message)
        if attempt >= self.max_attempts:
            return await self._exhausted(message, exc, attempt)
        delay = self._delay_for(message, attempt)
        if delay is None and DELIVERY_COUNT_HEADER in message.headers:
            logger.warning(
                "message %d of queue %r (vhost %r) failed attempt %d of %d with %s; "
                "requeueing it (the quorum queue counts its deliveries)",
                message.delivery_tag,
                message.queue,
                message.vhost,
                attempt,
                self.max_attempts,
                _short_repr(exc),
            )
            return False
        delay_ms = 0 if delay is None else round(delay * 1000)
        headers = _copy_headers(message)
        headers[ATTEMPT_HEADER] = attempt + 1
        headers[LAST_ERROR_HEADER] = _short_repr(exc)
        app = _app_of(message, exc)
        target = message.queue
        try:
            if delay_ms:
                served = app.declared_queue(message.queue, vhost=message.vhost)
                sibling = delay_queue(served, message.queue, delay_ms)
                target = sibling.name
                await declare_sibling(app, sibling, message.vhost)
            await _publish_copy(app, message, target, headers)
        except Exception as publish_exc:
            logger.error(
                "could not republish message %d of queue %r (vhost %r) to %r for attempt "
                "%d: %s; the message is requeued instead",
                message.delivery_tag,
                message.queue,
                message.vhost,
                target,
                attempt + 1,
                publish_exc,
            )
            return False
        logger.warning(
            "message %d of queue %r (vhost %r) failed attempt %d of %d; retrying %s",
            message.delivery_tag,
            message.queue,
            message.vhost,
            attempt,
            self.max_attempts,
            f"in {delay_ms / 1000:g} s (via {target!r})" if delay_ms else "now",
            exc_info=exc,
        )
        mark_republished(message, target, dead_letter=False)
        await _ack_original(message)
        return True

    async def _exhausted(self, message: Message, exc: Exception, attempt: int) -> bool:
        if self.on_exhausted is not None:
            try:
                result = self.on_exhausted(message, exc)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(
                    "Retry on_exhausted callback %r failed on message %d of queue %r; "
                    "dead-lettering the message anyway",
                    self.on_exhausted,
                    message.delivery_tag,
                    message.queue,
                )
            if message.settled:
                return True
        if self.dead_letter == "dlx":
            logger.error(
                "message %d of queue %r (vhost %r) failed all %d attempts; rejecting it to "
                "the queue's dead-letter exchange (dropped if the queue has none)",
                message.delivery_tag,
                message.queue,
                message.vhost,
                attempt,
                exc_info=exc,
            )
            await message.reject(requeue=False)
            return True
        app = _app_of(message, exc)
        if isinstance(self.dead_letter, Queue):
            sibling = self.dead_letter
        else:
            served = app.declared_queue(message.queue, vhost=message.vhost)
            sibling = dead_letter_queue(served, message.queue)
        dlq = sibling.name
        headers = _copy_headers(message)
        headers[ERROR_HEADER] = _describe(exc)
        headers[ATTEMPTS_HEADER] = attempt
        headers[ORIGINAL_QUEUE_HEADER] = message.queue
        try:
            await declare_sibling(app, sibling, message.vhost)
            await _publish_copy(app, message, dlq, headers)
        except Exception as publish_exc:
            logger.error(
                "could not dead-letter message %d of queue %r (vhost %r) into %r after %d "
                "failed attempts: %s; the message is requeued instead",
                message.delivery_tag,
                message.queue,
                message.vhost,
                dlq,
                attempt,
                publish_exc,
            )
            return False
        logger.error(
            "message %d of queue %r (vhost %r) failed all %d attempts; dead-lettered into %r",
            message.delivery_tag,
            message.queue,
            message.vhost,
            attempt,
            dlq,
            exc_info=exc,
        )
        mark_republished(message, dlq, dead_letter=True)
        await _ack_original(message)
        return True

    def _delay_for(self, message: Message, attempt: int) -> float | None:
        delay = self.delay
        if delay is None:
            return None
        if not callable(delay):
            return float(delay)
        try:
            seconds = float(delay(attempt))
        except Exception:
            logger.exception(
                "Retry delay function %r failed for attempt %d of message %d of queue %r; "
                "retrying without delay",
                delay,
                attempt,
                message.delivery_tag,
                message.queue,
            )
            return 0.0
        if not seconds >= 0 or not math.isfinite(seconds):
            logger.error(
                "Retry delay function %r returned %r for attempt %d: not a finite number of "
                "seconds >= 0; retrying without delay",
                delay,
                seconds,
                attempt,
            )
            return 0.0
        return seconds


async def declare_sibling(app: AppHandle, queue: Queue, vhost: str) -> None:
    """Declare a queue Retry publishes into (``<queue>.dlq``, a delay queue).

    If it exists with other arguments (406: say a classic ``<queue>.dlq``
    made by an older version, now that the queue it serves is a quorum
    queue), it is used as it is: it exists, and the copy can go there.  A
    warning says how to make it match.  Any other failure raises.
    """
    try:
        await app.declare_queue(queue, vhost=vhost)
    except TopologyError as exc:
        if exc.reply_code != 406 or exc.argument is None:
            raise
        if (vhost, queue.name) in _USED_AS_IS:
            return
        _USED_AS_IS.add((vhost, queue.name))
        logger.warning(
            "%s; Retry uses it as it is (delete it once empty to have it declared as %r)",
            exc,
            queue,
        )


def attempt_number(message: Message) -> int:
    """The attempt number of this delivery of ``message`` (1 for the first).

    ``x-asyncworker-attempt`` (1 when absent) plus ``x-delivery-count`` (0 when
    absent); see ``Retry``.
    """
    headers = message.headers
    return max(_int_header(headers, ATTEMPT_HEADER), 1) + max(
        _int_header(headers, DELIVERY_COUNT_HEADER), 0
    )


def _int_header(headers: dict[str, Any], name: str) -> int:
    value = headers.get(name)
    if value is None or isinstance(value, bool):
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        logger.warning("ignoring header %s=%r: not an integer", name, value)
        return 0


def _copy_headers(message: Message) -> dict[str, Any]:
    headers = dict(message.headers)
    # The broker's own count of the original's deliveries: the copy is a new
    # message, its attempt number travels in x-asyncworker-attempt.
    headers.pop(DELIVERY_COUNT_HEADER, None)
    return headers


async def _publish_copy(
    app: AppHandle, message: Message, queue: str, headers: dict[str, Any]
) -> None:
    # mandatory: if the target queue vanished, the publish fails (Unroutable)
    # instead of the broker silently dropping the copy.
    await app.publish(
        message.body,
        routing_key=queue,
        exchange="",
        vhost=message.vhost,
        properties=dataclasses.replace(message.properties, headers=headers),
        mandatory=True,
    )


async def _ack_original(message: Message) -> None:
    if not await message.ack():
        logger.warning(
            "message %d of queue %r could not be acked after being republished (its "
            "channel closed): the broker will deliver it again, so it may be handled twice",
            message.delivery_tag,
            message.queue,
        )


def _app_of(message: Message, exc: Exception) -> AppHandle:
    app = message.app
    if app is None:
        raise RuntimeError(
            f"Retry cannot republish message {message.delivery_tag} of queue "
            f"{message.queue!r}: it has no App (message.app is None). Retry works on "
            "messages consumed by an App; in tests, build the Message with app=..."
        ) from exc
    return app


def _describe(exc: BaseException) -> str:
    detail = str(exc)
    name = type(exc).__qualname__
    text = f"{name}: {detail}" if detail else name
    return text[:_MAX_ERROR_LENGTH]


def _short_repr(exc: BaseException) -> str:
    text = repr(exc)
    if len(text) > _MAX_LAST_ERROR_LENGTH:
        text = text[: _MAX_LAST_ERROR_LENGTH - 3] + "..."
    return text
