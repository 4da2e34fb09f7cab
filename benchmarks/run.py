#!/usr/bin/env python3
"""Compare tunnelkit with a direct connection and every peer on loopback.

The peers: ``twistd portforward``, socat, haproxy (with and without splice),
nginx ``stream {}``, rinetd and a plain asyncio forwarder (on uvloop when it
is installed); tunnelkit runs as one process and with ``--workers 2``. One
command measures, for every system, with the proxies interleaved in each
repetition (so slow drift of a shared machine hits them all alike):

a) iperf3 single-stream throughput through the proxy;
b) MB moved per proxy CPU-second during that iperf3 run (CPU from /proc);
c) wrk requests/s to nginx serving 1 KiB, keep-alive and ``Connection: close``;
d) RSS per idle connection with 1,000 connections held open;
e) (``--figures balance``) new connections/s (wrk ``Connection: close``) with
   one backend and with 4 balanced by ``--balance`` (round-robin), for
   tunnelkit and haproxy, each backend's share of the requests, and ``direct``
   to one backend port as the backend's own limit (issue 15's benchmark).

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py                 # full run, ~35 min
    .venv/bin/python benchmarks/run.py --short         # under 2 minutes
    .venv/bin/python benchmarks/run.py --plot docs/performance.png
    .venv/bin/python benchmarks/run.py --only tunnelkit,portforward --read-sizes 65536,262144,1048576
    .venv/bin/python benchmarks/run.py --only tunnelkit,haproxy --figures balance --reps 3 --seconds 5

See benchmarks/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import loads
import peers
import plot
import report
from procs import BenchError, raise_nofile, stop_all, wait_quiet

#: tunnelkit's default --read-size (tunnelkit.relay.socket_options.DEFAULT_READ_SIZE), passed explicitly.
DEFAULT_READ_SIZE = 256 * 1024

#: The repository: benchmarks/ is directly inside it.
ROOT = Path(__file__).resolve().parent.parent

GROUPS = ["iperf", "wrk", "idle", "balance"]
#: The figure groups a run measures unless --figures says otherwise (balance is asked for).
DEFAULT_GROUPS = ["iperf", "wrk", "idle"]
#: How many backends the balance figure spreads over (issue 15 asks for 4).
BALANCE_BACKENDS = 4
#: Debian packages of the clients and peers (``--install``).
PEERS = ["iperf3", "wrk", "socat", "haproxy", "nginx-light", "libnginx-mod-stream", "rinetd"]
#: The Python packages of the harness (uvloop for a peer, matplotlib for --plot), for the venv.
REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
#: A name in --only that selects every row of its family (read-size sweep, -w2, diagnostic
#: rows; the asyncio row is named after its loop).
FAMILIES = ("tunnelkit", "asyncio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Loopback benchmark: tunnelkit against direct, twistd portforward, socat, "
        "haproxy, nginx stream, rinetd, asyncio.",
    )
    parser.add_argument(
        "--short", action="store_true", help="1 repetition of 2 s runs: under 2 minutes"
    )
    parser.add_argument("--only", help="comma-separated systems to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    parser.add_argument(
        "--figures",
        default=",".join(DEFAULT_GROUPS),
        help="comma-separated subset of iperf,wrk,idle,balance (default: iperf,wrk,idle)",
    )
    parser.add_argument(
        "--balance",
        default="round-robin",
        choices=sorted(peers.HAPROXY_BALANCE),
        help=f"the balance figure's strategy over {BALANCE_BACKENDS} backends: tunnelkit's "
        "--balance, haproxy's matching 'balance' (default round-robin)",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help=f"apt-get install {' '.join(PEERS)}; pip install -r benchmarks/requirements.txt",
    )
    parser.add_argument("--json", type=Path, help="write every run and the medians to this file")
    parser.add_argument(
        "--plot", type=Path, help="write a PNG of the headline figures (needs matplotlib)"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 5; --short 1)")
    parser.add_argument("--seconds", type=int, help="length of each iperf3/wrk run (default 10)")
    parser.add_argument(
        "--idle-conns", type=int, default=1000, help="idle connections to hold (default 1000)"
    )
    parser.add_argument(
        "--read-size",
        type=int,
        default=DEFAULT_READ_SIZE,
        help="tunnelkit --read-size for the 'tunnelkit' row (default 262144, its default)",
    )
    parser.add_argument(
        "--read-sizes",
        help="sweep: replace the tunnelkit row by one per read size, e.g. 65536,262144,1048576",
    )
    parser.add_argument(
        "--no-write-through",
        action="store_true",
        help="diagnostic: add a tunnelkit row run with --no-write-through",
    )
    parser.add_argument(
        "--no-splice",
        action="store_true",
        help="diagnostic: add a tunnelkit row run with --splice off (the Python relay path)",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="diagnostic: add a tunnelkit row run with --no-access-log (the peers log nothing)",
    )
    parser.add_argument(
        "--file-log",
        action="store_true",
        help="diagnostic: add a tunnelkit row writing its access log with --access-log",
    )
    parser.add_argument(
        "--no-half-close",
        action="store_true",
        help="diagnostic: add tunnelkit rows run with --no-half-close --no-access-log"
        " (nginx stream's close semantics and logging)",
    )
    parser.add_argument(
        "--python-engine",
        action="store_true",
        help="diagnostic: add a tunnelkit row run with --engine python (Twisted's relay path)",
    )
    parser.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="diagnostic: add a tunnelkit row started with GLIBC_TUNABLES (see peers.py)",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=15.0,
        help="repeat a loaded run whose foreign CPU load exceeds this %% of the machine",
    )
    parser.add_argument(
        "--retries", type=int, help="repeats allowed per run for foreign load (default 2; short 0)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each loaded run, wait up to this many s for the machine to be idle "
        "(default 60; short 0)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="stop starting new runs after this long (default 90; short 1.75)",
    )
    args = parser.parse_args(argv)
    short = args.short
    # One repetition in short mode: ten systems x three figure groups already take ~80 s.
    args.reps = args.reps or (1 if short else 5)
    args.seconds = args.seconds or (2 if short else 10)
    args.retries = args.retries if args.retries is not None else (0 if short else 2)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if short else 60.0
    args.max_minutes = args.max_minutes or (1.75 if short else 90.0)
    args.settle = 0.3 if short else 1.0
    if not (1 <= args.reps <= 50 and 1 <= args.seconds <= 600 and 0 <= args.retries <= 5):
        parser.error("--reps 1..50, --seconds 1..600, --retries 0..5")
    if not 1 <= args.idle_conns <= 9000:
        parser.error("--idle-conns 1..9000")
    args.figures = [g.strip() for g in args.figures.split(",") if g.strip()]
    if unknown := set(args.figures) - set(GROUPS):
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    args.read_sizes = [int(x) for x in args.read_sizes.split(",")] if args.read_sizes else None
    return args


def install(packages: list[str] = PEERS) -> None:
    """apt-get the peers (bounded: apt can hang on a lock or a slow mirror)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True, timeout=900)


def install_requirements() -> None:
    """pip-install requirements.txt into the venv that runs this script (bounded too)."""
    cmd = [str(peers.VENV_BIN / "pip"), "install", "-q", "-r", str(REQUIREMENTS)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=900)


def proxies(args: argparse.Namespace) -> list[peers.ProxySpec]:
    """Every system the options describe, before --only and installation checks."""
    return peers.all_proxies(
        args.read_sizes,
        args.read_size,
        no_write_through=args.no_write_through,
        no_splice=args.no_splice,
        no_access_log=args.no_access_log,
        file_log=args.file_log,
        malloc_tuned=args.malloc_tuned,
        python_engine=args.python_engine,
        no_half_close=args.no_half_close,
    )


def select(args: argparse.Namespace) -> tuple[list[peers.ProxySpec], list[str]]:
    """The systems to run, after --only and after dropping those not installed."""
    specs = proxies(args)
    notes = []
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        specs = [
            s
            for s in specs
            if s.name in wanted or any(s.name.startswith(f) and f in wanted for f in FAMILIES)
        ]
        known = {s.name for s in proxies(args)} | set(FAMILIES)
        if unknown := set(wanted) - known:
            raise SystemExit(f"run.py: unknown systems: {', '.join(sorted(unknown))} (see --list)")
    kept = []
    for s in specs:
        if (why := s.unavailable()) is not None:
            notes.append(f"skipped {s.name}: {why}")
        else:
            kept.append(s)
    return kept, notes


def tool_versions(extra: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Versions of the peers (and of ``extra``: name -> command), for the record (each call bounded)."""
    probes = {
        "iperf3": ["iperf3", "--version"],
        "wrk": ["wrk", "--version"],
        "socat": ["socat", "-V"],
        "haproxy": ["haproxy", "-v"],
        "nginx": ["nginx", "-v"],
        "rinetd": ["rinetd", "-v"],
        "twisted": [sys.executable, "-c", "import twisted; print(twisted.__version__)"],
        **(extra or {}),
    }
    if peers.uvloop_importable():
        probes["uvloop"] = [sys.executable, "-c", "import uvloop; print(uvloop.__version__)"]
    out = {}
    for name, cmd in probes.items():
        if shutil.which(cmd[0]) is None:
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (r.stdout + r.stderr).strip().splitlines()
        # The first line with a number: "socat -V" starts with a credits line,
        # "wrk --version" follows its version line with the usage text.
        line = next((t for t in text if any(c.isdigit() for c in t)), text[0] if text else "")
        out[name] = line.strip()
    return out


def git_revision(root: Path) -> str:
    """HEAD's short hash, with ``-dirty`` if tunnelkit/ differs from it (read at the start)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "tunnelkit"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("-dirty" if changes else "")


class Bench:
    """The backends, the run records, and one measurement at a time."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.runs: list[dict[str, Any]] = []
        self.backends: dict[str, peers.Backend] = {}
        self.deadline = time.monotonic() + 60 * args.max_minutes
        self.out_of_time = False

    def backend(self, kind: str) -> peers.Backend:
        """The running backend of ``kind``, (re)started if it is not alive."""
        current = self.backends.get(kind)
        if current is not None and current.proc.alive():
            return current
        if current is not None:
            current.proc.stop()
        starters: dict[str, Callable[[Path], peers.Backend]] = {
            "iperf": peers.start_iperf_server,
            "http": peers.start_http_backend,
            "echo": peers.start_echo_backend,
            "balance": functools.partial(peers.start_balance_backend, ports=BALANCE_BACKENDS),
        }
        self.backends[kind] = starters[kind](self.workdir)
        return self.backends[kind]

    def restart_backend(self, kind: str) -> None:
        """After a failed iperf3 run the server may be stuck mid-test: start a new one."""
        current = self.backends.pop(kind, None)
        if current is not None:
            current.proc.stop()

    def record(
        self, name: str, group: str, rep: int, attempt: int, **fields: Any
    ) -> dict[str, Any]:
        run: dict[str, Any] = {
            "proxy": name,
            "group": group,
            "rep": rep,
            "attempt": attempt,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "ok": True,
            "discarded": False,
            "error": None,
            "figures": {},
        }
        run.update(fields)
        self.runs.append(run)
        return run

    def measured(
        self,
        name: str,
        group: str,
        rep: int,
        measure: Callable[[], dict[str, float]],
    ) -> None:
        """Run ``measure`` and record it; repeat (bounded) while foreign load is too high."""
        for attempt in range(self.args.retries + 1):
            # Memory figures do not suffer from a busy neighbour: no wait for idle runs.
            loaded = group != "idle" and self.args.quiet_wait > 0
            quiet = wait_quiet(self.args.quiet_wait) if loaded else None
            figures = measure()
            if quiet is not None:
                figures["busy_before_pct"] = quiet
            run = self.record(name, group, rep, attempt, figures=figures)
            foreign = figures.get("foreign_pct", 0.0)
            progress(name, group, rep, figures)
            if foreign <= self.args.max_foreign or attempt == self.args.retries:
                return
            run["discarded"] = True
            print(f"    foreign load {foreign:.0f} % > {self.args.max_foreign:g} %: repeating")

    def one(self, spec: peers.ProxySpec, group: str, rep: int) -> None:
        """Start the proxy in front of the group's backend, check it forwards, measure, stop it."""
        kind = {"iperf": "iperf", "wrk": "http", "idle": "echo"}[group]
        backend = self.backend(kind)
        running: peers.Running | None = None
        try:
            running = peers.require_started(spec.start(backend.port, self.workdir))
            seconds = self.args.seconds
            if group == "iperf":
                loads.check_iperf(running.port)
                self.measured(
                    spec.name,
                    "iperf",
                    rep,
                    functools.partial(loads.measure_iperf, running, backend.proc.pid, seconds),
                )
            elif group == "wrk":
                loads.check_http(running.port)
                for sub, close in (("wrk_ka", False), ("wrk_close", True)):
                    self.measured(
                        spec.name,
                        sub,
                        rep,
                        functools.partial(
                            loads.measure_wrk, running, backend.proc.pid, seconds, close
                        ),
                    )
            else:
                loads.check_echo(running.port)
                self.measured(
                    spec.name,
                    "idle",
                    rep,
                    functools.partial(
                        loads.measure_idle, running, self.args.idle_conns, self.args.settle
                    ),
                )
        except (BenchError, OSError) as e:
            subs = ("wrk_ka", "wrk_close") if group == "wrk" else (group,)
            self.failed(spec.name, group, subs, rep, e)
            if group == "iperf":
                self.restart_backend("iperf")
        finally:
            if running is not None:
                running.stop()

    def failed(self, name: str, group: str, subs: tuple[str, ...], rep: int, e: Exception) -> None:
        """Say why a measurement failed, and record a failed run for each ``subs`` not recorded."""
        message = str(e).strip()
        print(f"  FAILED {name} {group} rep {rep}: {message[:2000]}", flush=True)
        done = {(r["proxy"], r["group"], r["rep"]) for r in self.runs}
        for sub in subs:
            if (name, sub, rep) not in done:
                self.record(name, sub, rep, 0, ok=False, error=message[:2000])

    def one_balance(self, row: peers.BalanceRow, rep: int) -> None:
        """Start the row's system in front of its share of the balance backend's ports, measure."""
        backend = self.backend("balance")
        ports = backend.ports[: row.backends]
        running: peers.Running | None = None
        try:
            running = peers.require_started(row.start(ports, self.workdir))
            loads.check_http(running.port)
            self.measured(
                row.name,
                "balance",
                rep,
                functools.partial(
                    loads.measure_balance, running, backend, ports, self.args.seconds
                ),
            )
        except (BenchError, OSError) as e:
            self.failed(row.name, "balance", ("balance",), rep, e)
        finally:
            if running is not None:
                running.stop()

    def run(self, specs: list[peers.ProxySpec], balance: list[peers.BalanceRow]) -> None:
        """Every repetition: for each figure group, every proxy (or balance row) once, in a
        rotated order."""
        groups = [g for g in GROUPS if g in self.args.figures]
        for rep in range(self.args.reps):
            for group in groups:
                steps: list[tuple[str, Callable[[], None]]]
                if group == "balance":
                    steps = [(r.name, functools.partial(self.one_balance, r, rep)) for r in balance]
                else:
                    steps = [
                        (s.name, functools.partial(self.one, s, group, rep))
                        for s in specs
                        if not (group == "idle" and s.name == "direct")
                    ]
                shift = rep % len(steps)
                for name, step in steps[shift:] + steps[:shift]:
                    if time.monotonic() > self.deadline:
                        if not self.out_of_time:
                            print(
                                f"time limit of {self.args.max_minutes:g} min reached: "
                                "reporting what was measured"
                            )
                        self.out_of_time = True
                        return
                    print(f"[rep {rep + 1}/{self.args.reps}] {group} {name}", flush=True)
                    step()

    def stop(self) -> None:
        for b in self.backends.values():
            b.proc.stop()
        self.backends.clear()


def progress(name: str, group: str, rep: int, f: dict[str, float]) -> None:
    """One line per measurement, so a long run shows where it is and what it sees."""
    if group == "iperf":
        eff = f.get("mb_per_cpu_s")
        what = f"{f['gbit_s']:.2f} Gbit/s" + (f", {eff:,.0f} MB/CPU-s" if eff else "")
    elif group.startswith("wrk") or group == "balance":
        what = f"{f['rps']:,.0f} req/s, p99 {f.get('p99_ms', 0):.2f} ms, errors {f['socket_errors']:.0f}"
    else:
        what = (
            f"{f['rss_kb_per_conn']:.1f} KB RSS/conn ({f['pss_kb_per_conn']:.1f} PSS), "
            f"idle {f['idle_rss_mb']:.1f} MB"
        )
        print(f"    {group}: {what}", flush=True)
        return
    print(
        f"    {group}: {what} (proxy CPU {f['proxy_cpu_pct']:.0f} %, "
        f"foreign {f['foreign_pct']:.0f} %, steal {f['steal_pct']:.1f} %)",
        flush=True,
    )


def usable_groups(args: argparse.Namespace, nofile: int, notes: list[str]) -> list[str]:
    """The figure groups asked for whose client tools are installed and whose limits allow."""
    groups = list(args.figures)
    for group, tool in (
        ("iperf", "iperf3"),
        ("wrk", "wrk"),
        ("balance", "wrk"),
        ("balance", "nginx"),
    ):
        if group in groups and shutil.which(tool) is None:
            notes.append(f"skipped figure {group}: {tool} not installed (try --install)")
            groups.remove(group)
    if "idle" in groups and nofile < 2 * args.idle_conns + 100:
        notes.append(f"skipped figure idle: RLIMIT_NOFILE {nofile} is too low")
        groups.remove("idle")
    return groups


def environment(
    args: argparse.Namespace,
    *,
    source_hash: str,
    revision: str,
    started: dt.datetime,
    elapsed: float,
    specs: list[peers.ProxySpec],
    http_backend: str | None,
    notes: list[str],
    nofile: int,
) -> dict[str, Any]:
    """What a reader needs to judge the figures: when, where, with which versions and settings."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}",
        "python": platform.python_version(),
        "tunnelkit_revision": revision,
        "tunnelkit_sources_sha256": source_hash,
        "tools": tool_versions(),
        "http_backend": http_backend,
        "reps": args.reps,
        "seconds": args.seconds,
        "idle_conns": args.idle_conns,
        "read_size": args.read_size,
        "read_sizes": args.read_sizes,
        "balance": args.balance,
        "balance_backends": BALANCE_BACKENDS,
        "max_foreign_pct": args.max_foreign,
        "retries": args.retries,
        "quiet_wait_s": args.quiet_wait,
        "rlimit_nofile": nofile,
        "notes": notes,
        "commands": {s.name: s.note for s in specs},
    }


def write_outputs(
    args: argparse.Namespace,
    bench: Bench,
    env: dict[str, Any],
    names: list[str],
    balance: list[peers.BalanceRow],
) -> None:
    """The --json record and the --plot picture, from the same medians as the tables."""
    summary = report.summarize(bench.runs, names)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": env,
            "summary": summary,
            "balance": report.balance_summary(bench.runs, balance) if balance else None,
            "runs": bench.runs,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"\nraw results: {args.json}")
    if args.plot:
        plot.write_plot(
            summary,
            names,
            args.plot,
            date=dt.datetime.fromisoformat(env["date"]).strftime("%Y-%m-%d %H:%M UTC"),
            reps=args.reps,
            seconds=args.seconds,
            notes=plot_notes(env, bench.out_of_time),
        )
        print(f"plot: {args.plot}")


def plot_notes(env: dict[str, Any], out_of_time: bool) -> list[str]:
    """The lines of the plot's legend cell that say where and how the figures were taken."""
    notes = [env["machine"], f"tunnelkit {env['tunnelkit_revision']}"]
    if env["http_backend"]:
        notes.append(f"HTTP backend: {env['http_backend'].split(',')[0]}")
    notes += [n for n in env["notes"] if n.startswith("skipped")]
    if out_of_time:
        notes.append("stopped early at the time limit")
    return notes


def install_signal_handlers() -> None:
    """Whatever ends the runner (Ctrl-C, SIGTERM, an exception) stops what it started."""
    atexit.register(stop_all)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in proxies(args):
            print(f"{s.name:16} {s.note}")
        return 0
    if args.install:
        install()
        install_requirements()
    nofile = raise_nofile()
    specs, notes = select(args)
    if not specs:
        raise SystemExit("run.py: nothing to run")
    groups = args.figures = usable_groups(args, nofile, notes)
    if args.plot and (why := plot.unavailable()) is not None:
        # Said now, not after a 25-minute run.
        notes.append(f"no plot: {why}")
        args.plot = None
    for n in notes:
        print(n)
    install_signal_handlers()
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunnelkit-bench-") as tmp:
        revision = git_revision(ROOT)
        source_hash = peers.snapshot_tunnelkit(ROOT / "tunnelkit", Path(tmp))
        print(f"tunnelkit sources ({revision}) copied for this run, sha256 {source_hash}")
        bench = Bench(args, Path(tmp))
        balance = (
            peers.balance_rows(specs, args.balance, BALANCE_BACKENDS) if "balance" in groups else []
        )
        try:
            bench.run(specs, balance)
        finally:
            http = bench.backends.get("http") or bench.backends.get("balance")
            http_backend = http.description if http else None
            bench.stop()
            stop_all()
    elapsed = time.monotonic() - t0
    env = environment(
        args,
        source_hash=source_hash,
        revision=revision,
        started=started,
        elapsed=elapsed,
        specs=specs,
        http_backend=http_backend,
        notes=notes,
        nofile=nofile,
    )
    names = [s.name for s in specs]
    report_groups = [g for g in report.HEADLINE_GROUPS if g.split("_")[0] in groups]
    print()
    print(
        f"# tunnelkit loopback benchmark, {env['date']} ({env['machine']}), "
        f"{args.reps} reps x {args.seconds} s, {elapsed / 60:.1f} min"
    )
    if http_backend:
        print(f"HTTP backend: {http_backend}")
    if bench.out_of_time:
        print(f"NOTE: stopped early at the {args.max_minutes:g} min limit")
    print()
    print(report.render(bench.runs, names, report_groups, balance))
    write_outputs(args, bench, env, names, balance)
    return 1 if any(not r["ok"] for r in bench.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
