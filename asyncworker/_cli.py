"""The ``asyncworker`` command (also ``python -m asyncworker``).

::

    asyncworker run module:app [--url URL] [--workers N] [--log-level LEVEL] [--http HOST:PORT]
    asyncworker publish QUEUE [BODY | --file F] [--url URL] [--count N] [--header K=V ...]
    asyncworker declare module:app [--url URL]
    asyncworker demo [--messages N] [--verbose]
    asyncworker --version

Errors the user can fix (a module that cannot be imported, a missing
attribute, a bad option) are one line on stderr starting with
``asyncworker:`` and exit status 2; no traceback.  URLs are only ever shown
with their password masked.  See docs/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING, Any

import trio

from . import _settings
from ._util import VERSION

if TYPE_CHECKING:
    from ._app import App

__all__ = ["main"]

#: The URL ``publish`` uses when neither ``--url`` nor ``ASYNCWORKER_URL`` is given.
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: How many publishes ``asyncworker publish`` keeps waiting for a confirm at once.
_PUBLISH_WINDOW = 256


class UsageError(Exception):
    """Something the user must fix on the command line or in their module (exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncworker`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status (the console script exits with it).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.func(args)
    except UsageError as exc:
        print(f"asyncworker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncworker",
        description="Run, feed and try out asyncworker Apps (RabbitMQ workers).",
    )
    parser.add_argument("--version", action="version", version=f"asyncworker {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run an App until SIGINT/SIGTERM, then drain gracefully",
        description=(
            "Import MODULE (relative to the current directory) and run its App until SIGINT "
            "or SIGTERM, then drain gracefully.  --url, else the environment variable "
            "ASYNCWORKER_URL, replaces the App's broker URL (routes keep their vhosts)."
        ),
    )
    run.add_argument("target", metavar="MODULE:APP", help="e.g. myworker:app (APP defaults to app)")
    run.add_argument("--url", help="broker URL; overrides the App's and ASYNCWORKER_URL")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes, each with its own connection (default 1)",
    )
    run.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default ASYNCWORKER_LOG_LEVEL, else INFO)",
    )
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help=(
            "serve /health and /metrics there (needs the 'http' extra); overrides the App's "
            "http= and ASYNCWORKER_HTTP; with --workers N, worker i listens on PORT+i-1"
        ),
    )
    run.set_defaults(func=_cmd_run)

    publish = commands.add_parser(
        "publish",
        help="publish messages (with publisher confirms)",
        description=(
            "Publish BODY (or the content of --file, or standard input) COUNT times to QUEUE "
            "through the default exchange (or to --exchange with QUEUE as the routing key), "
            "persistent and with publisher confirms; print how many the broker confirmed.  "
            "The URL is --url, else ASYNCWORKER_URL, else " + DEFAULT_URL.replace("guest@", "***@")
        ),
    )
    publish.add_argument("queue", metavar="QUEUE", help="queue name (routing key with --exchange)")
    publish.add_argument("body", metavar="BODY", nargs="?", help="message body (UTF-8 text)")
    publish.add_argument("--file", metavar="F", help="read the body from this file")
    publish.add_argument("--url", help="broker URL (default ASYNCWORKER_URL, else local guest)")
    publish.add_argument(
        "--count", type=_positive_int, default=1, metavar="N", help="messages to send (default 1)"
    )
    publish.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="K=V",
        help="a message header (repeatable); the value is a string",
    )
    publish.add_argument("--exchange", default="", metavar="E", help="exchange (default: '')")
    publish.add_argument("--vhost", metavar="V", help="vhost (default: the URL's)")
    publish.set_defaults(func=_cmd_publish)

    declare = commands.add_parser(
        "declare",
        help="declare an App's exchanges, queues and bindings, then exit",
        description=(
            "Import MODULE and declare its App's whole topology (the routes' Queue objects and "
            "what app.declare() registered: exchanges, then queues, then bindings), then exit: "
            "deployment pipelines run it before rolling out workers.  Exit status 1, with one "
            "line, if the broker refuses a declaration (a queue that exists with other "
            "arguments: 406) or cannot be reached.  --url, else ASYNCWORKER_URL, replaces the "
            "App's broker URL."
        ),
    )
    declare.add_argument(
        "target", metavar="MODULE:APP", help="e.g. myworker:app (APP defaults to app)"
    )
    declare.add_argument("--url", help="broker URL; overrides the App's and ASYNCWORKER_URL")
    declare.set_defaults(func=_cmd_declare)

    demo = commands.add_parser(
        "demo",
        help="run an example App on the embedded broker (no RabbitMQ needed)",
        description=(
            "Run an example App with two queues, Logging and Timing middlewares and Retry on "
            "a private in-memory broker; publish sample messages, some of which fail, and "
            "print what happened to them."
        ),
    )
    demo.add_argument(
        "--messages", type=_positive_int, default=200, metavar="N", help="messages (default 200)"
    )
    demo.add_argument("--verbose", action="store_true", help="show the App's log lines")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


# -- run --------------------------------------------------------------------------


def load_app(target: str) -> App:
    """Import ``module:attribute`` (relative to the current directory) and return the App.

    Raises ``UsageError`` with one line saying what is wrong.
    """
    from ._app import App

    module_name, _, attribute = target.partition(":")
    attribute = attribute or "app"
    if not module_name or not all(part.isidentifier() for part in attribute.split(".")):
        raise UsageError(f"expected MODULE:APP such as myworker:app, got {target!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    from ._run import importing_for_cli

    try:
        # A module-level app.run() is skipped meanwhile (with a warning): the
        # command runs the App itself, once.
        with importing_for_cli(module_name):
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from None
    except SyntaxError as exc:
        raise UsageError(
            f"cannot import module {module_name!r}: {exc.msg} ({exc.filename}, line {exc.lineno})"
        ) from None
    except Exception as exc:
        where = _user_frame(exc)
        raise UsageError(
            f"importing module {module_name!r} raised {type(exc).__name__}: {exc} "
            f"({where.filename}, line {where.lineno})"
        ) from None
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(obj, App):
        raise UsageError(
            f"{module_name}:{attribute} is not an asyncworker App (it is of type "
            f"{type(obj).__name__!r}); point to the App object, e.g. {module_name}:app"
        )
    return obj


def _user_frame(exc: BaseException) -> traceback.FrameSummary:
    """The innermost frame of ``exc``'s traceback in the user's code, not asyncworker's.

    ``App(prefech_count=1)`` or a sync handler fail inside asyncworker; the line
    to fix is the user's line that called it.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        filename = os.path.abspath(frame.filename)
        if not filename.startswith(package + os.sep) and "<frozen " not in frame.filename:
            return frame
    return frames[-1]


def reconfigure(app: App, url: str | None, http: str | None) -> contextlib.ExitStack:
    """``app.reconfigured(url=..., http=...)``, entered; close the stack to restore the App.

    An invalid URL or address is a ``UsageError`` (the URL's password masked).
    """
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(app.reconfigured(url=url, http=http))
    except ValueError as exc:
        raise UsageError(str(exc).replace("http=", "--http ")) from None
    return stack


def check_http(address: str) -> tuple[str, int]:
    """Validate ``--http HOST:PORT``; raise ``UsageError`` saying what is wrong."""
    from ._config import require_http_extra

    try:
        host, port = _settings.parse_http_address(address, "--http ")
        require_http_extra()
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc).replace("App(http=...)", "--http")) from None
    return host, port


def worker_http(address: str, worker: int = 1) -> str:
    """Where worker number ``worker`` serves health and metrics (port + worker - 1 unless 0)."""
    host, port = check_http(address)
    if port and worker > 1:
        port += worker - 1
        if port > 65535:
            raise UsageError(f"--http {address}: worker {worker} would need port {port}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve_url(flag: str | None) -> str | None:
    # The command-line flag wins over the environment.
    return flag if flag else _settings.url()


def _set_log_level(level: str | None) -> None:
    if level is None:
        return
    os.environ[_settings.ENV_LOG_LEVEL] = level
    try:
        _settings.log_level()
    except ValueError:
        raise UsageError(
            f"--log-level {level!r} is not valid: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        ) from None


def _check_log_settings() -> None:
    # App.run() reads these; a bad value is one line here, not a traceback there.
    try:
        _settings.log_level()
        _settings.log_format()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _cmd_run(args: argparse.Namespace) -> int:
    _set_log_level(args.log_level)
    _check_log_settings()
    url = _resolve_url(args.url)
    # Import in this process first, so a bad module is one clear line, once.
    app = load_app(args.target)
    if args.http is not None:
        check_http(args.http)
    if args.workers == 1:
        http = worker_http(args.http) if args.http is not None else None
        with reconfigure(app, url, http):
            return run_app(app)
    # The URL is checked here too, so that a bad one is one line, once.
    with reconfigure(app, url, None):
        display_url = app.url
    return _run_workers(args.target, url, args.workers, display_url, args.http)


def _worker_main(target: str, url: str | None, cwd: str, http: str | None, number: int) -> None:
    """Entry point of one worker process (spawned: it imports the module itself)."""
    # A process group of its own: Ctrl-C in a terminal then reaches the parent
    # only, which forwards it once (a second SIGINT would skip the grace period).
    os.setpgrp()
    os.chdir(cwd)
    try:
        app = load_app(target)
        address = worker_http(http, number) if http is not None else None
        stack = reconfigure(app, url, address)
    except UsageError as exc:
        print(f"asyncworker: {exc}", file=sys.stderr)
        sys.exit(2)
    with stack:
        sys.exit(run_app(app))


#: The exit status of a run whose drain had to cancel handlers (docs/cli.md).
EXIT_CANCELLED = 3


def run_app(app: App) -> int:
    """``app.run()``; the exit status: 0, or 3 if the shutdown cancelled handlers."""
    before = app.statistics().handlers_cancelled
    app.run()
    return EXIT_CANCELLED if app.statistics().handlers_cancelled > before else 0


def _run_workers(
    target: str, url: str | None, count: int, display_url: str, http: str | None = None
) -> int:
    """Run ``count`` worker processes; forward SIGINT/SIGTERM; report crashes."""
    context = multiprocessing.get_context("spawn")
    cwd = os.getcwd()
    processes: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for process in processes.values():
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(
            f"asyncworker: running {target} on {display_url} with {count} worker processes",
            file=sys.stderr,
            flush=True,
        )
        for number in range(1, count + 1):
            process = context.Process(
                target=_worker_main,
                args=(target, url, cwd, http, number),
                name=f"asyncworker-worker-{number}",
            )
            process.start()
            processes[number] = process
        alive: dict[Any, int] = {p.sentinel: number for number, p in processes.items()}
        failed = 0
        while alive:
            for sentinel in multiprocessing.connection.wait(list(alive)):
                number = alive.pop(sentinel)
                done = processes[number]
                done.join()
                code = done.exitcode
                if code == 0:
                    continue
                failed += 1
                if code is not None and code < 0:
                    how = f"was killed by signal {signal.Signals(-code).name}"
                else:
                    how = f"exited with status {code}"
                rest = "; the other workers keep running" if alive and not stopping else ""
                print(
                    f"asyncworker: worker {number} (pid {done.pid}) {how}{rest}",
                    file=sys.stderr,
                    flush=True,
                )
        return 0 if failed == 0 else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- declare ------------------------------------------------------------------------


def _cmd_declare(args: argparse.Namespace) -> int:
    from ._exceptions import AsyncWorkerError

    url = _resolve_url(args.url)
    app = load_app(args.target)
    with reconfigure(app, url, None):
        if app.url.startswith("memory://"):
            raise UsageError(
                f"cannot declare on {app.url!r}: a memory:// broker lives inside one process; "
                "give the URL of a RabbitMQ broker (--url amqp://user:pass@host:port/vhost)"
            )
        try:
            declared = trio.run(app.declare_topology)
        except AsyncWorkerError as exc:
            print(f"asyncworker: {exc}", file=sys.stderr)
            return 1
        display = app.url
    if not declared:
        print(
            f"asyncworker: {args.target} declares no exchange or queue (give its routes Queue "
            "objects, or use app.declare(...)); nothing to do",
            file=sys.stderr,
        )
        return 0
    for what in declared:
        print(f"declared {what}")
    print(f"{len(declared)} declaration(s) on {display}")
    return 0


# -- publish ------------------------------------------------------------------------


def _cmd_publish(args: argparse.Namespace) -> int:
    from ._transports import ConnectionParams, redact_url

    url = _resolve_url(args.url) or DEFAULT_URL
    try:
        params = ConnectionParams.from_url(url)
    except ValueError as exc:
        raise UsageError(f"invalid broker URL {redact_url(url)!r}: {exc}") from None
    if params.scheme == "memory":
        raise UsageError(
            f"cannot publish to {redact_url(url)!r}: a memory:// broker lives inside one process; "
            "give the URL of a RabbitMQ broker (amqp://user:pass@host:port/vhost)"
        )
    if args.vhost:
        params = replace(params, vhost=args.vhost)
    if args.body is not None and args.file is not None:
        raise UsageError("give the body either as BODY or with --file, not both")
    if args.body is not None:
        body = args.body.encode()
    elif args.file is not None:
        try:
            with open(args.file, "rb") as f:
                body = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file!r}: {exc.strerror}") from None
    else:
        if sys.stdin.isatty():
            print(
                "asyncworker: reading the body from standard input (end with Ctrl-D)",
                file=sys.stderr,
            )
        body = sys.stdin.buffer.read()
    headers: dict[str, Any] = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--header takes KEY=VALUE, got {item!r}")
        headers[key] = value
    where = f"exchange {args.exchange!r} with routing key" if args.exchange else "queue"
    from ._exceptions import AsyncWorkerError

    try:
        confirmed, refused = trio.run(
            _publish, params, args.exchange, args.queue, body, args.count, headers
        )
    except (AsyncWorkerError, BaseExceptionGroup) as exc:
        # A publish that closes the channel (no such exchange) fails every
        # publish in flight: report the error once, not as a group traceback.
        error = _first_error(exc)
        if error is None:
            raise
        print(f"asyncworker: cannot publish to {where} {args.queue!r}: {error}", file=sys.stderr)
        return 1
    print(
        f"published {args.count} message(s) to {where} {args.queue!r} on {params.url()} "
        f"(vhost {params.vhost!r}): {confirmed} confirmed"
    )
    for reason, n in sorted(refused.items()):
        print(f"asyncworker: {n} message(s) not accepted: {reason}", file=sys.stderr)
    return 0 if confirmed == args.count else 1


def _first_error(exc: BaseException) -> BaseException | None:
    """``exc`` if it is an asyncworker error, else the first one in its group, else None."""
    from ._exceptions import AsyncWorkerError

    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(AsyncWorkerError)
        if matched is None or rest is not None:
            return None
        return _first_error(matched.exceptions[0])
    return exc if isinstance(exc, AsyncWorkerError) else None


async def _publish(
    params: Any,
    exchange: str,
    routing_key: str,
    body: bytes,
    count: int,
    headers: dict[str, Any],
) -> tuple[int, dict[str, int]]:
    """Publish ``count`` copies with confirms; return (confirmed, {reason: count})."""
    from ._exceptions import PublishError, Unroutable
    from ._transports import Properties, connect

    confirmed = 0
    refused: dict[str, int] = {}
    async with connect(params) as connection:
        channel = await connection.channel()
        await channel.confirm_select()
        window = trio.Semaphore(_PUBLISH_WINDOW)

        async def one() -> None:
            nonlocal confirmed
            try:
                try:
                    await channel.publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=Properties(delivery_mode=2, headers=dict(headers) or None),
                        mandatory=True,
                    )
                except Unroutable:
                    reason = (
                        f"unroutable: no queue named {routing_key!r} (declare it first)"
                        if not exchange
                        else f"unroutable: no queue bound to {exchange!r} with this key"
                    )
                    refused[reason] = refused.get(reason, 0) + 1
                except PublishError as exc:
                    refused[str(exc)] = refused.get(str(exc), 0) + 1
                else:
                    confirmed += 1
            finally:
                window.release()

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                await window.acquire()  # at most _PUBLISH_WINDOW unconfirmed at once
                nursery.start_soon(one)
    return confirmed, refused


# -- demo ---------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if not args.verbose:
        # The summary tells the story; the App's own lines would drown it.
        logging.getLogger("asyncworker").setLevel(logging.CRITICAL + 1)
    else:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    return run_demo(args.messages, out=sys.stdout)
