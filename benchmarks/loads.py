"""The measurements: iperf3 bulk, wrk HTTP, idle connections, and the forwarding checks.

Each measurement returns a flat dict of figures (JSON-ready). Around every
loaded run the proxy's CPU time (its process tree, from /proc) and the whole
machine's busy time are read, so that each figure comes with the proxy CPU it
cost and with an estimate of *foreign* load: CPU used by processes that are
not part of the benchmark (this machine can be shared; a run with much foreign
load measures the neighbour, not the proxy).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers import BODY, BODY_PATH, Backend, Running
from procs import (
    BenchError,
    MachineTimes,
    children_cpu,
    cpu_seconds,
    kernel_threads_cpu,
    machine_shares,
    memory,
    run_bounded,
    self_cpu,
    settle_children,
)

NCPU = os.cpu_count() or 1

#: Bytes of the iperf3 transfer that proves a proxy forwards to the iperf3 server.
IPERF_CHECK_BYTES = 64 << 20


# -- forwarding checks ---------------------------------------------------


def check_http(port: int, timeout: float = 5.0) -> None:
    """One GET through the proxy; the 1 KiB body must arrive intact."""
    request = (f"GET {BODY_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").encode()
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks)
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or body != BODY:
        raise BenchError(f"HTTP check through port {port} failed: {reply[:200]!r}")


def check_echo(port: int, timeout: float = 5.0) -> None:
    """One byte there and back through the proxy to the echo backend."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"!")
        if sock.recv(1) != b"!":
            raise BenchError(f"echo check through port {port} failed")


def check_iperf(port: int, timeout: float = 20.0) -> None:
    """A short iperf3 transfer through the proxy must complete and mostly arrive.

    iperf3's receiver stops counting when the sender says it is done, so what
    is still buffered in the proxy is not counted: the check asks for all of
    it sent and half of it received, which no broken forwarder can fake.
    """
    result = run_bounded(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", str(IPERF_CHECK_BYTES), "--json"],
        timeout,
    )
    data = _iperf_json(result.stdout, result.stderr)
    sent = data["end"]["sum_sent"]["bytes"]
    received = data["end"]["sum_received"]["bytes"]
    if sent < IPERF_CHECK_BYTES or received < IPERF_CHECK_BYTES // 2:
        raise BenchError(f"iperf3 check through port {port}: {sent} B sent, {received} B arrived")


# -- windows of CPU accounting ---------------------------------------------


@dataclass
class Window:
    """CPU readings around one loaded run: proxy, backend, clients, runner, machine."""

    proxy_pid: int | None
    backend_pid: int
    #: The proxy's resident worker processes (not waited for: they never exit).
    workers: int = 0
    t: float = 0.0
    proxy: float = 0.0
    backend: float = 0.0
    clients: float = 0.0
    runner: float = 0.0
    kthreads: float = 0.0
    machine: MachineTimes | None = None

    def start(self) -> Window:
        if self.proxy_pid is not None:
            settle_children(self.proxy_pid, timeout=3.0, at_most=self.workers)
            self.proxy = cpu_seconds(self.proxy_pid)
        self.backend = cpu_seconds(self.backend_pid)
        self.clients = children_cpu()
        self.runner = self_cpu()
        self.kthreads = kernel_threads_cpu()
        self.machine = MachineTimes.read()
        self.t = time.monotonic()
        return self

    def finish(self) -> dict[str, float]:
        """Figures of the window: wall time, CPU seconds, busy/steal/foreign shares."""
        wall = time.monotonic() - self.t
        assert self.machine is not None
        machine = MachineTimes.read()
        proxy = 0.0
        if self.proxy_pid is not None:
            proxy = cpu_seconds(self.proxy_pid) - self.proxy
        backend = cpu_seconds(self.backend_pid) - self.backend
        clients = children_cpu() - self.clients
        runner = self_cpu() - self.runner
        kthreads = kernel_threads_cpu() - self.kthreads
        busy, steal = machine_shares(self.machine, machine)
        known = 100.0 * (proxy + backend + clients + runner + kthreads) / (wall * NCPU)
        return {
            "wall_s": wall,
            "proxy_cpu_s": proxy,
            "proxy_cpu_pct": 100.0 * proxy / wall,
            "backend_cpu_pct": 100.0 * backend / wall,
            "client_cpu_pct": 100.0 * clients / wall,
            "kthreads_cpu_pct": 100.0 * kthreads / wall,
            "busy_pct": busy,
            "steal_pct": steal,
            "foreign_pct": busy - known,
        }


def _after_client(running: Running) -> None:
    # socat's per-connection children exit (and are reaped) shortly after the
    # client is done; their CPU is only in the parent's totals after that.
    if running.proc is not None:
        settle_children(running.proc.pid, timeout=3.0, at_most=running.workers)


def _window(running: Running, backend_pid: int) -> Window:
    """A started CPU window around a client run through ``running``."""
    pid = running.proc.pid if running.proc else None
    return Window(pid, backend_pid, workers=running.workers).start()


# -- iperf3 ----------------------------------------------------------------


def _iperf_json(stdout: str, stderr: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(stdout)
    except ValueError as e:
        raise BenchError(f"iperf3 gave no JSON: {stdout[-500:]} {stderr[-500:]}") from e
    if data.get("error"):
        raise BenchError(f"iperf3: {data['error']}")
    return data


def measure_iperf(running: Running, backend_pid: int, seconds: int) -> dict[str, float]:
    """Single-stream iperf3 client -> proxy -> iperf3 server; Gbit/s and MB per proxy CPU-s."""
    window = _window(running, backend_pid)
    result = run_bounded(
        ["iperf3", "-c", "127.0.0.1", "-p", str(running.port), "-t", str(seconds), "--json"],
        seconds + 30,
    )
    _after_client(running)
    figures = window.finish()
    data = _iperf_json(result.stdout, result.stderr)
    received = data["end"]["sum_received"]
    mbytes = received["bytes"] / 1e6
    figures["gbit_s"] = received["bits_per_second"] / 1e9
    figures["mbytes"] = mbytes
    if running.proc is not None:
        figures["mb_per_cpu_s"] = mbytes / max(figures["proxy_cpu_s"], 1e-9)
    return figures


# -- wrk -------------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in", re.M)
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> dict[str, float]:
    """Requests/s, request count, p50/p99 latency (ms) and error counts from wrk's report."""
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    if rps is None or total is None:
        raise BenchError(f"wrk output not understood:\n{text[-1500:]}")
    figures = {"rps": float(rps[1]), "requests": float(total[1])}
    for pct, value, unit in _PERCENTILE.findall(text):
        figures[f"p{pct}_ms"] = float(value) * _UNIT[unit]
    errors = _ERRORS.search(text)
    figures["socket_errors"] = float(sum(int(x) for x in errors.groups())) if errors else 0.0
    non2xx = _NON2XX.search(text)
    figures["non_2xx"] = float(non2xx[1]) if non2xx else 0.0
    return figures


def measure_wrk(
    running: Running, backend_pid: int, seconds: int, close: bool, connections: int = 50
) -> dict[str, float]:
    """wrk -t2 -c50 for ``seconds`` through the proxy; keep-alive, or a new connection per request."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{running.port}{BODY_PATH}")
    window = _window(running, backend_pid)
    result = run_bounded(argv, seconds + 30)
    _after_client(running)
    figures = window.finish()
    figures.update(parse_wrk(result.stdout))
    if running.proc is not None:
        figures["req_per_cpu_s"] = figures["requests"] / max(figures["proxy_cpu_s"], 1e-9)
    return figures


# -- balance ---------------------------------------------------------------


#: nginx writes its buffered log at most this long after a line entered the buffer
#: (``flush=1s``), plus a margin: a log that has not grown for this long is complete.
LOG_QUIET_S = 1.3


def measure_balance(
    running: Running, backend: Backend, ports: Sequence[int], seconds: int
) -> dict[str, float]:
    """New connections per second (wrk, ``Connection: close``) and how ``ports`` shared them.

    The backend logs the port of every request it served; the lines written
    during the run give each port's share (``share_min_pct`` and
    ``share_max_pct``: 25 and 25 is an even spread over 4), so a proxy that
    sends everything to one backend cannot pass for balancing. ``served``
    (all logged requests) should be at least wrk's count; ``served_elsewhere``
    (by ports the row does not use) should be 0. Waiting for the log to be
    written costs about 2.6 s per run, outside the measured window.
    """
    log = backend.served_log
    if log is None:
        raise BenchError("the balance figure needs a backend that logs the serving port")
    # The check's request and the end of the previous run are in the log before the count starts.
    offset = quiet_size(log)
    figures = measure_wrk(running, backend.proc.pid, seconds, close=True)
    counts = served_since(log, offset)
    served = [counts[p] for p in ports]
    total = sum(counts.values())
    figures["served"] = float(total)
    figures["served_elsewhere"] = float(total - sum(served))
    figures["share_min_pct"] = 100.0 * min(served) / total if total else 0.0
    figures["share_max_pct"] = 100.0 * max(served) / total if total else 0.0
    return figures


def served_since(log: Path, offset: int) -> Counter[int]:
    """Requests per port logged after ``offset``, once nginx has written them all."""
    end = quiet_size(log)
    with log.open("rb") as f:
        f.seek(offset)
        return Counter(int(line) for line in f.read(end - offset).split())


def quiet_size(log: Path, timeout: float = 10.0) -> int:
    """The log's size once it has not grown for :data:`LOG_QUIET_S` (its buffer is written)."""
    deadline = time.monotonic() + timeout
    size, since = log.stat().st_size, time.monotonic()
    while time.monotonic() - since < LOG_QUIET_S:
        if time.monotonic() > deadline:
            raise BenchError(
                f"{log} still growing after {timeout:g} s: is something else loading the backend?"
            )
        time.sleep(0.1)
        if (now := log.stat().st_size) != size:
            size, since = now, time.monotonic()
    return size


# -- idle connections --------------------------------------------------------


def measure_idle(
    running: Running, count: int, settle: float, deadline_s: float = 120.0
) -> dict[str, float]:
    """Open ``count`` connections through the proxy, prove each with an echo, hold them idle.

    Memory is read before (after one checked connection has come and gone)
    and ``settle`` seconds after the last connection is up; the difference
    divided by ``count`` is the per-connection cost.
    """
    if running.proc is None:
        raise BenchError("idle connections need a proxy process")
    pid = running.proc.pid
    settle_children(pid, timeout=5.0, at_most=running.workers)
    time.sleep(0.2)
    before = memory(pid)
    cpu_before = cpu_seconds(pid)
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        for i in range(count):
            if time.monotonic() - started > deadline_s:
                raise BenchError(f"only {i} of {count} idle connections within {deadline_s:g} s")
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            socks.append(sock)
            sock.sendall(b".")
            if sock.recv(1) != b".":
                raise BenchError(f"idle connection {i}: no echo")
        opened = time.monotonic() - started
        time.sleep(settle)
        if not running.proc.alive():
            raise BenchError(f"{running.name} died holding connections\n{running.proc.output()}")
        after = memory(pid)
        setup_cpu = cpu_seconds(pid) - cpu_before
    finally:
        for sock in socks:
            sock.close()
    settle_children(pid, timeout=10.0, at_most=running.workers)
    return {
        "connections": float(count),
        "idle_rss_mb": before.rss_kb / 1024,
        "idle_pss_mb": before.pss_kb / 1024,
        "held_rss_mb": after.rss_kb / 1024,
        "rss_kb_per_conn": (after.rss_kb - before.rss_kb) / count,
        "pss_kb_per_conn": (after.pss_kb - before.pss_kb) / count,
        "processes_held": float(after.processes),
        "open_s": opened,
        "setup_cpu_ms_per_conn": 1000.0 * setup_cpu / count,
    }
