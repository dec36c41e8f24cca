"""Where an optional instrumentation (tracing) plugs into the core without the core importing it.

The core never imports a plugin (the import-linter contract), yet tracing has
to see every publish, ``Retry``'s copies and the dead-letter path included.
This module is the meeting point, below both: it names the shape of a
*publish hook* and holds the process-wide one.

A publish hook is called by the ``Publisher`` just before a message is sent,
with the message's vhost, exchange, routing key and ``Properties`` (a copy of
the caller's that the hook may change: the tracing hook puts the
``traceparent`` header in it); it returns a context manager that the publish
runs inside, up to the broker's confirm or the error, so that the hook can
time it and see how it ended.

Which hook a publish uses:

* the hook of the App's own ``Tracing`` middleware, which the App finds among
  its middlewares by the capability the middleware declares (a
  ``publish_hook`` attribute), so that its publishes go to that middleware's
  tracer provider;
* otherwise the process-wide hook, ``process_hook`` here, which importing
  ``asyncworker.middlewares.tracing`` installs (with OpenTelemetry's global
  tracer provider), as OpenTelemetry's instrumentations do;
* otherwise none: the publish path then costs one attribute check, and
  allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from ._transports import Properties

__all__ = ["PublishHook", "process_hook", "set_publish_hook"]

#: ``hook(vhost, exchange, routing_key, properties)``: a context manager the
#: publish runs in; the hook may set ``properties.headers`` (to a new dict).
PublishHook: TypeAlias = Callable[[str, str, str, "Properties"], AbstractContextManager[object]]

#: The process-wide publish hook, used by an App that has none of its own (read
#: it as ``_instrumentation.process_hook``: it may be installed after the App
#: was made; set it with ``set_publish_hook``).
process_hook: PublishHook | None = None


def set_publish_hook(hook: PublishHook | None) -> PublishHook | None:
    """Install ``hook`` as the process-wide publish hook (None removes it); returns the old one."""
    global process_hook
    previous = process_hook
    process_hook = hook
    return previous
