"""asyncworker: a trio-native, Flask-like microframework for RabbitMQ workers.

::

    from asyncworker import App, Message

    app = App(host="127.0.0.1", user="guest", password="guest", prefetch_count=256)

    @app.route(["asgard/counts", "asgard/counts/errors"], vhost="fluentd")
    async def drain_handler(message: Message) -> None:
        print(message.queue, message.body)

    app.run()
"""

# General layout
# ==============
#
# The public API is re-exported here from private modules, each on one topic.
# Every module sits in a layer and imports only from the layers below it (every
# import counts: module level, TYPE_CHECKING, inside a function); lint-imports
# checks it against [tool.importlinter] in pyproject.toml.  Top to bottom:
#
#   L7  __init__ (this file), __main__           the public face
#   L6  testing, _cli > _demo                    test client, command line: they
#                                                reconfigure an App through ONE
#                                                seam, App.reconfigured()
#   L5  _app > _run, _registry > _config         the App facade; App.run() in a
#                                                process; route()/declare(); its
#                                                frozen config
#   L4  _supervisor > _consumer > _dispatch      per-vhost connection supervision;
#       _publisher, _lifecycle, _watchdog,       subscription; the hand-off (worker
#       _http > _metrics; _declare               pool | batch collector); publishing;
#                                                hooks; what reads statistics();
#                                                declaring the topology
#   L3  middlewares > utils                      the plugins: they declare what they
#                                                support, the core never imports them
#   L2  _settlement > _chain > _message          the settlement policy, the chain,
#       _instrumentation                         Message/Batch (Settleable); the
#                                                publish hook tracing plugs in
#   L1  _transports                              the seam, connect(), the AMQP client,
#                                                the memory broker
#   L0  _logging > _settings; _exceptions,       leaves (_topology: the Exchange,
#       _util, _statistics, _topology            Queue and Binding records)
#
# One arrow points up: App.test_client() imports testing lazily, as Flask's
# app.test_client() does.  Lower layers get narrow values (a stop event, a
# callback, a statistics callable), never the App.  docs/architecture.md says
# what each module owns and where a new feature goes.

from . import _util
from ._app import App as App
from ._chain import BulkCallNext as BulkCallNext
from ._chain import BulkHandler as BulkHandler
from ._chain import BulkMiddleware as BulkMiddleware
from ._chain import CallNext as CallNext
from ._chain import Handler as Handler
from ._chain import Middleware as Middleware
from ._config import Route as Route
from ._exceptions import AsyncWorkerError as AsyncWorkerError
from ._exceptions import AuthenticationError as AuthenticationError
from ._exceptions import ChannelClosed as ChannelClosed
from ._exceptions import ConnectError as ConnectError
from ._exceptions import ConnectionClosed as ConnectionClosed
from ._exceptions import ExchangeNotFound as ExchangeNotFound
from ._exceptions import HandlerTimeout as HandlerTimeout
from ._exceptions import MessageDecodeError as MessageDecodeError
from ._exceptions import PublishError as PublishError
from ._exceptions import PublishNacked as PublishNacked
from ._exceptions import PublishTimeout as PublishTimeout
from ._exceptions import QueueNotFound as QueueNotFound
from ._exceptions import StartupError as StartupError
from ._exceptions import TopologyError as TopologyError
from ._exceptions import Unroutable as Unroutable
from ._logging import JsonFormatter as JsonFormatter
from ._logging import configure_logging as configure_logging
from ._message import Batch as Batch
from ._message import Message as Message
from ._message import Settleable as Settleable
from ._message import Settlement as Settlement
from ._statistics import AppStatistics as AppStatistics
from ._statistics import ConsumerStatistics as ConsumerStatistics
from ._supervisor import Backoff as Backoff
from ._supervisor import ConnectionEvent as ConnectionEvent
from ._topology import Binding as Binding
from ._topology import Exchange as Exchange
from ._topology import Queue as Queue
from ._transports import Properties as Properties

#: The installed version (from the distribution's metadata).
__version__ = _util.VERSION

__all__ = [
    "App",
    "AppStatistics",
    "AsyncWorkerError",
    "AuthenticationError",
    "Backoff",
    "Batch",
    "Binding",
    "BulkCallNext",
    "BulkHandler",
    "BulkMiddleware",
    "CallNext",
    "ChannelClosed",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionEvent",
    "ConsumerStatistics",
    "Exchange",
    "ExchangeNotFound",
    "Handler",
    "HandlerTimeout",
    "JsonFormatter",
    "Message",
    "MessageDecodeError",
    "Middleware",
    "Properties",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "Queue",
    "QueueNotFound",
    "Route",
    "Settleable",
    "Settlement",
    "StartupError",
    "TopologyError",
    "Unroutable",
    "configure_logging",
]
