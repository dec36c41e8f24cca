#!/usr/bin/env python3
"""Benchmark harness: asyncworker against its peers on a real RabbitMQ.

    python bench/run.py [--mode throughput] [--messages 20000] [--rounds 5]
                        [--systems a,b,c] [--quick]

Stdlib only: it creates one throwaway virtualenv per peer under ``bench/.venvs/``,
pre-fills queues through ``amqp_tool.py`` (pamqp, publisher confirms) and runs each
system's ``systems/run_*.py`` as a subprocess that prints one JSON line.  Rounds are
interleaved (round 1: every system, round 2: every system, ...), so slow drifts of
a noisy machine hit every system alike.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
PROJECT_VENV = REPO / ".venv"
BASELINE = "async-worker"
MODES = ("throughput", "io", "paced", "memory", "middlewares")


@dataclass(frozen=True)
class System:
    name: str
    runner: str
    pip: tuple[str, ...] = ()  # empty: the project venv
    body_format: str = "raw"
    dramatiq_queue: bool = False
    notes: str = ""

    @property
    def python(self) -> Path:
        venv = PROJECT_VENV if not self.pip else VENVS / self.name
        return venv / "bin" / "python"


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("asyncworker", "run_asyncworker.py"),
        System(
            "async-worker",
            "run_async_worker.py",
            # async-worker pins aioamqp==0.15.0; pamqp is pinned to the version tested.
            ("async-worker==0.20.2", "aioamqp==0.15.0", "pamqp==4.0.1"),
        ),
        System("aio-pika", "run_aio_pika.py", ("aio-pika==10.2.1",)),
        System("faststream", "run_faststream.py", ("faststream[rabbit]==0.7.8",)),
        System(
            "dramatiq",
            "run_dramatiq.py",
            ("dramatiq[rabbitmq]==2.2.1",),
            body_format="dramatiq",
            dramatiq_queue=True,
        ),
        System("async-amqp", "run_async_amqp.py", ("async-amqp==0.5.5", "trio==0.35.0")),
        System("pamqp-raw", "run_pamqp_raw.py", ("pamqp==3.3.0", "trio==0.35.0")),
    )
}
HARNESS_PIP = ("pamqp==3.3.0",)


# -- environments --------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_venv(path: Path, requirements: tuple[str, ...]) -> Path:
    """Create ``path`` and pip-install ``requirements`` unless a stamp says it's done."""
    python = path / "bin" / "python"
    stamp = path / ".bench-requirements"
    wanted = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"[setup] creating {path.relative_to(REPO)} with {' '.join(requirements)}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
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
    stamp.write_text(wanted)
    return python


def ensure_project_venv() -> bool:
    """The project venv with asyncworker importable (pip install -e the repo if needed)."""
    python = PROJECT_VENV / "bin" / "python"
    if not python.exists():
        log("[setup] creating .venv for the project")
        subprocess.run([sys.executable, "-m", "venv", str(PROJECT_VENV)], check=True)
    if _imports(python, "asyncworker"):
        return _imports(python, "from asyncworker import App, Message")
    log("[setup] pip install -e the project into .venv")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", str(REPO)], check=False)
    return _imports(python, "from asyncworker import App, Message")


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


def queue_setup(system: System, queue: str) -> tuple[list[str], list[str]]:
    """(extra amqp_tool args for declaring/filling, all queues to delete afterwards)."""
    if system.dramatiq_queue:
        args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
        return (
            ["--format", "dramatiq", "--args", json.dumps(args)],
            [queue, f"{queue}.DQ", f"{queue}.XQ"],
        )
    return ["--format", system.body_format], [queue]


# -- one run -----------------------------------------------------------------------------


@dataclass
class Job:
    label: str  # the row in the table
    system: System
    messages: int
    delay: float = 0.0
    variant: str = "default"
    paced_rate: float = 0.0  # > 0: publish while consuming instead of pre-filling
    paced_seconds: float = 0.0


def run_job(
    broker: Broker, job: Job, mode: str, conn_args: list[str], settle: float = 0.0
) -> dict[str, Any]:
    slug = job.label.replace("+", "-").replace("@", "-")
    queue = f"bench_{slug}_{mode}"
    fill_args, to_delete = queue_setup(job.system, queue)
    cmd = [
        str(job.system.python),
        str(BENCH / "systems" / job.system.runner),
        "--queue",
        queue,
        "--messages",
        str(job.messages),
        "--delay",
        str(job.delay),
        "--variant",
        job.variant,
        *conn_args,
    ]
    if job.paced_rate:
        cmd.append("--latency")
    # generous ceiling: slowest peer at D=5ms with 8 threads is ~1,500 msg/s
    timeout = 120 + job.messages / 500 + job.paced_seconds
    publisher: subprocess.Popen[str] | None = None
    try:
        if job.paced_rate:
            broker.tool("declare", "--queue", queue, *fill_args)
        else:
            filled = broker.tool(
                "fill", "--queue", queue, "--messages", str(job.messages), *fill_args
            )
            if filled.get("ready") != job.messages:
                raise RuntimeError(f"pre-fill left {filled} in {queue}")
            # Let the broker finish the work the fill (and the previous run's
            # teardown) left it: without a pause, a run sometimes starts while
            # RabbitMQ is still busy and measures the broker, not the system.
            time.sleep(settle)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=BENCH / "systems"
        )
        if job.paced_rate:
            publisher = broker.tool_popen(
                "paced",
                "--queue",
                queue,
                "--rate",
                str(job.paced_rate),
                "--seconds",
                str(job.paced_seconds),
                *fill_args,
            )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(
                f"timed out after {timeout:.0f}s; stderr: {err.strip()[-800:]}"
            ) from None
        if publisher is not None:
            _, perr = publisher.communicate(timeout=60)
            if publisher.returncode != 0:
                raise RuntimeError(f"paced publisher failed: {perr.strip()[-800:]}")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"exit {proc.returncode}; stderr: {err.strip()[-1500:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        result["label"] = job.label
        # the runner has exited, so anything it did not ack is back in the queue
        left = broker.tool("declare", "--queue", queue, *fill_args).get("ready", 0)
        if left:
            raise RuntimeError(f"{left} message(s) were not acked ({result})")
        return result
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
        try:
            broker.tool("delete", *(a for q in to_delete for a in ("--queue", q)), timeout=60)
        except Exception as exc:  # never let cleanup hide the real outcome
            log(f"[warn] could not delete {to_delete}: {exc}")


# -- modes --------------------------------------------------------------------------------


def jobs_for(mode: str, systems: list[System], args: argparse.Namespace) -> list[Job]:
    n = args.messages
    if mode == "throughput":
        return [Job(s.name, s, n) for s in systems]
    if mode == "io":
        return [Job(s.name, s, n, delay=0.005) for s in systems]
    if mode == "paced":
        total = int(args.rate * args.paced_seconds)
        return [
            Job(s.name, s, total, paced_rate=args.rate, paced_seconds=args.paced_seconds)
            for s in systems
        ]
    aw = SYSTEMS["asyncworker"]
    if mode == "memory":
        return [Job(f"asyncworker@{k}", aw, k) for k in (20_000, 200_000)]
    if mode == "middlewares":
        return [
            Job("asyncworker", aw, n),
            Job("asyncworker+timing", aw, n, variant="timing"),
            Job("asyncworker+mw", aw, n, variant="middlewares"),
            Job("asyncworker+mw-queue", aw, n, variant="mw-queue"),
            Job("asyncworker+mw-debug", aw, n, variant="mw-debug"),
        ]
    raise ValueError(mode)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(
    results: list[dict[str, Any]], labels: list[str], baseline: str
) -> list[dict[str, Any]]:
    rows = []
    for label in labels:
        ok = [r for r in results if r.get("label") == label and "error" not in r]
        failed = [r for r in results if r.get("label") == label and "error" in r]
        rates = [r["messages"] / r["seconds"] for r in ok if r["seconds"] > 0]
        row: dict[str, Any] = {
            "system": label,
            "runs": len(ok),
            "failed": len(failed),
            "msg_per_s": median(rates),
            "min": min(rates) if rates else None,
            "max": max(rates) if rates else None,
            "cpu_us_per_msg": median([r["cpu_seconds"] / r["messages"] * 1e6 for r in ok]),
            "peak_rss_mb": median([r["peak_rss_kb"] / 1024 for r in ok]),
            "latency_p50_ms": median([r["latency_p50_ms"] for r in ok if "latency_p50_ms" in r]),
            "latency_p99_ms": median([r["latency_p99_ms"] for r in ok if "latency_p99_ms" in r]),
            "max_concurrency": max((r["max_concurrency"] for r in ok), default=None),
        }
        if failed:
            row["error"] = failed[-1]["error"]
        rows.append(row)
    base = next((r for r in rows if r["system"] == baseline and r["msg_per_s"]), None)
    for row in rows:
        row["ratio"] = (
            row["msg_per_s"] / base["msg_per_s"] if base and row["msg_per_s"] is not None else None
        )
    return rows


def fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(mode: str, rows: list[dict[str, Any]], baseline: str, markdown: bool = False) -> str:
    head = [
        "system",
        "median msg/s",
        "min-max msg/s",
        f"x {baseline}",
        "CPU µs/msg",
        "peak RSS MB",
        "p50 ms",
        "p99 ms",
        "max conc.",
    ]
    body = []
    for r in rows:
        if not r["runs"]:
            body.append([r["system"], "FAILED", "", "", "", "", "", "", ""])
            continue
        body.append(
            [
                r["system"],
                fmt(r["msg_per_s"], ",.0f"),
                f"{r['min']:,.0f}-{r['max']:,.0f}",
                fmt(r["ratio"], ".2f"),
                fmt(r["cpu_us_per_msg"], ".0f"),
                fmt(r["peak_rss_mb"], ".1f"),
                fmt(r["latency_p50_ms"], ".2f"),
                fmt(r["latency_p99_ms"], ".2f"),
                fmt(r["max_concurrency"], "d"),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    out = [f"== {mode} =="]
    for row in [head, *body]:
        out.append(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for r in rows:
        if r.get("error"):
            last = [ln for ln in r["error"].splitlines() if ln.strip()][-1:] or [""]
            out.append(f"  ! {r['system']}: {r['failed']} failed run(s): {last[0].strip()[:300]}")
    return "\n".join(out)


def machine_info(broker: Broker) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        server = broker.tool("info", timeout=30)
    except Exception:
        server = {}
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rabbitmq": server.get("version", "unknown"),
        "erlang": server.get("platform", ""),
    }


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", default=None, help=f"comma list of {', '.join(MODES)} or 'all'")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list")
    p.add_argument(
        "--quick", action="store_true", help="3 rounds, 20,000 msgs, throughput, 5 s paced"
    )
    p.add_argument("--rate", type=float, default=1000.0, help="paced mode: msg/s")
    p.add_argument("--paced-seconds", type=float, default=10.0)
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds to wait after pre-filling a queue, before starting the system",
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
    mode_arg = args.mode or "throughput"
    modes = list(MODES) if mode_arg == "all" else [m.strip() for m in mode_arg.split(",")]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in names:
        if name not in SYSTEMS:
            p.error(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")

    conn_args = [
        "--host", args.host, "--port", str(args.port), "--user", args.user,
        "--password", args.password, "--vhost", args.vhost,
    ]  # fmt: skip
    harness = ensure_venv(VENVS / "_harness", HARNESS_PIP)
    broker = Broker(harness, conn_args)
    info = machine_info(broker)
    log(f"[info] {info}")

    available: list[System] = []
    skipped: dict[str, str] = {}
    need_project = "asyncworker" in names or any(m in ("memory", "middlewares") for m in modes)
    project_ok = ensure_project_venv() if need_project else False
    for name in names:
        system = SYSTEMS[name]
        if not system.pip:
            if project_ok:
                available.append(system)
            else:
                skipped[name] = "asyncworker (App, Message) is not importable in .venv"
            continue
        try:
            ensure_venv(VENVS / name, system.pip)
            available.append(system)
        except subprocess.CalledProcessError as exc:
            skipped[name] = f"install failed: {exc}"
    for name, why in skipped.items():
        log(f"[skip] {name}: {why}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"machine": info, "args": vars(args), "skipped": skipped, "modes": {}}
    for mode in modes:
        if mode in ("memory", "middlewares") and not project_ok:
            log(f"[skip] mode {mode}: asyncworker is not importable")
            continue
        if mode == "middlewares" and not _imports(
            SYSTEMS["asyncworker"].python, "from asyncworker.middlewares import Logging, Timing"
        ):
            log("[skip] mode middlewares: asyncworker.middlewares.Logging is not importable")
            continue
        jobs = jobs_for(mode, available, args)
        if not jobs:
            continue
        results: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            for job in jobs:
                t0 = time.monotonic()
                try:
                    r = run_job(broker, job, mode, conn_args, args.settle)
                    rate = r["messages"] / r["seconds"] if r["seconds"] else 0
                    log(
                        f"[{mode} {rnd}/{args.rounds}] {job.label:<22} {rate:>9,.0f} msg/s  "
                        f"cpu {r['cpu_seconds']:.2f}s  rss {r['peak_rss_kb'] / 1024:.1f} MB  "
                        f"conc {r['max_concurrency']}  ({time.monotonic() - t0:.1f}s wall)"
                    )
                except Exception as exc:
                    r = {"label": job.label, "system": job.system.name, "error": str(exc)}
                    last = [ln for ln in str(exc).splitlines() if ln.strip()][-1:] or [""]
                    log(f"[{mode} {rnd}/{args.rounds}] {job.label:<22} FAILED: {last[0].strip()}")
                r["round"] = rnd
                results.append(r)
        baseline = BASELINE if mode in ("throughput", "io", "paced") else jobs[0].label
        rows = summarise(results, [j.label for j in jobs], baseline)
        report["modes"][mode] = {"baseline": baseline, "runs": results, "summary": rows}
        print(render(mode, rows, baseline), flush=True)
        if args.markdown:
            print("\n" + render(mode, rows, baseline, markdown=True) + "\n", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{stamp}-{'-'.join(modes)}.json"
    out.write_text(json.dumps(report, indent=2))
    log(f"[done] results written to {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
