#!/usr/bin/env python3
"""Benchmark harness: asyncworker against its peers on a real RabbitMQ.

    python bench/run.py [--mode throughput] [--messages 20000] [--rounds 5]
                        [--systems a,b,c] [--baseline REF] [--quick] [--setup]

Stdlib only: it creates one throwaway virtualenv per peer under ``bench/.venvs/``
(and one per ``--baseline`` git ref of this repository, holding asyncworker as it
was at that ref), prepares queues through ``amqp_tool.py`` (pamqp, publisher
confirms) and runs each system's runner in ``systems/`` as a subprocess that prints
one JSON line.  Rounds are interleaved (round 1: every system, round 2: every
system, ...), so slow drifts of a noisy machine hit every system alike.

How the pieces fit: a :class:`System` names a package and its runner per *task*
(``consume``, ``publish``, ``pipeline``); a :class:`Mode` turns the selected
systems into :class:`Job` rows (grouped into tables) and names its columns;
:func:`run_job` prepares the broker for the job's task, runs the runner and checks
what the broker holds afterwards.  Adding a mode is one function building jobs and
one entry in ``MODES``.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
PROJECT_VENV = REPO / ".venv"
HARNESS_PIP = ("pamqp==3.3.0",)


# -- systems ---------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    """A package under test: its venv and its runner script per task."""

    name: str
    runners: Mapping[str, str]  # task ("consume", "publish", "pipeline") -> systems/<script>
    pip: tuple[str, ...] = ()  # empty: the project venv (or a baseline ref's)
    venv: Path | None = None  # None: bench/.venvs/<name>, or the project venv without pip
    body_format: str = "raw"
    dramatiq_queue: bool = False
    confirms: bool = True  # its publishes wait for the broker's confirmation
    one_at_a_time: bool = False  # one publish in flight whatever --inflight says
    asyncworker: bool = False  # this project's package: the working tree or a baseline ref
    ref: str = ""  # baseline: the full commit id

    @property
    def python(self) -> Path:
        if self.venv is not None:
            venv = self.venv
        else:
            venv = PROJECT_VENV if not self.pip else VENVS / self.name
        return venv / "bin" / "python"


ASYNCWORKER_RUNNERS = {
    "consume": "run_asyncworker.py",
    "publish": "publish_asyncworker.py",
    "pipeline": "pipeline_asyncworker.py",
}
SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("asyncworker", ASYNCWORKER_RUNNERS, asyncworker=True),
        System(
            "async-worker",
            {
                "consume": "run_async_worker.py",
                "publish": "publish_async_worker.py",
                "pipeline": "pipeline_async_worker.py",
            },
            # async-worker pins aioamqp==0.15.0; pamqp is pinned to the version tested.
            ("async-worker==0.20.2", "aioamqp==0.15.0", "pamqp==4.0.1"),
            confirms=False,
        ),
        System(
            "aio-pika",
            {
                "consume": "run_aio_pika.py",
                "publish": "publish_aio_pika.py",
                "pipeline": "pipeline_aio_pika.py",
            },
            ("aio-pika==10.2.1",),
        ),
        System(
            "faststream",
            {
                "consume": "run_faststream.py",
                "publish": "publish_faststream.py",
                "pipeline": "pipeline_faststream.py",
            },
            ("faststream[rabbit]==0.7.8",),
        ),
        System(
            "dramatiq",
            {"consume": "run_dramatiq.py"},
            ("dramatiq[rabbitmq]==2.2.1",),
            body_format="dramatiq",
            dramatiq_queue=True,
        ),
        System(
            "async-amqp", {"consume": "run_async_amqp.py"}, ("async-amqp==0.5.5", "trio==0.35.0")
        ),
        System("pika", {"publish": "publish_pika.py"}, ("pika==1.4.4",), one_at_a_time=True),
        System(
            "pamqp-raw",
            {"consume": "run_pamqp_raw.py", "publish": "publish_pamqp_raw.py"},
            ("pamqp==3.3.0", "trio==0.35.0"),
        ),
    )
}


# -- environments --------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class SetupNeeded(RuntimeError):
    """A venv is missing and this run may not install it (inside a network namespace)."""


def _pip_install(python: Path, *requirements: str) -> None:
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *requirements,
        ],
        check=True,
    )


def ensure_venv(path: Path, requirements: tuple[str, ...], install: bool = True) -> Path:
    """Create ``path`` and pip-install ``requirements`` unless a stamp says it's done."""
    python = path / "bin" / "python"
    stamp = path / ".bench-requirements"
    wanted = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not install:
        raise SetupNeeded(f"{path.relative_to(REPO)} is not set up")
    log(f"[setup] creating {path.relative_to(REPO)} with {' '.join(requirements)}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    _pip_install(python, *requirements)
    stamp.write_text(wanted)
    return python


def ensure_project_venv(install: bool = True) -> bool:
    """The project venv with asyncworker importable (pip install -e the repo if needed)."""
    python = PROJECT_VENV / "bin" / "python"
    if not python.exists():
        if not install:
            return False
        log("[setup] creating .venv for the project")
        subprocess.run([sys.executable, "-m", "venv", str(PROJECT_VENV)], check=True)
    if _imports(python, "asyncworker"):
        return _imports(python, "from asyncworker import App, Message")
    if not install:
        return False
    log("[setup] pip install -e the project into .venv")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", str(REPO)], check=False)
    return _imports(python, "from asyncworker import App, Message")


def resolve_ref(ref: str) -> str:
    """The full commit id of ``ref`` in this repository (ValueError if there is none)."""
    r = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or not r.stdout.strip():
        raise ValueError(f"--baseline {ref!r} is not a commit of {REPO}")
    return r.stdout.strip()


def baseline_system(ref: str) -> System:
    """asyncworker as it was at ``ref``: runs the working tree's runners in its own venv."""
    sha = resolve_ref(ref)
    name = f"asyncworker@{sha[:8]}"
    return replace(SYSTEMS["asyncworker"], name=name, venv=VENVS / name, ref=sha)


def ensure_ref_venv(system: System, install: bool = True) -> Path:
    """``bench/.venvs/asyncworker@<sha>``: that commit's tree, pip install -e'd.

    The tree comes from ``git archive`` (nothing in the repository changes); the
    stamp is the commit id, so a ref that moved gets a new venv name anyway.
    """
    assert system.venv is not None and system.ref
    python = system.python
    stamp = system.venv / ".bench-ref"
    if python.exists() and stamp.exists() and stamp.read_text() == system.ref:
        return python
    if not install:
        raise SetupNeeded(f"{system.venv.relative_to(REPO)} is not set up")
    log(f"[setup] creating {system.venv.relative_to(REPO)} from commit {system.ref}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(system.venv)], check=True)
    src = system.venv / "src"
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", system.ref],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="tar")
    _pip_install(python, "-e", str(src))
    if not _imports(python, "from asyncworker import App, Message"):
        raise RuntimeError(f"asyncworker at {system.ref[:8]} does not import")
    stamp.write_text(system.ref)
    return python


def _imports(python: Path, statement: str) -> bool:
    if not statement.startswith(("import ", "from ")):
        statement = "import " + statement
    r = subprocess.run([str(python), "-c", statement], capture_output=True, cwd="/")
    return r.returncode == 0


# -- broker helpers --------------------------------------------------------------------


@dataclass
class Broker:
    harness: Path
    conn: list[str]

    def tool(self, *argv: str, timeout: float = 600) -> dict[str, Any]:
        r = subprocess.run(
            [str(self.harness), str(BENCH / "amqp_tool.py"), *argv, *self.conn],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise RuntimeError(f"amqp_tool {argv[0]} failed: {r.stderr.strip()[-2000:]}")
        lines = r.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    def tool_popen(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.harness), str(BENCH / "amqp_tool.py"), *argv, *self.conn],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def fill(self, queue: str, messages: int, arguments: dict[str, Any] | None = None) -> None:
        """Declare ``queue`` (durable, with ``arguments``), purge it, publish ``messages``."""
        args = ["--args", json.dumps(arguments)] if arguments else []
        filled = self.tool("fill", "--queue", queue, "--messages", str(messages), *args)
        if filled.get("ready") != messages:
            raise RuntimeError(f"pre-fill left {filled} in {queue}")

    def count(self, *queues: str, expect: int | None = None, seconds: float = 10) -> list[int]:
        argv = ["count", *(a for q in queues for a in ("--queue", q)), "--seconds", str(seconds)]
        if expect is not None:
            argv += ["--expect", str(expect)]
        ready = self.tool(*argv, timeout=seconds + 60)
        return [int(ready[q]) for q in queues]


def queue_setup(system: System, queue: str) -> tuple[list[str], list[str]]:
    """(extra amqp_tool args for declaring/filling, all queues to delete afterwards)."""
    if system.dramatiq_queue:
        args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
        return (
            ["--format", "dramatiq", "--args", json.dumps(args)],
            [queue, f"{queue}.DQ", f"{queue}.XQ"],
        )
    return ["--format", system.body_format], [queue]


# -- jobs ------------------------------------------------------------------------------


@dataclass
class Job:
    """One row of a table: a system, a task and how it is run."""

    system: System
    task: str  # the runner: "consume", "publish" or "pipeline"
    messages: int
    suffix: str = ""  # the row's label is system.name + suffix
    group: str = ""  # rows of one group are one table
    delay: float = 0.0
    variant: str = "default"
    paced_rate: float = 0.0  # > 0: publish while consuming instead of pre-filling
    paced_seconds: float = 0.0
    inflight: int = 1  # publish: publishes awaited at once
    check: int = 0  # pipeline: > 0 runs the delivery check with a B that holds this many
    not_run: str = ""  # a row shown with this note, never run (pika at 64 in flight)

    @property
    def label(self) -> str:
        return self.system.name + self.suffix

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", f"{self.label}-{self.group}").strip("-")


class Unsupported(Exception):
    """The runner cannot run this job with the package it has (an older asyncworker)."""


def _runner_cmd(job: Job, queue: str, conn_args: list[str], *extra: str) -> list[str]:
    return [
        str(job.system.python),
        str(BENCH / "systems" / job.system.runners[job.task]),
        "--queue",
        queue,
        "--messages",
        str(job.messages),
        "--delay",
        str(job.delay),
        "--variant",
        job.variant,
        "--inflight",
        str(job.inflight),
        *extra,
        *conn_args,
    ]


def _run_runner(
    cmd: list[str],
    timeout: float,
    after_start: Callable[[], subprocess.Popen[str]] | None = None,
) -> dict[str, Any]:
    """Run a runner, return its JSON line; ``after_start`` starts a helper beside it."""
    helper: subprocess.Popen[str] | None = None
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=BENCH / "systems"
    )
    try:
        if after_start is not None:
            helper = after_start()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(
                f"timed out after {timeout:.0f}s; stderr: {err.strip()[-800:]}"
            ) from None
        if helper is not None:
            _, herr = helper.communicate(timeout=60)
            if helper.returncode != 0:
                raise RuntimeError(f"paced publisher failed: {herr.strip()[-800:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        if helper is not None and helper.poll() is None:
            helper.kill()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"exit {proc.returncode}; stderr: {err.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "unsupported" in result:
        raise Unsupported(result["unsupported"])
    return result


def run_consume(
    broker: Broker, job: Job, queue: str, conn_args: list[str], settle: float
) -> dict[str, Any]:
    """Pre-fill (or pace) a queue, consume it, check nothing is left unacked."""
    fill_args, _ = queue_setup(job.system, queue)
    cmd = _runner_cmd(job, queue, conn_args, *(["--latency"] if job.paced_rate else []))
    # generous ceiling: slowest peer at D=5ms with 8 threads is ~1,500 msg/s
    timeout = 120 + job.messages / 500 + job.paced_seconds
    after_start = None
    if job.paced_rate:
        broker.tool("declare", "--queue", queue, *fill_args)

        def after_start() -> subprocess.Popen[str]:
            return broker.tool_popen(
                "paced",
                "--queue",
                queue,
                "--rate",
                str(job.paced_rate),
                "--seconds",
                str(job.paced_seconds),
                *fill_args,
            )

    else:
        filled = broker.tool("fill", "--queue", queue, "--messages", str(job.messages), *fill_args)
        if filled.get("ready") != job.messages:
            raise RuntimeError(f"pre-fill left {filled} in {queue}")
        # Let the broker finish the work the fill (and the previous run's
        # teardown) left it: without a pause, a run sometimes starts while
        # RabbitMQ is still busy and measures the broker, not the system.
        time.sleep(settle)
    result = _run_runner(cmd, timeout, after_start)
    # the runner has exited, so anything it did not ack is back in the queue
    left = broker.tool("declare", "--queue", queue, *fill_args).get("ready", 0)
    if left:
        raise RuntimeError(f"{left} message(s) were not acked ({result})")
    return result


def run_publish(
    broker: Broker, job: Job, queue: str, conn_args: list[str], settle: float
) -> dict[str, Any]:
    """Publish N messages into an empty queue; check the queue holds exactly N."""
    aux = f"{queue}.aux"
    broker.fill(queue, 0)
    broker.fill(aux, 0)
    time.sleep(settle)
    # one at a time at ~1,000 msg/s, or a connection per publish: allow for it
    timeout = 120 + job.messages / 100
    result = _run_runner(_runner_cmd(job, queue, conn_args, "--aux", aux), timeout)
    # A publisher without confirms may exit with messages still on their way.
    (ready,) = broker.count(
        queue, expect=job.messages, seconds=30 if not job.system.confirms else 5
    )
    if ready != job.messages:
        raise RuntimeError(f"the queue holds {ready} of the {job.messages} published ({result})")
    return result


def run_pipeline(
    broker: Broker, job: Job, queue: str, conn_args: list[str], settle: float
) -> dict[str, Any]:
    """Consume A (pre-filled), publish each message to B, ack A; check where each one is.

    A has a dead-letter queue (``A.dlq``) so that a system which rejects a failed
    message without requeueing it leaves it where it can be counted.  With
    ``job.check`` B refuses publishes once it holds that many
    (``x-max-length`` + ``x-overflow: reject-publish``: the broker nacks them).
    """
    out, dlq = f"{queue}.out", f"{queue}.dlq"
    broker.fill(dlq, 0)
    broker.fill(
        out, 0, {"x-max-length": job.check, "x-overflow": "reject-publish"} if job.check else None
    )
    broker.fill(
        queue, job.messages, {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
    )
    time.sleep(settle)
    extra = ["--out", out]
    if job.check:
        # Stop once B is full and some refusals were seen (or after N successes,
        # which only a system that does not notice the refusals reaches).
        extra += [
            "--stop-ok",
            str(job.check),
            "--stop-failed",
            str(min(100, job.messages - job.check)),
        ]
    result = _run_runner(_runner_cmd(job, queue, conn_args, *extra), 120 + job.messages / 200)
    # The runner has exited: whatever it did not ack is back in A by now, and
    # the counts settle (a publisher without confirms: its last copies may still
    # be on their way to B).
    if job.check:
        in_a, in_dlq, in_b = broker.count(queue, dlq, out)
    else:
        wait = 30 if not job.system.confirms else 5
        (in_b,) = broker.count(out, expect=job.messages, seconds=wait)
        in_a, in_dlq = broker.count(queue, dlq)
    acked = job.messages - in_a - in_dlq
    result["where"] = {"requeued": in_a, "dead_lettered": in_dlq, "copies": in_b, "acked": acked}
    if not job.check and (in_a, in_dlq, in_b) != (0, 0, job.messages):
        raise RuntimeError(
            f"after the run A holds {in_a}, A.dlq {in_dlq} and B {in_b} "
            f"of {job.messages} ({result})"
        )
    return result


TASKS: dict[str, Callable[[Broker, Job, str, list[str], float], dict[str, Any]]] = {
    "consume": run_consume,
    "publish": run_publish,
    "pipeline": run_pipeline,
}


def run_job(
    broker: Broker, job: Job, mode: str, conn_args: list[str], settle: float = 0.0
) -> dict[str, Any]:
    queue = f"bench_{job.slug}_{mode}"
    _, to_delete = queue_setup(job.system, queue)
    to_delete += [f"{queue}.aux", f"{queue}.out", f"{queue}.dlq"]
    try:
        result = TASKS[job.task](broker, job, queue, conn_args, settle)
        result["label"] = job.label
        return result
    finally:
        try:
            broker.tool("delete", *(a for q in to_delete for a in ("--queue", q)), timeout=60)
        except Exception as exc:  # never let cleanup hide the real outcome
            log(f"[warn] could not delete {to_delete}: {exc}")


# -- modes --------------------------------------------------------------------------------

# A ratio column: (kind, key, header).  kind "system": this row's msg/s over the
# same group's row of system `key` with the same suffix (else its plain row);
# "variant": over this system's row with suffix `key`; "ceiling": the same as
# "system", as a percentage; "cpu": CPU µs/msg over system `key`'s.
Ratio = tuple[str, str, str]


@dataclass(frozen=True)
class Mode:
    """A table (or several: one per group of rows) and the jobs that fill it."""

    name: str
    help: str
    task: str  # the runner its jobs use; only systems that have one take part
    jobs: Callable[[list[System], argparse.Namespace], list[Job]]
    ratios: tuple[Ratio, ...] = ()
    columns: tuple[str, ...] = (
        "msg/s",
        "min-max",
        "ratios",
        "cpu",
        "cpu-range",
        "cpu-ratios",
        "rss",
        "p50",
        "p99",
        "conc",
    )
    asyncworker_only: bool = False  # rows of asyncworker (and its baselines) only
    needs: str = ""  # an import every asyncworker of the mode must have, else skipped


def consume_jobs(delay: float = 0.0) -> Callable[[list[System], argparse.Namespace], list[Job]]:
    def jobs(systems: list[System], args: argparse.Namespace) -> list[Job]:
        return [Job(s, "consume", args.messages, delay=delay) for s in systems]

    return jobs


def paced_jobs(systems: list[System], args: argparse.Namespace) -> list[Job]:
    total = int(args.rate * args.paced_seconds)
    return [
        Job(s, "consume", total, paced_rate=args.rate, paced_seconds=args.paced_seconds)
        for s in systems
    ]


def memory_jobs(systems: list[System], args: argparse.Namespace) -> list[Job]:
    return [Job(s, "consume", k, suffix=f" n={k}") for s in systems for k in (20_000, 200_000)]


MIDDLEWARE_VARIANTS = (
    ("default", ""),
    ("timing", "+timing"),
    ("middlewares", "+mw"),
    ("mw-queue", "+mw-queue"),
    ("mw-debug", "+mw-debug"),
    ("tracing", "+tracing"),
    ("tracing-noop", "+tracing-noop"),
)


def middleware_jobs(systems: list[System], args: argparse.Namespace) -> list[Job]:
    return [
        Job(s, "consume", args.messages, suffix=suffix, variant=variant)
        for s in systems
        for variant, suffix in MIDDLEWARE_VARIANTS
    ]


ONE_AT_A_TIME = "one publish at a time by nature (it waits for each confirm): see 1 in flight"


def publish_jobs(systems: list[System], args: argparse.Namespace) -> list[Job]:
    jobs = []
    for k in args.inflight:
        n = args.serial_messages if k == 1 else args.messages
        group = f"{k} in flight"
        for s in systems:
            job = Job(s, "publish", n, group=group, inflight=k)
            if s.one_at_a_time and k > 1:
                job.not_run = ONE_AT_A_TIME
            jobs.append(job)
            if s.asyncworker:
                jobs.append(replace(job, suffix=" (async with)", variant="async-with"))
    return jobs


def pipeline_jobs(systems: list[System], args: argparse.Namespace) -> list[Job]:
    n, check = args.messages, args.check_messages
    return [Job(s, "pipeline", n, group="D=0") for s in systems] + [
        Job(s, "pipeline", check, group="check", check=check // 2) for s in systems
    ]


def scripts_jobs(systems: list[System], args: argparse.Namespace) -> list[Job]:
    jobs = []
    for s in systems:
        n = args.script_messages
        jobs.append(Job(s, "publish", n, suffix=" serve()", variant="serve"))
        jobs.append(Job(s, "publish", n, suffix=" async with app", variant="async-with"))
        jobs.append(Job(s, "publish", args.bare_messages, suffix=" bare", variant="bare"))
    return jobs


PUBLISH_COLUMNS = (
    "confirms",
    "msg/s",
    "min-max",
    "ratios",
    "cpu",
    "cpu-range",
    "cpu-ratios",
    "conc",
    "notes",
)
MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "throughput",
            "consume a pre-filled queue, empty handler (D=0)",
            "consume",
            consume_jobs(),
            (("system", "async-worker", "x async-worker"),),
        ),
        Mode(
            "io",
            "consume a pre-filled queue, 5 ms of async sleep per message",
            "consume",
            consume_jobs(0.005),
            (("system", "async-worker", "x async-worker"),),
        ),
        Mode(
            "paced",
            "consume while a publisher sends --rate msg/s: CPU per message, latency",
            "consume",
            paced_jobs,
            (("system", "async-worker", "x async-worker"),),
        ),
        Mode(
            "memory",
            "asyncworker: peak RSS after 20,000 and after 200,000 messages",
            "consume",
            memory_jobs,
            (("variant", " n=20000", "x n=20000"),),
            asyncworker_only=True,
        ),
        Mode(
            "middlewares",
            "asyncworker: the default chain against Logging and Timing, and Tracing",
            "consume",
            middleware_jobs,
            (("variant", "", "x default chain"),),
            asyncworker_only=True,
            needs="from asyncworker.middlewares import Logging, Timing",
        ),
        Mode(
            "publish",
            "N persistent publishes with confirms at 1, 64 and 256 in flight",
            "publish",
            publish_jobs,
            (
                ("system", "aio-pika", "x aio-pika"),
                ("ceiling", "pamqp-raw", "% of ceiling"),
                ("cpu", "aio-pika", "CPU x aio-pika"),
            ),
            columns=PUBLISH_COLUMNS,
        ),
        Mode(
            "pipeline",
            "consume A, publish each message to B with confirm, then ack A (D=0)",
            "pipeline",
            pipeline_jobs,
            (
                ("system", "async-worker", "x async-worker"),
                ("system", "faststream", "x faststream"),
                ("cpu", "aio-pika", "CPU x aio-pika"),
            ),
            columns=PUBLISH_COLUMNS,
        ),
        Mode(
            "scripts",
            "asyncworker: 10,000 publishes one after another from a script",
            "publish",
            scripts_jobs,
            (("variant", " serve()", "x serve()"),),
            columns=PUBLISH_COLUMNS,
            asyncworker_only=True,
        ),
    )
}
# `--mode all`: every mode above, in this order.
DEFAULT_MODE = "throughput"


# -- summaries ------------------------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(
    results: list[dict[str, Any]], jobs: list[Job], ratios: tuple[Ratio, ...]
) -> list[dict[str, Any]]:
    """One row per job (the check's jobs aside): medians and ranges over its rounds."""
    rows = []
    for job in jobs:
        if job.check:
            continue
        mine = [r for r in results if r.get("label") == job.label and r.get("group") == job.group]
        ok = [r for r in mine if "error" not in r and "unsupported" not in r]
        failed = [r for r in mine if "error" in r]
        na = [r["unsupported"] for r in mine if "unsupported" in r]
        rates = [r["messages"] / r["seconds"] for r in ok if r["seconds"] > 0]
        cpus = [r["cpu_seconds"] / r["messages"] * 1e6 for r in ok]
        row: dict[str, Any] = {
            "system": job.label,
            "name": job.system.name,
            "suffix": job.suffix,
            "group": job.group,
            "confirms": job.system.confirms,
            "runs": len(ok),
            "failed": len(failed),
            "msg_per_s": median(rates),
            "min": min(rates) if rates else None,
            "max": max(rates) if rates else None,
            "cpu_us_per_msg": median(cpus),
            "cpu_min": min(cpus) if cpus else None,
            "cpu_max": max(cpus) if cpus else None,
            "peak_rss_mb": median([r["peak_rss_kb"] / 1024 for r in ok]),
            "latency_p50_ms": median([r["latency_p50_ms"] for r in ok if "latency_p50_ms" in r]),
            "latency_p99_ms": median([r["latency_p99_ms"] for r in ok if "latency_p99_ms" in r]),
            "max_concurrency": max((r["max_concurrency"] for r in ok), default=None),
            "notes": _notes(job, na[-1] if na else ""),
        }
        if failed:
            row["error"] = failed[-1]["error"]
        rows.append(row)
    for row in rows:
        row["ratios"] = {header: _ratio(rows, row, kind, key) for kind, key, header in ratios}
    return rows


def _notes(job: Job, unsupported: str) -> str:
    if job.not_run:
        return job.not_run
    if unsupported:
        return f"n/a ({unsupported})"
    notes = []
    if job.task in ("publish", "pipeline") and not job.system.confirms:
        notes.append("no confirms: publishes end at the socket write")
    if job.system.one_at_a_time:
        notes.append("one at a time by nature")
    return "; ".join(notes)


def _ratio(rows: list[dict[str, Any]], row: dict[str, Any], kind: str, key: str) -> float | None:
    same = [r for r in rows if r["group"] == row["group"] and r["runs"]]
    if kind == "variant":
        ref = next((r for r in same if r["name"] == row["name"] and r["suffix"] == key), None)
    else:
        ref = next((r for r in same if r["name"] == key and r["suffix"] == row["suffix"]), None)
        ref = ref or next((r for r in same if r["name"] == key and not r["suffix"]), None)
    if ref is None or not row["runs"]:
        return None
    if kind == "cpu":
        return row["cpu_us_per_msg"] / ref["cpu_us_per_msg"] if ref["cpu_us_per_msg"] else None
    return row["msg_per_s"] / ref["msg_per_s"] if ref["msg_per_s"] else None


def verdict(job: Job, r: dict[str, Any]) -> str:
    """The pipeline check of one run: was anything acked before its copy was confirmed?"""
    if "error" in r:
        return "error"
    where = r["where"]
    lost = where["acked"] - where["copies"]
    if lost > 0:
        return f"FAIL: {lost} acked without a confirmed copy in B"
    if not r.get("failed"):
        return "inconclusive: no publish was refused"
    if where["copies"] > where["acked"]:
        return f"ok ({where['copies'] - where['acked']} copies of messages not acked)"
    return "ok"


def summarise_checks(results: list[dict[str, Any]], jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per check job: the counts of its last round and every round's verdict."""
    rows = []
    for job in jobs:
        if not job.check:
            continue
        mine = [r for r in results if r.get("label") == job.label and r.get("group") == job.group]
        runs = [r for r in mine if "unsupported" not in r]
        verdicts = [verdict(job, r) for r in runs]
        last = next((r for r in reversed(runs) if "where" in r), None)
        rows.append(
            {
                "system": job.label,
                "confirms": job.system.confirms,
                "messages": job.messages,
                "b_max": job.check,
                "handler_ok": last.get("messages") if last else None,
                "handler_failed": last.get("failed", 0) if last else None,
                **(last["where"] if last else {}),
                "verdicts": verdicts,
                "notes": _notes(
                    job, next((r["unsupported"] for r in mine if "unsupported" in r), "")
                ),
            }
        )
    return rows


# -- tables --------------------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _range(lo: Any, hi: Any, spec: str) -> str:
    return "—" if lo is None else f"{lo:{spec}}-{hi:{spec}}"


CELLS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "confirms": ("confirms", lambda r: "yes" if r["confirms"] else "no"),
    "msg/s": ("median msg/s", lambda r: fmt(r["msg_per_s"], ",.0f")),
    "min-max": ("min-max msg/s", lambda r: _range(r["min"], r["max"], ",.0f")),
    "cpu": ("CPU µs/msg", lambda r: fmt(r["cpu_us_per_msg"], ".0f")),
    "cpu-range": ("CPU min-max", lambda r: _range(r["cpu_min"], r["cpu_max"], ".0f")),
    "rss": ("peak RSS MB", lambda r: fmt(r["peak_rss_mb"], ".1f")),
    "p50": ("p50 ms", lambda r: fmt(r["latency_p50_ms"], ".2f")),
    "p99": ("p99 ms", lambda r: fmt(r["latency_p99_ms"], ".2f")),
    "conc": ("max conc.", lambda r: fmt(r["max_concurrency"], "d")),
    "notes": ("notes", lambda r: r["notes"]),
}


RATIO_KEYS = ("ratios", "cpu-ratios")  # columns of msg/s ratios, of CPU ratios


def _ratios(ratios: tuple[Ratio, ...], key: str) -> list[Ratio]:
    return [r for r in ratios if (r[0] == "cpu") == (key == "cpu-ratios")]


def _table(head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return lines + ["| " + " | ".join(row) + " |" for row in body]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    return [
        "  ".join(
            str(c).ljust(w) if i == 0 or i == len(row) - 1 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [head, *body]
    ]


def render(
    mode: Mode, rows: list[dict[str, Any]], ratios: tuple[Ratio, ...], markdown: bool = False
) -> str:
    out: list[str] = []
    for group in dict.fromkeys(r["group"] for r in rows):
        title = f"{mode.name}: {group}" if group else mode.name
        out.append(f"**{title}**\n" if markdown else f"== {title} ==")
        head = ["system"]
        for key in mode.columns:
            head += (
                [h for _, _, h in _ratios(ratios, key)] if key in RATIO_KEYS else [CELLS[key][0]]
            )
        body = []
        for r in (r for r in rows if r["group"] == group):
            cells = [r["system"]]
            for key in mode.columns:
                if key in RATIO_KEYS:
                    for kind, _, header in _ratios(ratios, key):
                        spec = ".0%" if kind == "ceiling" else ".2f"
                        cells.append(fmt(r["ratios"][header], spec))
                elif not r["runs"] and key not in ("confirms", "notes"):
                    cells.append("FAILED" if key == "msg/s" and r["failed"] else "—")
                else:
                    cells.append(CELLS[key][1](r))
            body.append(cells)
        out += _table(head, body, markdown)
        for r in rows:
            if r["group"] == group and r.get("error"):
                last = [ln for ln in r["error"].splitlines() if ln.strip()][-1:] or [""]
                out.append(
                    f"  ! {r['system']}: {r['failed']} failed run(s): {last[0].strip()[:300]}"
                )
        out.append("")
    return "\n".join(out).rstrip()


def render_checks(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    head = [
        "system",
        "confirms",
        "A pre-filled",
        "B holds at most",
        "handler ok",
        "handler failed",
        "copies in B",
        "acked from A",
        "requeued in A",
        "dead-lettered",
        "verdict (every round)",
    ]
    body = []
    for r in rows:
        verdicts = sorted(set(r["verdicts"]))
        said = "; ".join(f"{v} ({r['verdicts'].count(v)}/{len(r['verdicts'])})" for v in verdicts)
        body.append(
            [
                r["system"],
                "yes" if r["confirms"] else "no",
                f"{r['messages']:,}",
                f"{r['b_max']:,}",
                *(
                    fmt(r.get(k), ",d")
                    for k in (
                        "handler_ok",
                        "handler_failed",
                        "copies",
                        "acked",
                        "requeued",
                        "dead_lettered",
                    )
                ),
                said or r["notes"] or "—",
            ]
        )
    title = "pipeline: check (B refuses publishes once full)"
    return "\n".join(
        [f"**{title}**\n" if markdown else f"== {title} ==", *_table(head, body, markdown)]
    )


# -- the run ------------------------------------------------------------------------------


def machine_info(broker: Broker | None) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    server: dict[str, Any] = {}
    if broker is not None:
        try:
            server = broker.tool("info", timeout=30)
        except Exception:
            server = {}
    head = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rabbitmq": server.get("version", "unknown"),
        "erlang": server.get("platform", ""),
        "working_tree": head,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--mode",
        default=DEFAULT_MODE,
        help="comma list, or 'all': " + "; ".join(f"{m.name}: {m.help}" for m in MODES.values()),
    )
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REF",
        help="also run asyncworker as it was at this git ref (repeatable)",
    )
    p.add_argument(
        "--setup", action="store_true", help="only create the venvs the run needs, then exit"
    )
    p.add_argument(
        "--quick", action="store_true", help="3 rounds, 20,000 msgs, throughput, 5 s paced"
    )
    p.add_argument("--rate", type=float, default=1000.0, help="paced mode: msg/s")
    p.add_argument("--paced-seconds", type=float, default=10.0)
    p.add_argument(
        "--inflight",
        default="1,64,256",
        help="publish mode: publishes in flight, comma list (default 1,64,256)",
    )
    p.add_argument(
        "--serial-messages",
        type=int,
        default=2_000,
        help="publish mode: messages at 1 in flight (default 2,000)",
    )
    p.add_argument(
        "--script-messages", type=int, default=10_000, help="scripts mode (default 10,000)"
    )
    p.add_argument(
        "--bare-messages",
        type=int,
        default=200,
        help="scripts mode: messages for the bare app.publish() (a connection each; default 200)",
    )
    p.add_argument(
        "--check-messages",
        type=int,
        default=2_000,
        help="pipeline mode: messages of the check with a refusing B (default 2,000)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds to wait after preparing the queues, before starting the system",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--vhost", default="/")
    p.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = p.parse_args()
    if args.quick:
        args.rounds = 3
        args.messages = min(args.messages, 20_000)
        args.paced_seconds = min(args.paced_seconds, 5.0)
    args.modes = list(MODES) if args.mode == "all" else [m.strip() for m in args.mode.split(",")]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    args.names = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in args.names:
        if name not in SYSTEMS:
            p.error(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    try:
        args.inflight = [int(k) for k in args.inflight.split(",")]
    except ValueError:
        p.error(f"--inflight takes a comma list of numbers, got {args.inflight!r}")
    try:
        args.baselines = [baseline_system(ref) for ref in args.baseline]
    except ValueError as exc:
        p.error(str(exc))
    return args


def select(mode: Mode, available: list[System]) -> list[System]:
    systems = [s for s in available if mode.task in s.runners]
    if mode.asyncworker_only:
        systems = [s for s in systems if s.asyncworker]
    return systems


def prepare(args: argparse.Namespace) -> tuple[list[System], dict[str, str]]:
    """Every system the run needs, with its venv; (available, skipped with reasons)."""
    wanted = [SYSTEMS[n] for n in args.names]
    if any(MODES[m].asyncworker_only for m in args.modes) and "asyncworker" not in args.names:
        wanted.insert(0, SYSTEMS["asyncworker"])
    wanted += args.baselines
    tasks = {MODES[m].task for m in args.modes}
    available: list[System] = []
    skipped: dict[str, str] = {}
    for system in wanted:
        if not tasks & set(system.runners):
            continue
        try:
            if system.ref:
                ensure_ref_venv(system)
            elif not system.pip:
                if not ensure_project_venv():
                    raise RuntimeError("asyncworker (App, Message) is not importable in .venv")
            else:
                ensure_venv(VENVS / system.name, system.pip)
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            skipped[system.name] = f"setup failed: {exc}"
            continue
        available.append(system)
    for name, why in skipped.items():
        log(f"[skip] {name}: {why}")
    return available, skipped


def main() -> int:
    args = parse_args()
    # A run stopped with SIGTERM still deletes the queues of the job it was in
    # (run_job's finally clause), as one stopped with Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    harness = ensure_venv(VENVS / "_harness", HARNESS_PIP)
    available, skipped = prepare(args)
    if args.setup:
        log(f"[setup] ready: {', '.join(s.name for s in available) or 'nothing'}")
        return 1 if skipped else 0

    conn_args = [
        "--host", args.host, "--port", str(args.port), "--user", args.user,
        "--password", args.password, "--vhost", args.vhost,
    ]  # fmt: skip
    broker = Broker(harness, conn_args)
    info = machine_info(broker)
    log(f"[info] {info}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{'-'.join(args.modes)}.json"
    report: dict[str, Any] = {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "baselines"},
        "baselines": {s.name: s.ref for s in args.baselines},
        "skipped": skipped,
        "modes": {},
    }
    for name in args.modes:
        mode = MODES[name]
        systems = select(mode, available)
        if mode.needs:
            lacking = [s for s in systems if not _imports(s.python, mode.needs)]
            for s in lacking:
                log(f"[skip] mode {name} for {s.name}: `{mode.needs}` fails")
            systems = [s for s in systems if s not in lacking]
        jobs = mode.jobs(systems, args)
        if not jobs:
            log(f"[skip] mode {name}: no system to run")
            continue
        # Before/after: every row against the same row of each baseline ref.
        ratios = mode.ratios + tuple(
            r
            for b in args.baselines
            if b in systems
            for r in (("system", b.name, f"x {b.name}"), ("cpu", b.name, f"CPU x {b.name}"))
        )
        results = run_rounds(broker, mode, jobs, args, conn_args)
        rows = summarise(results, jobs, ratios)
        checks = summarise_checks(results, jobs)
        report["modes"][name] = {
            "ratios": [list(r) for r in ratios],
            "runs": results,
            "summary": rows,
            "checks": checks,
        }
        for markdown in (False, True) if args.markdown else (False,):
            text = render(mode, rows, ratios, markdown)
            if checks:
                text += "\n\n" + render_checks(checks, markdown)
            print(text + "\n", flush=True)
        # After every mode: a long run cut short keeps what it measured.
        out.write_text(json.dumps(report, indent=2))
    out.write_text(json.dumps(report, indent=2))
    log(f"[done] results written to {out.relative_to(REPO)}")
    return 0


def run_rounds(
    broker: Broker, mode: Mode, jobs: list[Job], args: argparse.Namespace, conn_args: list[str]
) -> list[dict[str, Any]]:
    """Every job once per round, rounds interleaved; a job found unsupported is not rerun."""
    results: list[dict[str, Any]] = []
    unsupported: dict[tuple[str, str], str] = {}
    for rnd in range(1, args.rounds + 1):
        for job in jobs:
            key = (job.label, job.group)
            head = f"[{mode.name} {rnd}/{args.rounds}] {job.label + ' ' + job.group:<36}"
            base = {"label": job.label, "group": job.group, "system": job.system.name, "round": rnd}
            if job.not_run:
                continue
            if key in unsupported:
                results.append({**base, "unsupported": unsupported[key]})
                continue
            t0 = time.monotonic()
            try:
                r = run_job(broker, job, mode.name, conn_args, args.settle)
                rate = r["messages"] / r["seconds"] if r["seconds"] else 0
                extra = f"  check: {verdict(job, r)}" if job.check else ""
                log(
                    f"{head} {rate:>9,.0f} msg/s  cpu {r['cpu_seconds'] / r['messages'] * 1e6:.0f}"
                    f" µs/msg  rss {r['peak_rss_kb'] / 1024:.1f} MB  conc {r['max_concurrency']}"
                    f"  ({time.monotonic() - t0:.1f}s wall){extra}"
                )
            except Unsupported as exc:
                unsupported[key] = str(exc)
                r = {"unsupported": str(exc)}
                log(f"{head} n/a: {exc}")
            except Exception as exc:
                r = {"error": str(exc)}
                last = [ln for ln in str(exc).splitlines() if ln.strip()][-1:] or [""]
                log(f"{head} FAILED: {last[0].strip()}")
            results.append({**r, **base})
    return results


if __name__ == "__main__":
    sys.exit(main())
