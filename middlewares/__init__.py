"""The standard middlewares of asyncworker.

A middleware is any async callable ``(message, call_next)``.  The ones here:

* ``AckRequeue``: the settlement policy, outermost step of every chain (ack on
  success, log and requeue on exception; ``Action`` chooses otherwise).
* ``Logging``: one structured log line per message (queue, delivery tag,
  outcome, duration), bodies only on request.
* ``Timing``: reports how long each message took to a ``Timeit`` callback.
* ``Timeout``: cancels a handler that runs too long and raises ``HandlerTimeout``.
* ``Retry``: retries a failing message a bounded number of times (optionally
  after a delay), then dead-letters it.
* ``Tracing``: OpenTelemetry spans for every message handled and published
  (needs the ``otel`` extra: it is imported on first use, so that this
  package imports without it).

See docs/middlewares.md for their order and how to write one.
"""

from typing import TYPE_CHECKING, Any

from .ack_requeue import AckRequeue as AckRequeue
from .ack_requeue import Action as Action
from .log import Logging as Logging
from .retry import Retry as Retry
from .timeout import Timeout as Timeout
from .timing import Timing as Timing

if TYPE_CHECKING:
    from .tracing import Tracing as Tracing

__all__ = ["AckRequeue", "Action", "Logging", "Retry", "Timeout", "Timing", "Tracing"]


def __getattr__(name: str) -> Any:
    # Tracing needs OpenTelemetry (the 'otel' extra): loaded when first asked
    # for, so that the other middlewares never need it.  Without the extra,
    # `from asyncworker.middlewares import Tracing` raises an ImportError that
    # says what to install.
    if name == "Tracing":
        from .tracing import Tracing

        return Tracing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
