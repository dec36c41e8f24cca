"""``Tracing``: OpenTelemetry spans for every message consumed and every message published.

Needs the ``otel`` extra (``pip install 'asyncworker[otel]'``: the
OpenTelemetry API; the SDK and its exporters are the application's choice).

How it plugs in, without the core importing it:

* **Consuming.**  ``Tracing`` declares ``around_settlement``: the App runs that
  step *outside* the settlement policy (see ``_config.chain_layers``), so the
  span it opens covers the whole chain and ends once the message is settled,
  with the outcome (acked, requeued, rejected, dead-lettered, retried, lost).
  Exceptions are recorded on the span from inside: ``around_handler`` runs
  right around the handler (it sees the handler's exception even when
  ``Retry`` swallows it), and the middleware itself, where the user lists
  it, sees those of the middlewares after it (``Timeout``'s
  ``HandlerTimeout``); each exception is recorded once.
* **Publishing.**  ``Tracing`` declares ``publish_hook``: the App hands it to
  its ``Publisher``, which runs every publish (``Retry``'s copies and
  dead-letters included) inside it.  Importing this module also installs a
  process-wide hook with the global tracer provider, for Apps that have no
  ``Tracing`` of their own (see ``_instrumentation``).

Attribute names follow OpenTelemetry's messaging semantic conventions for
RabbitMQ (development status, as of semconv 1.3x); what they do not name
lives under ``asyncworker.``.  docs/tracing.md lists every attribute.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - tested in a subprocess without the extra
    raise ImportError(
        "asyncworker.middlewares.Tracing needs OpenTelemetry, which is not installed: "
        "pip install 'asyncworker[otel]'"
    ) from None

from .. import _instrumentation
from .._message import Batch, Message, Settleable, Settlement
from .._util import VERSION

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from .._transports import Properties

__all__ = ["Tracing"]

S = TypeVar("S", bound=Settleable)

#: The instrumentation scope of every span (``Tracer`` name).
SCOPE = "asyncworker"

# Semantic-convention attribute names (messaging, RabbitMQ).
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
BATCH_COUNT = "messaging.batch.message_count"
ERROR_TYPE = "error.type"
# asyncworker's own.
# The SDK validates every attribute value (about 1.5 µs each, measured beside
# a bare span's 22 µs): the queue is left to the span's name and destination.
VHOST = "asyncworker.vhost"
REDELIVERED = "asyncworker.message.redelivered"
DELIVERY_COUNT = "asyncworker.message.delivery_count"
ATTEMPT = "asyncworker.message.attempt"
OUTCOME = "asyncworker.message.outcome"
REPUBLISHED_TO = "asyncworker.message.republished_to"

#: RabbitMQ's count of previous deliveries (quorum queues), and Retry's attempt number.
_DELIVERY_COUNT_HEADER = "x-delivery-count"
_ATTEMPT_HEADER = "x-asyncworker-attempt"

_OUTCOMES: dict[Settlement | None, str] = {
    Settlement.ACK: "acked",
    Settlement.REQUEUE: "requeued",
    Settlement.REJECT: "rejected",
    Settlement.LOST: "lost",
    None: "unsettled",
}

#: The parent of a message that carries no trace context: a trace of its own,
#: not whatever context the worker task happened to inherit.
_ROOT = Context()


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads propagation fields from AMQP headers (long strings may arrive as bytes)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            return [value.decode("utf-8", "replace")]
        if isinstance(value, str):
            return [value]
        return None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()

#: The exception last recorded on the current message's span (both inner
#: steps see a handler's exception; it is recorded once).  Cleared when the
#: span ends, so that it does not keep the exception alive.
_RECORDED: contextvars.ContextVar[BaseException | None] = contextvars.ContextVar(
    "asyncworker.tracing.recorded", default=None
)


class Tracing:
    """One OpenTelemetry span per message handled, and one per message published.

    ::

        from asyncworker.middlewares import Tracing

        app = App(..., middlewares=[Tracing()])   # first: it sees the others

    **Consuming.**  Each message gets a span of kind CONSUMER named
    ``process <queue>``, a child of the context its headers carry (W3C
    ``traceparent``/``tracestate``, and ``baggage``: whatever the global
    propagator reads), linked to it as well, or the root of a new trace when
    they carry none.  The handler runs with that span current
    (``trace.get_current_span()``), so that spans it opens, and messages it
    publishes, continue the trace.  An exception of the handler marks the
    span ERROR and records it as an event; the span ends once the message is
    settled, its outcome in ``asyncworker.message.outcome``.  On a bulk route,
    one span per batch, linked to each message's context.

    **Publishing.**  ``App.publish`` (and so ``Retry``'s copies and the
    dead-letter path) opens a PRODUCER span ``publish <destination>`` and
    puts its context in the message's headers, replacing any context they
    carried: a message published from a handler continues the handler's
    trace.  An App without a ``Tracing`` of its own traces its publishes with
    the global tracer provider once this module is imported.

    Args:
        tracer_provider: where the spans go; None for OpenTelemetry's global
            provider (``trace.set_tracer_provider``), looked up when a span
            starts, so it may be set after the App is made.
    """

    __slots__ = ("_tracer", "tracer_provider")

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        if tracer_provider is not None and not hasattr(tracer_provider, "get_tracer"):
            raise TypeError(
                "Tracing(tracer_provider=...) takes an OpenTelemetry TracerProvider (or None "
                f"for the global one), got {tracer_provider!r}"
            )
        #: The provider given, or None for the global one.
        self.tracer_provider = tracer_provider
        self._tracer: Tracer = trace.get_tracer(SCOPE, VERSION, tracer_provider=tracer_provider)

    def __repr__(self) -> str:
        provider = "global" if self.tracer_provider is None else repr(self.tracer_provider)
        return f"Tracing(tracer_provider={provider})"

    # -- the inner steps: around the handler, and where the user put it -------------

    async def around_handler(self, message: S, call_next: Callable[[S], Awaitable[Any]]) -> Any:
        """Record the exception of what runs inside on the message's span, then re-raise it.

        Right around the handler, it sees the handler's exception before any
        middleware (``Retry``) handles it; where the user lists ``Tracing``
        (the same code, as ``__call__``), those of the middlewares after it.
        The span opened by ``around_settlement`` is the current one.
        """
        try:
            return await call_next(message)
        except Exception as exc:
            _record_once(exc)
            raise

    __call__ = around_handler

    # -- the outer step: outside the settlement policy -------------------------------

    async def around_settlement(self, message: S, call_next: Callable[[S], Awaitable[Any]]) -> Any:
        """Run the chain inside the message's span; end it once the message is settled."""
        if isinstance(message, Batch):
            span, context = self._start_batch(message)
        elif isinstance(message, Message):
            span, context = self._start_message(message)
        else:
            return await call_next(message)
        token = otel_context.attach(context)
        try:
            return await call_next(message)
        except BaseException as exc:
            # Cancelled (the grace period ran out), KeyboardInterrupt: the
            # policy settled the message and let it through.
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__qualname__} while handled"))
            span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
            raise
        finally:
            otel_context.detach(token)
            if _RECORDED.get() is not None:
                _RECORDED.set(None)
            if isinstance(message, Batch):
                _end_batch(span, message)
            elif isinstance(message, Message):
                _end_message(span, message)
            span.end()

    def _start_message(self, message: Message) -> tuple[Span, Context]:
        properties = message.properties
        headers = properties.headers
        parent = propagate.extract(headers, getter=_GETTER) if headers else _ROOT
        queue = message.queue
        exchange = message.exchange
        routing_key = message.routing_key
        attributes: dict[str, Any] = {
            SYSTEM: "rabbitmq",
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            DESTINATION: _consumer_destination(exchange, routing_key, queue),
            VHOST: message.vhost,
            DELIVERY_TAG: message.delivery_tag,
            REDELIVERED: message.redelivered,
        }
        _add_message_attributes(attributes, routing_key, properties)
        links: list[Link] | None = None
        if headers:
            _add_int_header(attributes, DELIVERY_COUNT, headers, _DELIVERY_COUNT_HEADER)
            _add_int_header(attributes, ATTEMPT, headers, _ATTEMPT_HEADER)
            creation = trace.get_current_span(parent).get_span_context()
            if creation.is_valid:
                # The semantic conventions link a process span to the
                # message's creation context, parent or not.
                links = [Link(creation)]
        span = self._tracer.start_span(
            f"process {queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        return span, trace.set_span_in_context(span, parent)

    def _start_batch(self, batch: Batch) -> tuple[Span, Context]:
        links = []
        for message in batch:
            headers = message.properties.headers
            if headers:
                creation = trace.get_current_span(
                    propagate.extract(headers, getter=_GETTER)
                ).get_span_context()
                if creation.is_valid:
                    links.append(Link(creation))
        queue = batch.queue
        span = self._tracer.start_span(
            f"process {queue}",
            context=_ROOT,
            kind=SpanKind.CONSUMER,
            attributes={
                SYSTEM: "rabbitmq",
                OPERATION_TYPE: "process",
                OPERATION_NAME: "process",
                DESTINATION: queue,
                VHOST: batch.vhost,
                BATCH_COUNT: len(batch),
            },
            links=links,
        )
        return span, trace.set_span_in_context(span, _ROOT)

    # -- publishing -----------------------------------------------------------------

    def publish_hook(
        self, vhost: str, exchange: str, routing_key: str, properties: Properties
    ) -> AbstractContextManager[None]:
        """The App's publish hook: a PRODUCER span around a publish, its context in the headers."""
        return _publishing(self._tracer, vhost, exchange, routing_key, properties)


@contextmanager
def _publishing(
    tracer: Tracer, vhost: str, exchange: str, routing_key: str, properties: Properties
) -> Iterator[None]:
    destination = (
        f"{exchange}:{routing_key}"
        if exchange and routing_key
        else (exchange or routing_key or "amq.default")
    )
    attributes: dict[str, Any] = {
        SYSTEM: "rabbitmq",
        OPERATION_TYPE: "send",
        OPERATION_NAME: "publish",
        DESTINATION: destination,
        VHOST: vhost,
    }
    _add_message_attributes(attributes, routing_key, properties)
    span = tracer.start_span(
        f"publish {destination}", kind=SpanKind.PRODUCER, attributes=attributes
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    headers = properties.headers
    if carrier or headers:
        # A copy of another message (Retry's) carries that message's context:
        # drop it, this publish is the copy's creation context.
        fields = propagate.get_global_textmap().fields
        kept = {key: value for key, value in (headers or {}).items() if key not in fields}
        properties.headers = {**kept, **carrier}
    try:
        yield
    except Exception as exc:
        _record_failure(span, exc)
        raise
    finally:
        span.end()


def _record_once(exc: Exception) -> None:
    if _RECORDED.get() is exc:
        return
    _RECORDED.set(exc)
    _record_failure(trace.get_current_span(), exc)


def _record_failure(span: Span, exc: Exception) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__qualname__}: {exc}"))
    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)


def _end_message(span: Span, message: Message) -> None:
    outcome = _outcome(message)
    span.set_attribute(OUTCOME, outcome)
    republished = message.republished_to
    if republished is not None:
        span.set_attribute(REPUBLISHED_TO, republished)


def _end_batch(span: Span, batch: Batch) -> None:
    counts: dict[str, int] = {}
    for message in batch:
        outcome = _outcome(message)
        counts[outcome] = counts.get(outcome, 0) + 1
    if len(counts) == 1:
        span.set_attribute(OUTCOME, next(iter(counts)))
        return
    span.set_attribute(OUTCOME, "mixed")
    for outcome, count in counts.items():
        span.set_attribute(f"{OUTCOME}.{outcome}", count)


def _outcome(message: Message) -> str:
    settlement = message.settlement
    if settlement is Settlement.ACK and message.republished_to is not None:
        return "dead-lettered" if message.dead_lettered else "retried"
    return _OUTCOMES[settlement]


def _consumer_destination(exchange: str, routing_key: str, queue: str) -> str:
    # The RabbitMQ conventions: {exchange}:{routing key}:{queue}, leaving out
    # what is empty, and the routing key when it is the queue's name.
    if routing_key == queue:
        return f"{exchange}:{queue}" if exchange else queue
    return ":".join(part for part in (exchange, routing_key, queue) if part)


def _add_message_attributes(
    attributes: dict[str, Any], routing_key: str, properties: Properties
) -> None:
    # The conventions' "when not empty" attributes, on both sides of the broker.
    if routing_key:
        attributes[ROUTING_KEY] = routing_key
    if properties.message_id:
        attributes[MESSAGE_ID] = properties.message_id
    if properties.correlation_id:
        attributes[CONVERSATION_ID] = properties.correlation_id


def _add_int_header(
    attributes: dict[str, Any], name: str, headers: Mapping[str, Any], header: str
) -> None:
    value = headers.get(header)
    if isinstance(value, int) and not isinstance(value, bool):
        attributes[name] = value


def _process_hook(
    vhost: str, exchange: str, routing_key: str, properties: Properties
) -> AbstractContextManager[None]:
    return _publishing(_PROCESS_TRACER, vhost, exchange, routing_key, properties)


# Importing this module instruments the publishes of every App that has no
# Tracing of its own, with the global provider (a ProxyTracer follows a
# provider set later).
_PROCESS_TRACER = trace.get_tracer(SCOPE, VERSION)
_instrumentation.set_publish_hook(_process_hook)
