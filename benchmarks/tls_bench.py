#!/usr/bin/env python3
"""TLS offload on loopback: tunnelkit against haproxy, stunnel, hitch, nginx stream and portforward.

Every system terminates TLS from a client and forwards plaintext to the same
backend (``backends.py bulk``). For each one, with the systems interleaved in
every repetition (order rotated) and medians over repetitions:

a) bulk upload and download MB/s through one TLS connection, time-bound
   (``--seconds``), 1 MiB writes and reads, and MB moved per proxy
   CPU-second. The upload is timed until the backend acknowledges the last
   byte; the download counts what the client read;
b) handshakes/s of one sequential client: new TCP connection, full TLS
   handshake (no session is ever offered: no resumption), 1 byte echoed from
   the backend, close; and the proxy's CPU per handshake (that whole cycle).

``direct`` is the same client against a Python/OpenSSL TLS server (the
backend itself speaking TLS, no proxy): its "proxy" CPU is that server's,
which also does the backend's work. Proxy CPU is user + system time of the
proxy's process tree from /proc (``procs.cpu_seconds``), read by the client
itself at the start and the end of its active time (``connect_bench.Meter``).
The client is a separate process (Python ``ssl``); its own CPU is reported
too, and each row says what saturated (the proxy, the client, the machine).

Certificates are made for each run into the temp dir with trustme: ECDSA
P-256 and RSA-2048 (``--keys``; by default both: bulk with the first,
handshakes with each, since the certificate's key only costs in the
handshake). Nothing leaves 127.0.0.1 and no key is written outside the temp dir.

Usage (from the repository root)::

    .venv/bin/python benchmarks/tls_bench.py --install   # apt-get the peers (root)
    .venv/bin/python benchmarks/tls_bench.py --short     # under 2 minutes
    .venv/bin/python benchmarks/tls_bench.py --json benchmarks/results/tls.json   # 3 x 5 s

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import json
import os
import platform
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers
import report
import run
from backends import FRAME
from connect_bench import Meter, Sample, limited_by, median_sample, run_clients
from procs import BenchError, Proc, free_port, raise_nofile, stop_all, wait_quiet

HERE = Path(__file__).resolve().parent

#: Debian packages of the peers (``--install``); all but stunnel4 and hitch are run.py's too.
PACKAGES = ["haproxy", "stunnel4", "hitch", "nginx-light", "libnginx-mod-stream"]
#: The name the client asks for and verifies; the certificates also carry 127.0.0.1.
SERVER_NAME = "localhost"
KEYS = ("ecdsa", "rsa")
KEY_TITLES = {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}
#: The systems, in the order of the tables.
NAMES = ["direct", "tunnelkit", "haproxy", "stunnel", "hitch", "nginx", "portforward"]
#: Ratios are given against these (when they ran).
REFERENCES = ("haproxy", "portforward")

#: Socket timeout of the bulk client's blocking operations.
IO_TIMEOUT = 30.0
#: Longest one connect + handshake + echo may take in the handshake loop.
HANDSHAKE_TIMEOUT = 5.0
#: The handshake loop gives up after this many failures: the figure is void anyway.
MAX_FAILURES = 50

_SERIAL = itertools.count(1)


# =====================================================================
# Certificates
# =====================================================================


@dataclass(frozen=True)
class Certs:
    """One throwaway CA and the leaf it issued for localhost/127.0.0.1, as files."""

    kind: str
    cert: Path
    key: Path
    #: Leaf certificate and key in one file (haproxy's ``crt``, hitch's PEM).
    combined: Path
    ca: Path


def make_certs(directory: Path, kind: str) -> Certs:
    """Issue a certificate of ``kind`` (``ecdsa``: P-256, ``rsa``: 2048 bits) under a new CA."""
    try:
        import trustme
    except ImportError as e:
        raise BenchError("trustme is missing: install the dev dependencies") from e
    key_type = trustme.KeyType.RSA if kind == "rsa" else trustme.KeyType.ECDSA
    authority = trustme.CA(key_type=key_type)
    leaf = authority.issue_cert(SERVER_NAME, "127.0.0.1", key_type=key_type)
    d = directory / f"certs-{kind}"
    d.mkdir(mode=0o700)
    files = Certs(kind, d / "cert.pem", d / "key.pem", d / "combined.pem", d / "ca.pem")
    cert_pem = leaf.cert_chain_pems[0].bytes()
    key_pem = leaf.private_key_pem.bytes()
    for path, data in (
        (files.cert, cert_pem),
        (files.key, key_pem),
        (files.combined, cert_pem + key_pem),
        (files.ca, authority.cert_pem.bytes()),
    ):
        path.write_bytes(data)
        path.chmod(0o600)
    return files


# =====================================================================
# Clients (run in their own process: ``--role upload|download|handshakes``)
# =====================================================================


def client_context(ca: str, tls12: bool) -> ssl.SSLContext:
    """A verifying client context trusting only the run's CA (TLS 1.3 unless ``tls12``)."""
    ctx = ssl.create_default_context(cafile=ca)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def connect_tls(port: int, ctx: ssl.SSLContext, timeout: float = IO_TIMEOUT) -> ssl.SSLSocket:
    """TCP connect to 127.0.0.1:``port`` and complete a full TLS handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ctx.wrap_socket(raw, server_hostname=SERVER_NAME)
    except BaseException:
        raw.close()
        raise


def tls_info(sock: ssl.SSLSocket) -> dict[str, Any]:
    """What was negotiated, for the report (every system should agree)."""
    cipher = sock.cipher()
    return {
        "tls": f"{sock.version()} {cipher[0] if cipher else '?'}",
        "resumed": sock.session_reused,
    }


def echo_once(sock: ssl.SSLSocket) -> None:
    """The backend's echo command: ``E`` must come back."""
    sock.sendall(b"E")
    if sock.recv(1) != b"E":
        raise BenchError("the backend's echo did not come back")


def run_upload(
    port: int, ctx: ssl.SSLContext, seconds: float, watch: Sequence[int]
) -> dict[str, Any]:
    """Send 1 MiB frames for ``seconds``, then a last frame; time until the backend's ``ok``."""
    with connect_tls(port, ctx) as sock:
        sock.sendall(b"U")
        frame = bytearray(FRAME)
        last = bytearray(FRAME)
        last[0] = 1
        meter = Meter(watch)
        deadline = meter.start + seconds
        frames = 0
        while time.monotonic() < deadline:
            sock.sendall(frame)
            frames += 1
        sock.sendall(last)
        frames += 1
        with sock.makefile("rb") as reply:
            answer = reply.readline(64)
        result = meter.result()
        if answer != b"ok %d\n" % (frames * FRAME):
            raise BenchError(f"backend acknowledged {answer!r}, not {frames * FRAME} bytes")
        return {"bytes": frames * FRAME, **result, **tls_info(sock)}


def run_download(
    port: int, ctx: ssl.SSLContext, seconds: float, watch: Sequence[int]
) -> dict[str, Any]:
    """Read zeros from the backend's source for ``seconds`` into one 1 MiB buffer."""
    with connect_tls(port, ctx) as sock:
        sock.sendall(b"D")
        view = memoryview(bytearray(FRAME))
        if sock.recv_into(view) == 0:
            raise BenchError("closed before the first byte")
        meter = Meter(watch)
        deadline = meter.start + seconds
        got = 0
        while time.monotonic() < deadline:
            n = sock.recv_into(view)
            if n == 0:
                raise BenchError(f"closed after {got} bytes")
            got += n
        return {"bytes": got, **meter.result(), **tls_info(sock)}


def run_handshakes(
    port: int, ctx: ssl.SSLContext, seconds: float, watch: Sequence[int]
) -> dict[str, Any]:
    """One connection at a time for ``seconds``: connect, full handshake, 1-byte echo, close."""
    ok = failed = resumed = 0
    errors: list[str] = []
    info: dict[str, Any] = {}
    meter = Meter(watch)
    deadline = meter.start + seconds
    while time.monotonic() < deadline and failed < MAX_FAILURES:
        try:
            with connect_tls(port, ctx, HANDSHAKE_TIMEOUT) as sock:
                echo_once(sock)
                info = tls_info(sock)
                resumed += info["resumed"]
            ok += 1
        except (OSError, BenchError) as e:
            failed += 1
            if len(errors) < 5:
                errors.append(f"{type(e).__name__}: {e}")
    return {
        "ok": ok,
        "failed": failed,
        "errors": errors,
        **meter.result(),
        **info,
        "resumed": resumed,
    }


def client_main(args: argparse.Namespace) -> None:
    """Entry point of a client process: one figure, its result as one JSON line."""
    watch = [int(p) for p in args.watch.split(",") if p]
    ctx = client_context(args.ca, args.tls12)
    role = {"upload": run_upload, "download": run_download, "handshakes": run_handshakes}
    result = role[args.role](args.port, ctx, args.seconds, watch)
    print(json.dumps(result), flush=True)


# =====================================================================
# The systems under test
# =====================================================================


def direct_starter(certs: Certs) -> Callable[[int, Path], peers.Running]:
    """The bulk backend speaking TLS itself (its own process, not the shared backend)."""

    def start(backend_port: int, workdir: Path) -> peers.Running:
        argv = [sys.executable, str(HERE / "backends.py"), "bulk"]
        argv += ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
        proc = Proc("direct", argv, workdir / f"direct-{next(_SERIAL)}.log")
        port = peers.port_from_log(proc, peers._LISTENING_PORT)
        return peers.Running("direct", port, proc, argv)

    return start


STUNNEL_CONF = """\
foreground = yes
pid =
debug = warning
[tls]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{backend_port}
cert = {cert}
key = {key}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""


def stunnel_starter(certs: Certs) -> Callable[[int, Path], peers.Running]:
    """stunnel4 in the foreground (a thread per connection), warnings only in its log."""

    def start(backend_port: int, workdir: Path) -> peers.Running:
        port = free_port()
        tag = f"stunnel-{next(_SERIAL)}"
        conf = workdir / f"{tag}.conf"
        conf.write_text(
            STUNNEL_CONF.format(
                port=port, backend_port=backend_port, cert=certs.cert, key=certs.key
            )
        )
        argv = ["stunnel4", str(conf)]
        proc = Proc("stunnel", argv, workdir / f"{tag}.log")
        peers.wait_listening(proc, port)
        return peers.Running("stunnel", port, proc, argv)

    return start


def hitch_starter(certs: Certs) -> Callable[[int, Path], peers.Running]:
    """hitch with one worker process; as root it must drop to a user (``_hitch``, or nobody)."""

    def start(backend_port: int, workdir: Path) -> peers.Running:
        port = free_port()
        tag = f"hitch-{next(_SERIAL)}"
        ocsp = workdir / f"{tag}-ocsp"
        ocsp.mkdir()
        argv = [
            "hitch",
            f"--frontend=[127.0.0.1]:{port}",
            f"--backend=[127.0.0.1]:{backend_port}",
            "--workers=1",
            "--backlog=1024",
            f"--ocsp-dir={ocsp}",
        ]
        if os.geteuid() == 0:
            users = {entry.pw_name for entry in pwd.getpwall()}
            argv.append(f"--user={'_hitch' if '_hitch' in users else 'nobody'}")
        argv.append(str(certs.combined))
        proc = Proc("hitch", argv, workdir / f"{tag}.log")
        peers.wait_listening(proc, port)
        return peers.Running("hitch", port, proc, argv)

    return start


def nginx_starter(certs: Certs) -> Callable[[int, Path], peers.Running]:
    """nginx ``stream {}`` with ``listen ... ssl``, 1 worker, nothing logged per connection."""
    return peers.nginx_stream_starter(
        "nginx",
        workers=1,
        connections=1024,
        listen_extra=" ssl",
        server_extra=(
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
            f"        ssl_certificate {certs.cert};\n"
            f"        ssl_certificate_key {certs.key};\n"
        ),
    )


def systems(certs: Certs) -> list[peers.ProxySpec]:
    """Every system, started with ``certs``, in the order of the tables."""
    twisted_listen = f"ssl:0:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"
    return [
        peers.ProxySpec(
            "direct",
            (),
            direct_starter(certs),
            "no proxy: the Python client against a Python/OpenSSL TLS server (backends.py bulk)",
        ),
        dataclasses.replace(
            peers.tunnelkit_spec(
                run.DEFAULT_READ_SIZE,
                extra=["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)],
            ),
            note=f"--tls-cert --tls-key, --read-size {run.DEFAULT_READ_SIZE} --nodelay",
        ),
        peers.ProxySpec(
            "haproxy",
            ("haproxy",),
            peers.haproxy_starter(
                False,
                bind_extra=f" ssl crt {certs.combined}",
                global_extra="    nbthread 1\n",
            ),
            "mode tcp, bind ... ssl crt, nbthread 1",
        ),
        peers.ProxySpec(
            "stunnel",
            ("stunnel4",),
            stunnel_starter(certs),
            "stunnel4, thread per connection, TCP_NODELAY both sides, debug = warning",
        ),
        peers.ProxySpec(
            "hitch", ("hitch",), hitch_starter(certs), "hitch --workers=1 (plus its manager)"
        ),
        peers.ProxySpec(
            "nginx",
            ("nginx",),
            nginx_starter(certs),
            "stream, listen ... ssl, ssl_protocols TLSv1.2 TLSv1.3, 1 worker",
            check=peers.nginx_stream_unavailable,
        ),
        peers.ProxySpec(
            "portforward",
            ("twistd",),
            functools.partial(peers.start_portforward, listen=twisted_listen),
            "twistd portforward --port ssl:0:privateKey=...:certKey=... (Twisted's TLS)",
        ),
    ]


def unavailable(spec: peers.ProxySpec) -> str | None:
    """Why ``spec`` cannot run here (not installed, no stream module, no TLS options yet)."""
    if (why := spec.unavailable()) is not None:
        return why
    if spec.name == "tunnelkit":
        try:
            out = subprocess.run(
                [str(peers.VENV_BIN / "twistd"), "tunnelkit", "--help"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env={**os.environ, **peers.SNAPSHOT},
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"twistd tunnelkit --help failed: {e}"
        if "--tls-cert" not in out:
            return "this tunnelkit has no --tls-cert yet (docs/tls.md)"
    return None


# =====================================================================
# Measuring
# =====================================================================


def check(port: int, certs: Certs, timeout: float = 5.0) -> str:
    """One TLS connection through a started system: handshake, echo; return what was negotiated."""
    with connect_tls(port, client_context(str(certs.ca), False), timeout) as sock:
        echo_once(sock)
        info = tls_info(sock)
    return str(info["tls"])


@dataclass
class Bench:
    """Options, the shared backend, and every run's record."""

    args: argparse.Namespace
    workdir: Path
    backend: peers.Backend
    certs: dict[str, Certs]
    #: Per key type, every system by name, started with that key's certificate.
    specs: dict[str, dict[str, peers.ProxySpec]]
    #: The systems that run, in table order.
    names: list[str]
    env: dict[str, Any]
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def client_argv(self, figure: str, port: int, certs: Certs, watch: list[int]) -> list[str]:
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", figure]
        argv += ["--port", str(port), "--ca", str(certs.ca), "--seconds", str(self.args.seconds)]
        argv += ["--watch", ",".join(map(str, watch))]
        return argv + (["--tls12"] if self.args.tls12 else [])

    def measure(self, running: peers.Running, figure: str, certs: Certs) -> dict[str, Any]:
        """One client run of ``figure``: the sample, plus what it moved and negotiated."""
        assert running.proc is not None
        watch = [running.proc.pid, self.backend.proc.pid]
        argv = self.client_argv(figure, running.port, certs, watch)
        result = run_clients([argv], self.args.seconds + 40)[0]
        if not running.proc.alive():
            raise BenchError(f"{running.name} exited during {figure}:\n{running.proc.output()}")
        elapsed = result["elapsed"]
        proxy_cpu, backend_cpu = result["watched"]
        cores = {
            "proxy_cores": proxy_cpu / elapsed,
            "client_cores": result["cpu"] / elapsed,
            "targets_cores": backend_cpu / elapsed,
            "busy_cores": result["busy"] / elapsed,
            "other_cores": max(0.0, result["busy"] - proxy_cpu - backend_cpu - result["cpu"])
            / elapsed,
        }
        if figure == "handshakes":
            if result["ok"] == 0:
                raise BenchError(f"no handshake completed: {result['errors'][:3]}")
            if result["failed"]:
                self.problems.append(
                    f"{running.name}: {result['failed']} failed handshakes, e.g. {result['errors'][:2]}"
                )
            sample = Sample(
                result["ok"] / elapsed,
                proxy_cpu / result["ok"] * 1e6,
                failed=result["failed"],
                **cores,
            )
            extra = {"handshakes": result["ok"], "resumed": result["resumed"]}
        else:
            mb = result["bytes"] / 1e6
            sample = Sample(mb / elapsed, mb / proxy_cpu if proxy_cpu > 0 else 0.0, **cores)
            extra = {"bytes": result["bytes"]}
        return {"sample": sample, "tls": result.get("tls", "?"), **extra}

    def one(self, spec: peers.ProxySpec, certs: Certs, figures: list[str], rep: int) -> None:
        """Start ``spec`` with ``certs``, check it, measure ``figures`` (retrying foreign load), stop."""
        running = None
        try:
            running = peers.require_started(spec.start(self.backend.port, self.workdir))
            negotiated = check(running.port, certs)
        except (BenchError, OSError) as e:
            for figure in figures:
                self.record(spec.name, figure, certs.kind, rep, error=str(e))
            if running is not None:
                running.stop()
            return
        try:
            for figure in figures:
                for attempt in range(self.args.retries + 1):
                    if self.args.quiet_wait > 0:
                        wait_quiet(self.args.quiet_wait, threshold=15.0)
                    try:
                        got = self.measure(running, figure, certs)
                    except (BenchError, OSError, ValueError, KeyError) as e:
                        self.record(spec.name, figure, certs.kind, rep, error=str(e))
                        break
                    other = got["sample"].other_cores
                    discard = other > self.args.max_other and attempt < self.args.retries
                    self.record(
                        spec.name,
                        figure,
                        certs.kind,
                        rep,
                        got=got,
                        checked=negotiated,
                        discarded=discard,
                    )
                    if not discard:
                        break
        finally:
            running.stop()

    def record(
        self,
        name: str,
        figure: str,
        kind: str,
        rep: int,
        *,
        got: dict[str, Any] | None = None,
        error: str | None = None,
        checked: str = "",
        discarded: bool = False,
    ) -> None:
        key = figure_key(figure, kind)
        entry: dict[str, Any] = {
            "system": name,
            "figure": key,
            "key": kind,
            "rep": rep,
            "ok": error is None,
            "discarded": discarded,
            "error": error,
        }
        if got is not None:
            sample: Sample = got["sample"]
            entry.update(
                {k: v for k, v in got.items() if k != "sample"},
                sample=dataclasses.asdict(sample),
                check_tls=checked,
            )
            line = describe(key, sample) + (" (discarded: other load)" if discarded else "")
        else:
            line = f"FAILED: {(error or '').strip()[:1500]}"
        self.runs.append(entry)
        print(f"  {name:12s} {key:18s} {line}", flush=True)


def figure_key(figure: str, kind: str) -> str:
    """``upload``, ``download`` or ``handshakes-ecdsa`` / ``handshakes-rsa``."""
    return f"{figure}-{kind}" if figure == "handshakes" else figure


def describe(key: str, s: Sample) -> str:
    unit, cost = units(key)
    return (
        f"{s.value:10,.1f} {unit:12s} {s.cost:9,.1f} {cost:18s} proxy {s.proxy_cores:.2f} "
        f"client {s.client_cores:.2f} backend {s.targets_cores:.2f} busy {s.busy_cores:.2f} "
        f"other {s.other_cores:.2f} cores"
    )


def units(key: str) -> tuple[str, str]:
    if key.startswith("handshakes"):
        return "handshakes/s", "proxy CPU µs/hs"
    return f"{key} MB/s", "MB per proxy CPU-s"


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(key type, figures) per start of a system: bulk with the first key, handshakes with each."""
    steps = []
    for i, kind in enumerate(args.keys):
        figures = [f for f in ("upload", "download") if i == 0 and f in args.figures]
        if "handshakes" in args.figures:
            figures.append("handshakes")
        if figures:
            steps.append((kind, figures))
    return steps


def repetitions(bench: Bench) -> bool:
    """Every system once per repetition, order rotated; False if --max-minutes cut it short."""
    deadline = time.monotonic() + 60 * bench.args.max_minutes
    steps = plan(bench.args)
    names = bench.names
    for rep in range(bench.args.reps):
        k = rep % max(1, len(names))
        order = names[k:] + names[:k]
        print(f"[rep {rep + 1}/{bench.args.reps}] {', '.join(order)}", flush=True)
        for name in order:
            for kind, figures in steps:
                if time.monotonic() > deadline:
                    return False
                bench.one(bench.specs[kind][name], bench.certs[kind], figures, rep)
    return True


# =====================================================================
# Report
# =====================================================================


def counted(runs: list[dict[str, Any]], name: str, key: str) -> list[Sample]:
    return [
        Sample(**r["sample"])
        for r in runs
        if r["system"] == name and r["figure"] == key and r["ok"] and not r["discarded"]
    ]


def summarize(runs: list[dict[str, Any]], names: list[str], keys: list[str]) -> dict[str, Any]:
    """Per system and figure: median sample, n, and ratios of value and cost to the references."""
    out: dict[str, Any] = {}
    medians = {
        (n, k): median_sample(samples)
        for n in names
        for k in keys
        if (samples := counted(runs, n, k))
    }
    for n in names:
        out[n] = {}
        for k in keys:
            m = medians.get((n, k))
            entry: dict[str, Any] = {"n": len(counted(runs, n, k))}
            if m is not None:
                entry["median"] = dataclasses.asdict(m)
                for ref in REFERENCES:
                    r = medians.get((ref, k))
                    entry[f"x_{ref}"] = (
                        {"value": m.value / r.value, "cost": m.cost / r.cost}
                        if r is not None and r.value and r.cost
                        else None
                    )
            out[n][k] = entry
    return out


def headline(summary: dict[str, Any], names: list[str], keys: list[str]) -> str:
    headers = ["system"]
    for k in keys:
        unit, cost = units(k)
        what = k.replace("handshakes-", "").upper() + " " if k.startswith("handshakes") else ""
        headers += [what + unit, what + cost]
    rows = []
    for n in names:
        row = [n]
        for k in keys:
            m = summary[n][k].get("median")
            cost_digits = 1 if k.startswith("handshakes") else 0
            row += [
                report._num(m and m["value"], 0),
                report._num(m and m["cost"], cost_digits),
            ]
        rows.append(row)
    return report._table(headers, rows)


def ratios(summary: dict[str, Any], names: list[str], keys: list[str], ref: str) -> str:
    headers = ["system"]
    for k in keys:
        unit, cost = units(k)
        what = k.replace("handshakes-", "").upper() + " " if k.startswith("handshakes") else ""
        headers += [f"{what}{unit} x {ref}", f"{what}{cost} x {ref}"]
    rows = []
    for n in names:
        row = [n]
        for k in keys:
            x = summary[n][k].get(f"x_{ref}")
            row += [report._ratio(x and x["value"]), report._ratio(x and x["cost"])]
        rows.append(row)
    return report._table(headers, rows)


def details(runs: list[dict[str, Any]], names: list[str], key: str, reps: int) -> str:
    """Medians of one figure with CPU shares, what saturated, and the negotiated TLS."""
    unit, cost = units(key)
    headers = [
        "system",
        "n",
        unit,
        "min-max",
        cost,
        "proxy cores",
        "client cores",
        "backend cores",
        "busy cores",
        "other cores",
        "TLS",
        "limited by",
    ]
    rows = []
    ncpu = os.cpu_count() or 1
    for n in names:
        samples = counted(runs, n, key)
        if not samples:
            continue
        m = median_sample(samples)
        tls = sorted(
            {r.get("tls", "?") for r in runs if r["system"] == n and r["figure"] == key and r["ok"]}
        )
        values = [s.value for s in samples]
        rows.append(
            [
                n,
                f"{len(samples)}/{reps}",
                report._num(m.value, 1),
                f"{report._num(min(values), 0)}-{report._num(max(values), 0)}",
                report._num(m.cost, 1),
                f"{m.proxy_cores:.2f}",
                f"{m.client_cores:.2f}",
                f"{m.targets_cores:.2f}",
                f"{m.busy_cores:.2f}",
                f"{m.other_cores:.2f}",
                ", ".join(tls),
                limited_by(m, ncpu, 1).replace("targets", "backend"),
            ]
        )
    return report._table(headers, rows)


def render(
    runs: list[dict[str, Any]], names: list[str], keys: list[str], args: argparse.Namespace
) -> str:
    summary = summarize(runs, names, keys)
    parts = [
        "## Medians",
        "",
        headline(summary, names, keys),
        "",
    ]
    for ref in REFERENCES:
        if any(summary.get(ref, {}).get(k, {}).get("median") for k in keys):
            parts += [
                f"## Ratios to {ref} (MB/s, MB per CPU-s, handshakes/s: higher is better; "
                "µs per handshake: lower is better)",
                "",
                ratios(summary, names, keys, ref),
                "",
            ]
    titles = {
        "upload": f"upload: client -> TLS -> proxy -> backend sink, {args.seconds:g} s, 1 MiB writes",
        "download": f"download: backend source -> proxy -> TLS -> client, {args.seconds:g} s, 1 MiB reads",
    }
    for k in keys:
        title = titles.get(k) or (
            f"handshakes, {KEY_TITLES[k.split('-')[1]]}: one sequential client, connect + full "
            f"handshake + 1-byte echo + close, {args.seconds:g} s"
        )
        parts += [f"## {title}", "", details(runs, names, k, args.reps), ""]
    failed = [r for r in runs if not r["ok"]]
    discarded = [r for r in runs if r["ok"] and r["discarded"]]
    if failed or discarded:
        parts += ["## Failed or discarded runs", ""]
        parts += [
            f"- FAILED {r['system']} {r['figure']} rep {r['rep'] + 1}: {(r['error'] or '')[:600]}"
            for r in failed
        ]
        parts += [
            f"- discarded {r['system']} {r['figure']} rep {r['rep'] + 1}: other load "
            f"{r['sample']['other_cores']:.2f} cores"
            for r in discarded
        ]
        parts.append("")
    return "\n".join(parts)


LEGEND = """\
Cores: CPU seconds per second of the client's active time: the proxy (whole process
tree), the client process, the plaintext backend, the whole machine (busy), and
other = busy minus those (kernel threads, other people's load). direct: "proxy" is
the Python TLS server, which also does the backend's work. Proxy CPU per handshake
covers the whole cycle (accept, handshake, backend connect, echo, close)."""


# =====================================================================
# Runner
# =====================================================================

VERSION_PROBES = {
    "stunnel4": ["stunnel4", "-version"],
    "hitch": ["hitch", "--version"],
    "openssl": ["openssl", "version"],
    "python-ssl": [sys.executable, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"],
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--short", action="store_true", help="1 rep of 1.5 s cells: under 2 minutes")
    p.add_argument("--install", action="store_true", help=f"apt-get install {' '.join(PACKAGES)}")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --short 1)")
    p.add_argument("--seconds", type=float, help="seconds per figure (default 5; --short 1.5)")
    p.add_argument("--only", help=f"comma-separated systems ({','.join(NAMES)})")
    p.add_argument(
        "--figures", default="upload,download,handshakes", help="upload,download,handshakes"
    )
    p.add_argument(
        "--keys",
        default="ecdsa,rsa",
        help="certificate keys: ecdsa (P-256), rsa (2048); bulk uses the first (default ecdsa,rsa)",
    )
    p.add_argument("--rsa", action="store_const", dest="keys", const="rsa", help="= --keys rsa")
    p.add_argument(
        "--ecdsa", action="store_const", dest="keys", const="ecdsa", help="= --keys ecdsa"
    )
    p.add_argument("--tls12", action="store_true", help="the client offers TLS 1.2 at most")
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="wait up to this many s for an idle machine before each figure (default 20; short 0)",
    )
    p.add_argument(
        "--max-other",
        type=float,
        default=0.3,
        help="repeat a figure whose other load exceeds this many cores (default 0.3)",
    )
    p.add_argument(
        "--retries", type=int, help="repeats per figure for other load (default 2; short 0)"
    )
    p.add_argument("--max-minutes", type=float, help="stop after this (default 30; short 1.8)")
    p.add_argument("--json", type=Path, help="write every run and the medians to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, certs)")
    p.add_argument("--role", choices=["upload", "download", "handshakes"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ca", help=argparse.SUPPRESS)
    p.add_argument("--watch", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    short = args.short
    for name, full, quick in (
        ("reps", 3, 1),
        ("seconds", 5.0, 1.5),
        ("quiet_wait", 20.0, 0.0),
        ("retries", 2, 0),
        ("max_minutes", 30.0, 1.8),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if short else full)
    args.keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    if not args.keys or set(args.keys) - set(KEYS):
        p.error(f"--keys: some of {', '.join(KEYS)}")
    if not args.figures or set(args.figures) - {"upload", "download", "handshakes"}:
        p.error("--figures: some of upload,download,handshakes")
    if not (1 <= args.reps <= 50 and 0.2 <= args.seconds <= 600 and 0 <= args.retries <= 5):
        p.error("--reps 1..50, --seconds 0.2..600, --retries 0..5")
    return args


def setup(args: argparse.Namespace, workdir: Path) -> Bench:
    """Certificates, the systems that can run (with notes on the others), the backend."""
    wanted = [w.strip() for w in args.only.split(",")] if args.only else NAMES
    if unknown := set(wanted) - set(NAMES):
        raise SystemExit(f"tls_bench.py: unknown systems {sorted(unknown)}; known: {NAMES}")
    revision = run.git_revision(run.ROOT)
    source_hash = peers.snapshot_tunnelkit(run.ROOT / "tunnelkit", workdir)
    certs = {kind: make_certs(workdir, kind) for kind in args.keys}
    specs = {kind: {s.name: s for s in systems(c)} for kind, c in certs.items()}
    first = args.keys[0]
    notes = []
    for name in wanted:
        if (why := unavailable(specs[first][name])) is not None:
            notes.append(f"skipped {name}: {why}")
    names = [
        n for n in NAMES if n in wanted and not any(x.startswith(f"skipped {n}:") for x in notes)
    ]
    if not names:
        raise SystemExit("tls_bench.py: nothing to run\n" + "\n".join(notes))
    proc = Proc(
        "backend", [sys.executable, str(HERE / "backends.py"), "bulk"], workdir / "backend.log"
    )
    backend = peers.Backend(
        proc,
        peers.port_from_log(proc, peers._LISTENING_PORT),
        "backends.py bulk (threads, recv_into a reused 1 MiB buffer)",
    )
    env = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}",
        "python": platform.python_version(),
        "tunnelkit_revision": revision,
        "tunnelkit_sources_sha256": source_hash,
        "tools": run.tool_versions(VERSION_PROBES),
        "keys": args.keys,
        "bulk_key": first,
        "tls12": args.tls12,
        "reps": args.reps,
        "seconds": args.seconds,
        "backend": backend.description,
        "notes": notes,
        "commands": {n: specs[first][n].note for n in names},
    }
    print(f"tunnelkit {revision}, sources sha256 {source_hash}; temp dir {workdir}")
    print("versions: " + "; ".join(f"{k}: {v}" for k, v in env["tools"].items()))
    for line in notes:
        print(line)
    return Bench(args, workdir, backend, certs, specs, names, env)


def header(bench: Bench) -> list[str]:
    """What ran, where and how: the lines above the tables."""
    env, args = bench.env, bench.args
    lines = [
        f"# TLS offload benchmark, {env['date']} ({env['machine']}), "
        f"{args.reps} reps x {args.seconds:g} s, {env['elapsed_s'] / 60:.1f} min",
        f"Certificates: {', '.join(KEY_TITLES[k] for k in args.keys)} (trustme, made for this "
        f"run); bulk with {KEY_TITLES[env['bulk_key']]}, handshakes with each. Client: Python "
        f"{env['python']} ssl in its own process, "
        f"{'TLS 1.2 at most' if args.tls12 else 'TLS 1.2-1.3'}, verifying, never resuming",
        f"tunnelkit {env['tunnelkit_revision']} (sources sha256 "
        f"{env['tunnelkit_sources_sha256']}); backend: {env['backend']}",
        "versions: " + "; ".join(f"{k}: {v}" for k, v in env["tools"].items()),
    ]
    lines += [f"  {name}: {note}" for name, note in env["commands"].items()]
    lines += [f"NOTE: {line}" for line in env["notes"]]
    if not env["completed"]:
        lines.append(f"NOTE: stopped early at the {args.max_minutes:g} min limit")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role is not None:
        client_main(args)
        return 0
    if args.install:
        run.install(PACKAGES)
    raise_nofile()
    run.install_signal_handlers()
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tunnelkit-tls-"))
    with contextlib.ExitStack() as cleanup:
        if not args.keep:
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        cleanup.callback(stop_all)  # runs first: nothing may still write into workdir
        bench = setup(args, workdir)
        bench.env["completed"] = repetitions(bench)
    if args.keep:
        print(f"kept {workdir}")
    bench.env["elapsed_s"] = round(time.monotonic() - t0, 1)
    bench.env["problems"] = bench.problems
    keys = [figure_key(f, kind) for kind, figures in plan(args) for f in figures]
    print()
    print("\n".join(header(bench)))
    print()
    print(render(bench.runs, bench.names, keys, args))
    print(LEGEND)
    for line in bench.problems:
        print(f"problem: {line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = summarize(bench.runs, bench.names, keys)
        payload = {"environment": bench.env, "summary": summary, "runs": bench.runs}
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"\nraw results: {args.json}")
    return 1 if any(not r["ok"] for r in bench.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
