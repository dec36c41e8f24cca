"""asyncworker: a trio-native, Flask-like microframework for RabbitMQ workers.

::

    from asyncworker import App, Message

    app = App(host="127.0.0.1", user="guest", password="guest", prefetch_count=256)

    @app.route(["asgard/counts", "asgard/counts/errors"], vhost="fluentd")
    async def drain_handler(message: Message) -> None:
        print(message.queue, message.body)

    app.run()
"""

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
from ._exceptions import HandlerTimeout as HandlerTimeout
from ._exceptions import MessageDecodeError as MessageDecodeError
from ._exceptions import PublishError as PublishError
from ._exceptions import PublishNacked as PublishNacked
from ._exceptions import PublishTimeout as PublishTimeout
from ._exceptions import QueueNotFound as QueueNotFound
from ._exceptions import StartupError as StartupError
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
    "BulkCallNext",
    "BulkHandler",
    "BulkMiddleware",
    "CallNext",
    "ChannelClosed",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionEvent",
    "ConsumerStatistics",
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
    "QueueNotFound",
    "Route",
    "Settleable",
    "Settlement",
    "StartupError",
    "Unroutable",
    "configure_logging",
]
