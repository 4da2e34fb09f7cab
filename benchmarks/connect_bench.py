"""Compare HTTP CONNECT proxies on loopback: tunnelkit, tinyproxy and squid.

Why this exists: ``run.py`` compares tunnelkit's *forward* mode with other
forwarders. A CONNECT proxy pays more per tunnel (read and parse a request
head, check the target policy, dial the target, answer ``200``) and those
figures do not show it, so this script measures CONNECT mode against the two
CONNECT proxies people actually run, in one run, on the same machine:

a) tunnels per second: K concurrent clients in an asyncio client process,
   each in a loop: connect to the proxy, ``CONNECT 127.0.0.1:T``, read the
   ``200``, send 1 KiB, read its echo from an echo target, close; for S
   seconds. Reported with the proxy's CPU microseconds per tunnel.
b) bulk: one tunnel, 1 GiB (512 MiB with ``--short``) sent with large
   ``sendall`` calls to a sink target that discards it and acknowledges the
   last byte (upload), and the same amount read from a source target
   (download). Reported as MB/s and MB per proxy CPU-second.

Proxy CPU is user + system time from /proc, summed over the proxy's process
tree (``procs.cpu_seconds``), read before and after each figure. Proxies are
run in a different order in every repetition (so slow drift on a shared
machine does not always hit the same one), and medians are reported with
ratios against tunnelkit. Each proxy must tunnel one echo round trip before it
is measured; a proxy that cannot is skipped with the reason.

Fairness: every proxy writes one log line per tunnel into the run's temp dir
(tunnelkit's ``tunnel_closed`` event, squid's access log, tinyproxy at
``LogLevel Connect``); squid has no cache (``cache deny all``, no
``cache_dir``). tinyproxy fsyncs its log after every line, which makes that
line cost a disk round trip, so a second row, ``tinyproxy-quiet`` (no line per
tunnel), shows the proxy without it. Nothing is written outside the temp dir,
and nothing is sent anywhere but 127.0.0.1 (squid's resolver is pointed at
127.0.0.1 too).

What limited each figure is guessed from the CPU shares the client reads over
its active time (proxy, client, targets, whole machine): on a 2-core machine
the Python client and targets can be what stops a fast proxy, and the table
says so rather than crediting the proxy.

Usage (from the repository root, with the venv that has twistd)::

    .venv/bin/python benchmarks/connect_bench.py --install   # apt-get tinyproxy squid (root)
    .venv/bin/python benchmarks/connect_bench.py --short     # under 2 minutes
    .venv/bin/python benchmarks/connect_bench.py --output benchmarks/results/connect.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peers import listening, twistd_argv
from procs import (
    CLK_TCK,
    START_TIMEOUT,
    BenchError,
    MachineTimes,
    Proc,
    cpu_seconds,
    free_port,
    raise_nofile,
    stop_all,
    wait_quiet,
)

#: The interpreter running the benchmark; its venv has twistd and tunnelkit.
VENV_BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent

#: Bytes per tunnel in the tunnels/s figure (sent, then read back from the echo target).
PAYLOAD = 1024
#: Size of one ``sendall``/``recv_into`` in the bulk client and the sink/source targets.
CHUNK = 4 * 1024 * 1024
#: Longest a single tunnel of the tunnels/s figure may take before it counts as failed.
TUNNEL_TIMEOUT = 10.0
#: Socket timeout of every blocking operation of the bulk client and targets.
IO_TIMEOUT = 30.0
#: Hard bound on one bulk transfer (the client process is killed past it).
BULK_TIMEOUT = 180.0
#: A client that sees this many failed tunnels stops early: the figure is void anyway.
MAX_FAILURES = 200
#: Upper bound on tunnels per client worker (a loop bound on top of the time bound).
MAX_TUNNELS_PER_WORKER = 10_000_000
#: Longest request head a client or the check accepts from a proxy.
MAX_HEAD = 16 * 1024
#: A process at or above this share of one core is called saturated.
SATURATED = 0.85

_TARGETS_LINE = re.compile(r"targets echo=(\d+) sink=(\d+) source=(\d+)")
_TWISTED_PORT = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


# =====================================================================
# Targets (run in their own process: ``--role targets``)
# =====================================================================


class EchoProtocol(asyncio.Protocol):
    """Writes back what it reads; closes on EOF (the default ``eof_received``).

    asyncio rather than threads: the tunnels/s figure opens thousands of short
    connections per second, and one event loop handles them with far less CPU
    than a thread per connection, so the target is not the bottleneck.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def read_length(sock: socket.socket) -> tuple[int, bytes]:
    """Read the decimal byte count line that opens a bulk connection; return it and what followed.

    The client says how much it will send (sink) or wants (source), so the
    sink can acknowledge the last byte and the upload figure measures bytes
    that arrived, not bytes that sit in socket buffers.
    """
    data = b""
    while b"\n" not in data:
        if len(data) > 64:
            raise ValueError("no length line in the first 64 bytes")
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError("closed before the length line")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return int(line), rest


class SinkHandler(socketserver.BaseRequestHandler):
    """Discards N bytes with large ``recv_into`` calls, then answers ``ok``.

    A blocking thread per connection: the bulk figure has one connection at a
    time, and a plain ``recv_into`` loop into a reused buffer costs the least
    CPU per byte that Python can offer.
    """

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IO_TIMEOUT)
        with contextlib.suppress(OSError, ValueError):
            total, rest = read_length(sock)
            got = len(rest)
            view = memoryview(bytearray(CHUNK))
            while got < total:
                n = sock.recv_into(view)
                if n == 0:
                    return
                got += n
            sock.sendall(b"ok\n")
            sock.recv(1)  # until the client closes (bounded by the timeout)


class SourceHandler(socketserver.BaseRequestHandler):
    """Sends the N bytes asked for in large ``sendall`` calls, then waits for the close."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IO_TIMEOUT)
        with contextlib.suppress(OSError, ValueError):
            total, _ = read_length(sock)
            block = memoryview(bytes(CHUNK))
            sent = 0
            while sent < total:
                n = min(CHUNK, total - sent)
                sock.sendall(block[:n])
                sent += n
            sock.recv(1)


class _ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


async def serve_targets(lifetime: float) -> None:
    """Run the echo, sink and source targets on kernel-chosen ports until SIGTERM.

    ``lifetime`` bounds how long an orphaned target process can outlive a
    runner that died without stopping it.
    """
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(EchoProtocol, "127.0.0.1", 0, backlog=4096)
    threaded = [
        _ThreadingServer(("127.0.0.1", 0), SinkHandler),
        _ThreadingServer(("127.0.0.1", 0), SourceHandler),
    ]
    for server in threaded:
        threading.Thread(target=server.serve_forever, args=(0.5,), daemon=True).start()
    ports = [echo.sockets[0].getsockname()[1]] + [s.server_address[1] for s in threaded]
    print("targets echo={} sink={} source={}".format(*ports), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    echo.close()
    for server in threaded:
        server.shutdown()
        server.server_close()


# =====================================================================
# Clients (run in their own process: ``--role tunnels|upload|download``)
# =====================================================================


class TunnelFailed(Exception):
    """One tunnel of the tunnels/s figure did not complete its echo."""


def first_line(head: bytes) -> bytes:
    """The status line of a response head (for error messages)."""
    return head.split(b"\r\n", 1)[0]


def status_of(head: bytes) -> bytes:
    """The status code of a response head (``b""`` if it has none)."""
    parts = first_line(head).split(None, 2)
    return parts[1] if len(parts) >= 2 else b""


class OneTunnel(asyncio.Protocol):
    """One tunnel: CONNECT, wait for 200, send the payload, count its echo, close.

    A protocol (not streams) because the client must not be the bottleneck:
    callbacks avoid the per-read task switches and buffer copies of
    ``asyncio.StreamReader``.
    """

    def __init__(self, request: bytes, payload: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.payload = payload
        self.done = done
        self.head = b""
        self.in_tunnel = False
        self.echoed = 0
        self.transport: asyncio.Transport | None = None

    def itself(self) -> OneTunnel:
        """The protocol factory for ``create_connection`` (the protocol exists first)."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.in_tunnel:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self._fail("response head too long")
                return
            if status_of(self.head) != b"200":
                self._fail(f"proxy answered {first_line(self.head)!r}")
                return
            self.in_tunnel = True
            data = self.head[end + 4 :]
            self.transport.write(self.payload)
        self.echoed += len(data)
        if self.echoed >= len(self.payload):
            if not self.done.done():
                self.done.set_result(None)
            self.transport.close()

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(TunnelFailed(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                TunnelFailed(f"closed after {self.echoed} echoed bytes ({exc or 'EOF'})")
            )


class Meter:
    """CPU readings over a client's active period: its own, the watched processes', the machine's.

    The client takes them itself, at its first byte and its last, so every
    share covers exactly the measured time: a 1 GiB bulk run lasts about half
    a second, and readings taken by the runner around the whole client process
    would dilute it with interpreter start-up.
    """

    def __init__(self, watch: Sequence[int]) -> None:
        self.watch = list(watch)
        self.start = time.monotonic()
        self.cpu = time.process_time()
        self.watched = [cpu_seconds(pid) for pid in self.watch]
        self.machine = MachineTimes.read()

    def result(self) -> dict[str, Any]:
        """Elapsed seconds and CPU seconds since construction (``watched`` in ``watch`` order)."""
        elapsed = time.monotonic() - self.start
        return {
            "elapsed": elapsed,
            "cpu": time.process_time() - self.cpu,
            "watched": [cpu_seconds(p) - c for p, c in zip(self.watch, self.watched, strict=True)],
            "busy": (MachineTimes.read().busy - self.machine.busy) / CLK_TCK,
        }


async def run_tunnels(
    port: int, target: int, concurrency: int, seconds: float, watch: Sequence[int]
) -> dict[str, Any]:
    """Open tunnels from ``concurrency`` workers for ``seconds``; count them, read the CPU."""
    loop = asyncio.get_running_loop()
    request = f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n\r\n".encode()
    payload = bytes(i % 251 for i in range(PAYLOAD))
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    meter = Meter(watch)
    deadline = meter.start + seconds

    async def worker() -> None:
        for _ in range(MAX_TUNNELS_PER_WORKER):
            if time.monotonic() >= deadline or counts["failed"] >= MAX_FAILURES:
                return
            done: asyncio.Future[None] = loop.create_future()
            proto = OneTunnel(request, payload, done)
            try:
                async with asyncio.timeout(TUNNEL_TIMEOUT):
                    await loop.create_connection(proto.itself, "127.0.0.1", port)
                    await done
                counts["ok"] += 1
            except (OSError, TimeoutError, TunnelFailed) as e:
                counts["failed"] += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
                if proto.transport is not None:
                    proto.transport.abort()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"ok": counts["ok"], "failed": counts["failed"], "errors": errors, **meter.result()}


def open_tunnel(port: int, target: int, timeout: float = IO_TIMEOUT) -> tuple[socket.socket, bytes]:
    """Connect to the proxy, CONNECT to 127.0.0.1:``target``; return the socket and early bytes.

    Raises :class:`BenchError` with the proxy's status line if it does not
    answer 200, so a misconfigured proxy is reported, not measured.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(
            f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError(f"proxy closed before answering CONNECT (got {head[:200]!r})")
            head += chunk
            if len(head) > MAX_HEAD:
                raise BenchError("proxy's response head is over 16 KiB")
        head, _, rest = head.partition(b"\r\n\r\n")
        if status_of(head) != b"200":
            raise BenchError(f"proxy answered {first_line(head)!r}")
        return sock, rest
    except BaseException:
        sock.close()
        raise


def run_upload(port: int, sink: int, total: int, watch: Sequence[int]) -> dict[str, Any]:
    """Send ``total`` bytes through one tunnel to the sink; time until the sink's ``ok``."""
    sock, _ = open_tunnel(port, sink)
    with sock:
        block = memoryview(bytes(CHUNK))
        meter = Meter(watch)
        sock.sendall(b"%d\n" % total)
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            sock.sendall(block[:n])
            sent += n
        answer = b""
        while b"\n" not in answer and len(answer) < 64:
            chunk = sock.recv(64)
            if not chunk:
                break
            answer += chunk
        result = meter.result()
        if answer != b"ok\n":
            raise BenchError(f"sink did not acknowledge {total} bytes (got {answer!r})")
        return {"bytes": total, **result}


def run_download(port: int, source: int, total: int, watch: Sequence[int]) -> dict[str, Any]:
    """Read ``total`` bytes from the source through one tunnel with large ``recv_into`` calls."""
    sock, early = open_tunnel(port, source)
    with sock:
        view = memoryview(bytearray(CHUNK))
        meter = Meter(watch)
        sock.sendall(b"%d\n" % total)
        got = len(early)
        while got < total:
            n = sock.recv_into(view)
            if n == 0:
                raise BenchError(f"source tunnel closed after {got} of {total} bytes")
            got += n
        return {"bytes": got, **meter.result()}


def client_main(args: argparse.Namespace) -> None:
    """Entry point of a client process: run one figure, print its result as one JSON line."""
    watch = [int(p) for p in args.watch.split(",") if p]
    if args.role == "tunnels":
        result = asyncio.run(
            run_tunnels(args.port, args.target, args.concurrency, args.seconds, watch)
        )
    elif args.role == "upload":
        result = run_upload(args.port, args.target, args.bytes, watch)
    else:
        result = run_download(args.port, args.target, args.bytes, watch)
    print(json.dumps(result), flush=True)


# =====================================================================
# Proxies
# =====================================================================


@dataclass
class Running:
    """A started proxy: its name, the port it listens on and its process."""

    name: str
    port: int
    proc: Proc


@dataclass(frozen=True)
class ProxySpec:
    """How to start one proxy under test, and what must be installed for it."""

    name: str
    binary: str
    start: Callable[[Path, int], Running]
    config: str
    #: The figures this proxy takes part in (empty: all of them).
    figures: tuple[str, ...] = ()
    #: Printed under the tables when this proxy ran: what a reader needs to read its row.
    remark: str = ""


def _wait_listening(proc: Proc, port: int) -> None:
    proc.wait_for(lambda: listening(port), f"listener on 127.0.0.1:{port}", START_TIMEOUT)


def tunnelkit_starter(mode: str) -> Callable[[Path, int], Running]:
    """How to start tunnelkit in ``mode`` (connect, or auto: the same clients after a peek)."""
    return lambda workdir, serial: start_tunnelkit(workdir, serial, mode)


def start_tunnelkit(workdir: Path, serial: int, mode: str) -> Running:
    """twistd tunnelkit --mode MODE on port 0; the port is read from its log."""
    tag = f"tunnelkit-{mode}-{serial}"
    twistd = VENV_BIN / "twistd"
    if not twistd.exists():
        raise BenchError(f"{twistd} not found: run this script with the venv's python")
    argv = twistd_argv(
        workdir,
        tag,
        "tunnelkit",
        "--mode",
        mode,
        "--listen",
        "127.0.0.1:0",
        "--allow-dest",
        "127.0.0.0/8",
        # Stop within a second on SIGTERM (the default lets tunnels drain for 30 s).
        "--drain-timeout",
        "1",
    )
    proc = Proc("tunnelkit", argv, workdir / f"{tag}.out", app_log=workdir / f"{tag}.twistd.log")

    def found() -> int | None:
        m = _TWISTED_PORT.search(proc.output(limit=1 << 20))
        return int(m[1]) if m else None

    port = proc.wait_for(found, "listening port in its log", START_TIMEOUT)
    assert isinstance(port, int)
    return Running("tunnelkit" if mode == "connect" else f"tunnelkit-{mode}", port, proc)


def tinyproxy_config(port: int, workdir: Path, log_level: str = "Connect") -> str:
    """A minimal tinyproxy config: loopback only, CONNECT to every port (no ``ConnectPort``).

    Without any ``ConnectPort`` line tinyproxy allows CONNECT to all ports.
    ``LogLevel Connect`` logs one line per connection, like the others;
    tinyproxy fsyncs its log file after every line, so ``Warning`` (no line
    per connection) is offered too, to show what that costs.
    ``MaxClients`` is raised so the tunnels/s clients are never refused.
    """
    return (
        f"Port {port}\n"
        "Listen 127.0.0.1\n"
        "Timeout 600\n"
        "MaxClients 1024\n"
        "Allow 127.0.0.1\n"
        f'LogFile "{workdir}/tinyproxy.log"\n'
        f"LogLevel {log_level}\n"
        f'PidFile "{workdir}/tinyproxy.pid"\n'
        "DisableViaHeader Yes\n"
    )


def tinyproxy_starter(name: str, log_level: str) -> Callable[[Path, int], Running]:
    """A function starting tinyproxy in the foreground (``-d``) with a generated config."""

    def start(workdir: Path, serial: int) -> Running:
        tp_dir = workdir / f"{name}-{serial}"
        tp_dir.mkdir()
        port = free_port()
        conf = tp_dir / "tinyproxy.conf"
        conf.write_text(tinyproxy_config(port, tp_dir, log_level))
        proc = Proc(name, ["tinyproxy", "-d", "-c", str(conf)], tp_dir / "stderr.log")
        _wait_listening(proc, port)
        return Running(name, port, proc)

    return start


def squid_config(port: int, workdir: Path) -> str:
    """A minimal squid config: loopback port, everything allowed, no cache, files in ``workdir``.

    Squid's stock config allows CONNECT only to SSL ports; this one has no
    ``SSL_ports``/``CONNECT`` deny rules at all and ``http_access allow all``
    (it listens on 127.0.0.1 only). No ``cache_dir`` and ``cache deny all``:
    nothing is stored. ``shutdown_lifetime 0`` makes SIGTERM stop it at once
    instead of after 30 s. ``dns_nameservers 127.0.0.1`` keeps any lookup it
    might make on loopback; the targets are numeric and need none.
    """
    return (
        f"http_port 127.0.0.1:{port}\n"
        "visible_hostname localhost\n"
        "http_access allow all\n"
        "cache deny all\n"
        "cache_mem 8 MB\n"
        f"pid_filename {workdir}/squid.pid\n"
        f"cache_log {workdir}/cache.log\n"
        f"access_log stdio:{workdir}/access.log\n"
        "cache_store_log none\n"
        f"coredump_dir {workdir}\n"
        "netdb_filename none\n"
        "pinger_enable off\n"
        "dns_nameservers 127.0.0.1\n"
        "shutdown_lifetime 0 seconds\n"
    )


def start_squid(workdir: Path, serial: int) -> Running:
    """squid in the foreground (``-N``, one process) with a generated config.

    Started as root, squid switches to its ``cache_effective_user`` (proxy on
    Debian), which must be able to write its log and pid files: its directory
    is handed to that user.
    """
    sq_dir = workdir / f"squid-{serial}"
    sq_dir.mkdir()
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("proxy")
            os.chown(sq_dir, user.pw_uid, user.pw_gid)
    port = free_port()
    conf = sq_dir / "squid.conf"
    conf.write_text(squid_config(port, sq_dir))
    proc = Proc(
        "squid", ["squid", "-N", "-d", "1", "-f", str(conf)], workdir / f"squid-{serial}.out"
    )
    _wait_listening(proc, port)
    return Running("squid", port, proc)


PROXIES = [
    ProxySpec(
        "tunnelkit",
        "twistd",
        tunnelkit_starter("connect"),
        "--mode connect --allow-dest 127.0.0.0/8 (defaults: --read-size 256k, nodelay)",
    ),
    # What one port for all costs a CONNECT client: the peek, then the same mode.
    ProxySpec(
        "tunnelkit-auto",
        "twistd",
        tunnelkit_starter("auto"),
        "--mode auto --allow-dest 127.0.0.0/8 (CONNECT clients after the peek); tunnels figure only",
        ("tunnels",),
    ),
    ProxySpec(
        "tinyproxy",
        "tinyproxy",
        tinyproxy_starter("tinyproxy", "Connect"),
        "no ConnectPort, LogLevel Connect (one fsynced log line per tunnel)",
        remark=(
            "tinyproxy calls fsync() on its log file after every line (log_message in "
            "src/log.c), so with one line per tunnel its tunnels/s is bound by the fsync "
            "latency of the temp dir's disk, not by CPU; tinyproxy-quiet logs no line per "
            "tunnel and shows the proxy itself."
        ),
    ),
    # The log level changes nothing for one bulk tunnel: tunnels/s only.
    ProxySpec(
        "tinyproxy-quiet",
        "tinyproxy",
        tinyproxy_starter("tinyproxy-quiet", "Warning"),
        "as tinyproxy, LogLevel Warning (no line per tunnel); tunnels figure only",
        ("tunnels",),
    ),
    ProxySpec("squid", "squid", start_squid, "-N, no cache, access_log in temp dir"),
]


def version_of(name: str) -> str:
    """One line saying which version of a proxy ran (for the results file)."""
    try:
        name = name.partition("-")[0]
        if name == "tunnelkit":
            return f"tunnelkit {importlib.metadata.version('tunnelkit')}, Twisted {importlib.metadata.version('twisted')}, Python {platform.python_version()}"
        argv = {"tinyproxy": ["tinyproxy", "-v"], "squid": ["squid", "-v"]}[name]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, KeyError, IndexError, subprocess.TimeoutExpired, ValueError) as e:
        return f"{name}: version unknown ({e})"


# =====================================================================
# Measuring
# =====================================================================


@dataclass
class Sample:
    """One figure of one proxy in one repetition.

    ``value`` is tunnels/s or MB/s; ``cost`` is proxy CPU µs per tunnel or MB
    per proxy CPU-second. The ``*_cores`` fields are CPU seconds per second of
    the client's active time, for saying what limited the figure.
    """

    value: float
    cost: float
    proxy_cores: float
    client_cores: float
    targets_cores: float
    other_cores: float
    busy_cores: float
    failed: float = 0.0


FIGURES = {
    "tunnels": ("tunnels/s", "proxy CPU µs/tunnel"),
    "upload": ("upload MB/s", "MB per proxy CPU-s"),
    "download": ("download MB/s", "MB per proxy CPU-s"),
}


@dataclass
class Context:
    """What every measurement needs: targets, options, the client command prefix."""

    workdir: Path
    targets: Proc
    echo_port: int
    sink_port: int
    source_port: int
    seconds: float
    concurrency: int
    client_procs: int
    bulk_bytes: int
    quiet_wait: float
    figures: list[str]
    log: Callable[[str], None]
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check_tunnel(port: int, echo_port: int) -> None:
    """One echo round trip through the proxy; raises :class:`BenchError` saying what went wrong."""
    payload = bytes((i * 7) % 256 for i in range(PAYLOAD))
    sock, early = open_tunnel(port, echo_port, timeout=5.0)
    with sock:
        sock.sendall(payload)
        got = bytearray(early)
        while len(got) < len(payload):
            chunk = sock.recv(len(payload) - len(got))
            if not chunk:
                raise BenchError(f"tunnel closed after {len(got)} of {len(payload)} echoed bytes")
            got += chunk
        if bytes(got) != payload:
            raise BenchError("the echo came back different")


def run_clients(argvs: Sequence[Sequence[str]], timeout: float) -> list[dict[str, Any]]:
    """Run client processes at once, each in its own session; kill them past ``timeout``."""
    procs = [
        subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for argv in argvs
    ]
    deadline = time.monotonic() + timeout
    results: list[dict[str, Any]] = []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                raise BenchError(f"client still running after {timeout:g} s; killed") from e
            if p.returncode != 0:
                raise BenchError(f"client exited with {p.returncode}: {err.strip()[-800:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
    return results


def client_argv(role: str, port: int, target: int, extra: Sequence[str]) -> list[str]:
    """The command of one client process (this script with ``--role``)."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        role,
        "--port",
        str(port),
        "--target",
        str(target),
        *extra,
    ]


def measure(ctx: Context, figure: str, running: Running) -> Sample:
    """Run one figure against ``running``; the client reads everyone's CPU around its active time.

    Tunnels still closing when the client stops are not counted, nor is
    their CPU: at most ``concurrency`` of many thousands.
    """
    watch = ["--watch", f"{running.proc.pid},{ctx.targets.pid}"]
    if figure == "tunnels":
        per = max(1, ctx.concurrency // ctx.client_procs)
        extra = ["--concurrency", str(per), "--seconds", str(ctx.seconds), *watch]
        argvs = [client_argv("tunnels", running.port, ctx.echo_port, extra)] * ctx.client_procs
        timeout = ctx.seconds + TUNNEL_TIMEOUT + 20
    else:
        target = ctx.sink_port if figure == "upload" else ctx.source_port
        extra = ["--bytes", str(ctx.bulk_bytes), *watch]
        argvs = [client_argv(figure, running.port, target, extra)]
        timeout = BULK_TIMEOUT
    if ctx.quiet_wait > 0:
        wait_quiet(ctx.quiet_wait, threshold=15.0)
    results = run_clients(argvs, timeout)
    if not running.proc.alive():
        raise BenchError(f"{running.name} exited during {figure}:\n{running.proc.output()}")
    # With several client processes, the longest one's window covers the others'.
    main = max(results, key=lambda r: r["elapsed"])
    elapsed = main["elapsed"]
    proxy_cpu, targets_cpu = main["watched"]
    client_cpu = sum(r["cpu"] for r in results)
    other = main["busy"] - proxy_cpu - targets_cpu - client_cpu
    cores = {
        "proxy_cores": proxy_cpu / elapsed,
        "client_cores": client_cpu / elapsed,
        "targets_cores": targets_cpu / elapsed,
        "other_cores": max(0.0, other) / elapsed,
        "busy_cores": main["busy"] / elapsed,
    }
    if figure == "tunnels":
        ok = sum(r["ok"] for r in results)
        failed = sum(r["failed"] for r in results)
        if failed:
            errors = sorted({e for r in results for e in r["errors"]})
            ctx.problems.append(f"{running.name}: {failed} failed tunnels, e.g. {errors[:3]}")
        if ok == 0:
            raise BenchError(f"no tunnel completed: {results[0]['errors'][:3]}")
        return Sample(ok / elapsed, proxy_cpu / ok * 1e6, failed=failed, **cores)
    mb = sum(r["bytes"] for r in results) / 1e6
    return Sample(mb / elapsed, mb / proxy_cpu if proxy_cpu > 0 else float("inf"), **cores)


def describe(figure: str, s: Sample) -> str:
    """One progress line for a sample."""
    unit, cost = FIGURES[figure]
    return (
        f"{s.value:10.1f} {unit:14s} {s.cost:9.1f} {cost:20s} proxy {s.proxy_cores:.2f} "
        f"client {s.client_cores:.2f} targets {s.targets_cores:.2f} busy {s.busy_cores:.2f} "
        f"other {s.other_cores:.2f} cores"
    )


def one_proxy(ctx: Context, spec: ProxySpec, rep: int, serial: int) -> str | None:
    """Start ``spec``, check it tunnels, run every figure, stop it; return why it was skipped."""
    try:
        running = spec.start(ctx.workdir, serial)
    except BenchError as e:
        return f"did not start: {e}"
    try:
        try:
            check_tunnel(running.port, ctx.echo_port)
        except (OSError, BenchError) as e:
            return f"failed the echo check: {e}\n{running.proc.output(1500)}"
        for figure in ctx.figures:
            if spec.figures and figure not in spec.figures:
                continue
            try:
                sample = measure(ctx, figure, running)
            except (OSError, BenchError, ValueError, KeyError) as e:
                ctx.problems.append(f"{spec.name} rep {rep + 1} {figure}: {e}")
                ctx.log(f"  {spec.name:15s} {figure:8s} FAILED: {e}")
                if not running.proc.alive():
                    return None
                continue
            ctx.samples.setdefault((spec.name, figure), []).append(sample)
            ctx.log(f"  {spec.name:15s} {figure:8s} {describe(figure, sample)}")
    finally:
        running.proc.stop()
    return None


def median_sample(samples: list[Sample]) -> Sample:
    """The median of every field separately (robust to one disturbed repetition)."""
    return Sample(
        **{f.name: statistics.median(getattr(s, f.name) for s in samples) for f in fields(Sample)}
    )


def limited_by(s: Sample, ncpu: int, client_procs: int) -> str:
    """What saturated during a figure, guessed from the CPU shares.

    A process at :data:`SATURATED` of a core is the bottleneck; on a small
    machine the proxy, the client and the targets can also together fill
    every core, none of them alone at 100 %, and then the machine is the
    limit (each waits for a CPU). Nothing saturated means the figure waited
    on something other than CPU (latency, a lock, the disk).
    """
    found = []
    if s.client_cores >= SATURATED * client_procs:
        found.append(f"client ({s.client_cores:.2f} core)")
    if s.proxy_cores >= SATURATED:
        found.append(f"proxy CPU ({s.proxy_cores:.2f} core)")
    if s.targets_cores >= SATURATED:
        found.append(f"targets ({s.targets_cores:.2f} core)")
    if s.busy_cores >= 0.8 * ncpu:
        found.append(f"machine CPU ({s.busy_cores:.2f} of {ncpu} cores busy)")
    if not found:
        found.append(f"no process saturated ({s.busy_cores:.2f} of {ncpu} cores busy)")
    if s.other_cores >= 0.2:
        found.append(f"other load {s.other_cores:.2f} core")
    return "; ".join(found)


def figure_title(ctx: Context, figure: str) -> str:
    """The line above a figure's table: what exactly was measured."""
    if figure == "tunnels":
        return (
            f"a) CONNECT tunnels: {ctx.concurrency} concurrent, 1 KiB echo each, "
            f"{ctx.seconds:g} s per run"
        )
    return (
        f"b) bulk {figure}: {ctx.bulk_bytes / 2**20:g} MiB through one tunnel, "
        f"{CHUNK // 2**20} MiB sendall/recv_into"
    )


LEGEND = [
    "Medians over repetitions (each column separately). 'vs tk' = this proxy / tunnelkit:",
    "  tunnels/s, MB/s and MB per CPU-s: higher is better; CPU µs/tunnel: lower is better.",
    "Cores = CPU seconds per second while the client ran: proxy (its whole process tree),",
    "  client, targets (echo/sink/source), busy (whole machine), other (busy minus those three:",
    "  other people's load, kernel threads).",
]


def table(ctx: Context, names: list[str], reps: int) -> list[str]:
    """The results as text tables, one per figure, with ratios against tunnelkit."""
    ncpu = os.cpu_count() or 1
    width = max([len(n) for n in names] + [5])
    lines: list[str] = []
    for figure in ctx.figures:
        unit, cost = FIGURES[figure]
        rows = {
            n: median_sample(ctx.samples[(n, figure)]) for n in names if (n, figure) in ctx.samples
        }
        if not rows:
            continue
        base = rows.get("tunnelkit")
        header = (
            f"{'proxy':{width}s} {unit:>14s} {'vs tk':>6s} {cost:>20s} {'vs tk':>6s} "
            f"{'proxy':>6s} {'client':>6s} {'targets':>7s} {'busy':>5s} {'other':>5s}  limited by"
        )
        lines += ["", figure_title(ctx, figure), header, "-" * len(header)]
        for name, s in rows.items():
            n = len(ctx.samples[(name, figure)])
            ratio = f"{s.value / base.value:.2f}" if base and base.value else "-"
            cost_ratio = f"{s.cost / base.cost:.2f}" if base and base.cost else "-"
            lines.append(
                f"{name:{width}s} {s.value:14,.1f} {ratio:>6s} {s.cost:20,.1f} {cost_ratio:>6s} "
                f"{s.proxy_cores:6.2f} {s.client_cores:6.2f} {s.targets_cores:7.2f} "
                f"{s.busy_cores:5.2f} {s.other_cores:5.2f}  "
                f"{limited_by(s, ncpu, ctx.client_procs)}"
                + (f" [{n} of {reps} reps]" if n != reps else "")
            )
    return [*lines, "", *LEGEND]


# =====================================================================
# Runner
# =====================================================================


def start_targets(workdir: Path, lifetime: float) -> tuple[Proc, int, int, int]:
    """Start the target process and read its three ports from its first line."""
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        "targets",
        "--lifetime",
        str(lifetime),
    ]
    proc = Proc("targets", argv, workdir / "targets.out")

    def found() -> tuple[int, int, int] | None:
        m = _TARGETS_LINE.search(proc.output())
        return (int(m[1]), int(m[2]), int(m[3])) if m else None

    ports = proc.wait_for(found, "its ports", START_TIMEOUT)
    assert isinstance(ports, tuple)
    return proc, ports[0], ports[1], ports[2]


def install() -> None:
    """apt-get install tinyproxy and squid (needs root; bounded to 15 minutes)."""
    if os.geteuid() != 0:
        raise BenchError("--install runs apt-get and needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", "install", "-y", "tinyproxy", "squid"], env=env, timeout=900, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"apt-get install failed with {result.returncode}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; the ``--role`` options are for the script's own subprocesses."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--short", action="store_true", help="2 reps, 3 s, 512 MiB: under 2 minutes")
    p.add_argument("--install", action="store_true", help="apt-get install tinyproxy squid first")
    p.add_argument("--reps", type=int, help="repetitions (default 3, --short 2)")
    p.add_argument("--seconds", type=float, help="seconds per tunnels/s run (default 5, --short 3)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent tunnels (default 32)")
    p.add_argument(
        "--client-procs", type=int, default=1, help="client processes sharing --concurrency"
    )
    p.add_argument("--bulk-mib", type=int, help="MiB per bulk run (default 1024, --short 512)")
    p.add_argument(
        "--only",
        help="comma-separated proxies (tunnelkit,tunnelkit-auto,tinyproxy,tinyproxy-quiet,squid)",
    )
    p.add_argument("--figures", default="tunnels,upload,download", help="tunnels,upload,download")
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait for an idle machine before each figure (default 1, --short 0)",
    )
    p.add_argument("--max-minutes", type=float, help="stop after this (default 15, --short 1.8)")
    p.add_argument("--output", type=Path, help="also write the report to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs and logs)")
    p.add_argument(
        "--role", choices=["targets", "tunnels", "upload", "download"], help=argparse.SUPPRESS
    )
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--target", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--watch", default="", help=argparse.SUPPRESS)
    p.add_argument("--lifetime", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    short = args.short
    defaults = {
        "reps": 2 if short else 3,
        "seconds": 3.0 if short else 5.0,
        "bulk_mib": 512 if short else 1024,
        "quiet_wait": 0.0 if short else 1.0,
        "max_minutes": 1.8 if short else 15.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.reps < 1 or args.seconds <= 0 or args.concurrency < 1 or args.client_procs < 1:
        p.error("--reps, --seconds, --concurrency and --client-procs must be positive")
    return args


def select(args: argparse.Namespace, notes: list[str]) -> list[ProxySpec]:
    """The proxies to run: those asked for whose program is installed."""
    wanted = args.only.split(",") if args.only else [s.name for s in PROXIES]
    unknown = set(wanted) - {s.name for s in PROXIES}
    if unknown:
        raise BenchError(
            f"unknown proxies {sorted(unknown)}; known: {', '.join(s.name for s in PROXIES)}"
        )
    chosen = []
    for spec in PROXIES:
        if spec.name not in wanted:
            continue
        found = (VENV_BIN / spec.binary).exists() or shutil.which(spec.binary)
        if not found:
            notes.append(f"{spec.name}: skipped, `{spec.binary}` is not installed (--install)")
            continue
        chosen.append(spec)
    return chosen


def repetitions(ctx: Context, specs: list[ProxySpec], reps: int, deadline: float) -> list[str]:
    """Run every proxy once per repetition, in a rotated order; return notes on skipped ones.

    Rotating the order means no proxy always runs first (on a cold machine)
    or right after the same neighbour.
    """
    skipped: dict[str, str] = {}
    serial = 0
    for rep in range(reps):
        k = rep % max(1, len(specs))
        order = specs[k:] + specs[:k]
        ctx.log(f"repetition {rep + 1}/{reps}: {', '.join(s.name for s in order)}")
        for spec in order:
            if spec.name in skipped:
                continue
            if time.monotonic() > deadline:
                ctx.problems.append("stopped early at --max-minutes")
                return [f"{n}: skipped, {why.splitlines()[0]}" for n, why in skipped.items()]
            serial += 1
            why = one_proxy(ctx, spec, rep, serial)
            if why is not None:
                skipped[spec.name] = why
                ctx.log(f"  {spec.name:15s} SKIPPED: {why}")
    return [f"{n}: skipped, {why.splitlines()[0]}" for n, why in skipped.items()]


def log_setup(
    args: argparse.Namespace, specs: list[ProxySpec], workdir: Path, log: Callable[[str], None]
) -> None:
    """Say what runs, where and with which versions, so a results file stands on its own."""
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    log(f"command: {command}")
    log(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    for spec in specs:
        log(f"  {spec.name}: {version_of(spec.name)}; {spec.config}")
    log(
        f"reps {args.reps}, tunnels {args.seconds:g} s x {args.concurrency} concurrent in "
        f"{args.client_procs} asyncio client process(es), bulk {args.bulk_mib} MiB; "
        f"temp dir {workdir}"
    )


def run(args: argparse.Namespace) -> int:
    """The whole comparison; returns the exit status (1 if anything failed or was skipped)."""
    started = time.monotonic()
    out: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        out.append(line)

    if args.install:
        install()
    raise_nofile()
    notes: list[str] = []
    specs = select(args, notes)
    remarks = [f"{spec.name}: {spec.remark}" for spec in specs if spec.remark]
    figures = [f for f in args.figures.split(",") if f]
    if not figures or set(figures) - set(FIGURES):
        raise BenchError(f"unknown figures {figures}; known: {', '.join(FIGURES)}")
    workdir = Path(tempfile.mkdtemp(prefix="tunnelkit-connect-"))
    # squid drops to its own user and must reach its subdirectory.
    workdir.chmod(0o755)
    log_setup(args, specs, workdir, log)
    try:
        targets, echo_port, sink_port, source_port = start_targets(
            workdir, args.max_minutes * 60 + 120
        )
        ctx = Context(
            workdir,
            targets,
            echo_port,
            sink_port,
            source_port,
            args.seconds,
            args.concurrency,
            args.client_procs,
            args.bulk_mib * 2**20,
            args.quiet_wait,
            figures,
            log,
        )
        notes += repetitions(ctx, specs, args.reps, started + args.max_minutes * 60)
        for line in table(ctx, [s.name for s in specs], args.reps):
            log(line)
        for line in remarks:
            log(f"remark: {line}")
        for line in notes + ctx.problems:
            log(f"note: {line}")
        log(f"took {time.monotonic() - started:.0f} s")
    finally:
        stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(out) + "\n")
    return 1 if notes or ctx.problems else 0


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Dispatch: a client or target role, or the runner (which stops all it started on exit)."""
    args = parse_args()
    if args.role == "targets":
        asyncio.run(serve_targets(args.lifetime))
        return
    if args.role is not None:
        client_main(args)
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(run(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        stop_all()


if __name__ == "__main__":
    main()
