"""The backends and the proxies under test: how each is started and where it listens.

Each proxy is started fresh for every measurement (so one run's leftovers,
such as a grown heap, never carry into the next) and always on 127.0.0.1.
tunnelkit and ``twistd portforward`` listen on port 0 and the port is read
from their log; the others are given a port that the kernel just handed out.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import itertools
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from procs import START_TIMEOUT, BenchError, Proc, children_count, free_port

#: The interpreter running the benchmark; its venv has twistd and tunnelkit.
VENV_BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent

#: The HTTP body wrk fetches: 1 KiB, a fixed pattern the forwarding check compares.
BODY = bytes(i % 251 for i in range(1024))
BODY_PATH = "/1k.bin"

#: Numbers the log and pid files of each start: a reused log would still hold
#: the port of an earlier start.
_STARTS = itertools.count(1)

_TWISTED_PORT = re.compile(r"starting on (\d+)")
_LISTENING_PORT = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_WORKER_READY = re.compile(r"worker ready \(pid \d+\)")


def listening(port: int) -> bool:
    """Whether a socket is in LISTEN on 127.0.0.1:``port`` (read from /proc/net/tcp).

    Used instead of a probe connection: a bare connect-and-close would count
    as a failed test in iperf3's server and fork a useless child in socat.
    """
    want_local = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want_local and parts[3] == "0A":
                    return True
    except OSError:
        return False
    return False


def wait_listening(proc: Proc, port: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``proc`` has a listener on ``port``; fail if it exits first."""
    proc.wait_for(lambda: listening(port), f"listener on 127.0.0.1:{port}", timeout)


def port_from_log(proc: Proc, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> int:
    """The port a process reported in its log (for peers started on port 0)."""

    def found() -> int | None:
        m = pattern.search(proc.output(limit=1 << 20))
        return int(m[1]) if m else None

    port = proc.wait_for(found, "listening port in its log", timeout)
    assert isinstance(port, int)
    return port


# -- backends ------------------------------------------------------------


@dataclass
class Backend:
    """A running backend: its process and port, and a line saying what it is."""

    proc: Proc
    port: int
    description: str
    #: Every port it listens on, ``port`` first (several for the balance figure's backend).
    ports: tuple[int, ...] = ()
    #: Where it logs the port that served each request (the balance figure's backend), or None.
    served_log: Path | None = None


def start_iperf_server(workdir: Path) -> Backend:
    """``iperf3 -s`` on a free loopback port; it serves one test at a time, which is all we need."""
    port = free_port()
    proc = Proc(
        "iperf3-server",
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
        workdir / "iperf3-server.log",
    )
    wait_listening(proc, port)
    return Backend(proc, port, f"iperf3 -s -B 127.0.0.1 -p {port}")


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 10000; }}
http {{
{access_log}    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    default_type application/octet-stream;
    server {{
{listens}        root {dir}/www;
    }}
}}
"""

#: The balance figure's backend logs the port of each request, buffered (a
#: write per 64 KiB, ~10,000 requests) so the log costs the worker little; the
#: flush timer writes the rest within a second of the load's end. (In place of
#: ``access_log off``, which would cancel it.)
NGINX_SERVED_LOG = """\
    log_format served '$server_port';
    access_log {path} served buffer=64k flush=1s;
"""
NGINX_NO_LOG = "    access_log off;\n"


def start_http_backend(workdir: Path) -> Backend:
    """nginx (1 worker, no access log) serving a 1 KiB file; a Python server if nginx is missing.

    nginx is the backend because it is much faster than any Python proxy in
    front of it, so the figures measure the proxy. The fallback is slower
    (its direct figure is the backend's limit, not a proxy's) and is named so.
    """
    if shutil.which("nginx") is None:
        proc = Proc(
            "http-backend",
            [sys.executable, str(HERE / "backends.py"), "http", "--body-size", str(len(BODY))],
            workdir / "http-backend.log",
        )
        port = port_from_log(proc, _LISTENING_PORT)
        return Backend(proc, port, "FALLBACK python asyncio HTTP server (nginx not installed)")
    return start_nginx_backend(workdir, "nginx", ports=1)


def start_balance_backend(workdir: Path, ports: int) -> Backend:
    """One nginx worker serving the 1 KiB file on ``ports`` loopback ports, logging which port served.

    The balance figure's backends: one process behind all the ports, so one
    backend and several put the same work on the same worker (only the
    proxy's choice differs), and ``direct`` to one port measures what all of
    them together can serve. The log says how the proxy spread the requests.
    """
    return start_nginx_backend(workdir, "nginx-balance", ports=ports, served_log=True)


def start_nginx_backend(
    workdir: Path, tag: str, *, ports: int, served_log: bool = False
) -> Backend:
    """nginx, 1 worker, serving the 1 KiB file on ``ports`` kernel-chosen ports (see NGINX_CONF)."""
    ndir = workdir / tag
    (ndir / "www").mkdir(parents=True, exist_ok=True)
    (ndir / "www" / BODY_PATH.lstrip("/")).write_bytes(BODY)
    # The worker runs as nobody: it must be able to reach the docroot.
    for p in (workdir, ndir, ndir / "www"):
        p.chmod(0o755)
    (ndir / "www" / BODY_PATH.lstrip("/")).chmod(0o644)
    numbers = tuple(free_port() for _ in range(ports))
    log = ndir / "served.log" if served_log else None
    conf = ndir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            dir=ndir,
            listens="".join(f"        listen 127.0.0.1:{n} backlog=4096;\n" for n in numbers),
            access_log=NGINX_SERVED_LOG.format(path=log) if log else NGINX_NO_LOG,
        )
    )
    argv = ["nginx", "-e", "stderr", "-p", str(ndir), "-c", str(conf)]
    proc = Proc(tag, argv, workdir / f"{tag}.log")
    for n in numbers:
        wait_listening(proc, n)
    what = "access_log off" if log is None else "the port of each request logged"
    where = f", on {ports} ports" if ports > 1 else ""
    return Backend(
        proc,
        numbers[0],
        f"nginx, 1 worker{where}, {what}, 1 KiB static file",
        ports=numbers,
        served_log=log,
    )


def start_echo_backend(workdir: Path) -> Backend:
    """The asyncio echo server of backends.py, for the idle-connection test."""
    proc = Proc(
        "echo-backend", [sys.executable, str(HERE / "backends.py"), "echo"], workdir / "echo.log"
    )
    port = port_from_log(proc, _LISTENING_PORT)
    return Backend(proc, port, "asyncio echo server (benchmarks/backends.py)")


# -- proxies -------------------------------------------------------------


@dataclass
class Running:
    """A started proxy: where clients connect, and its process (``None`` for direct)."""

    name: str
    port: int
    proc: Proc | None
    argv: list[str] = field(default_factory=list)
    #: Child processes that live as long as the proxy (nginx's and tunnelkit's
    #: workers): the waits for per-connection children to exit leave them be.
    workers: int = 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


#: Starts a proxy in front of several backend ports, spreading connections with
#: a tunnelkit ``--balance`` strategy (the balance figure): (ports, balance, workdir).
BalancedStart = Callable[[Sequence[int], str, Path], Running]


@dataclass(frozen=True)
class ProxySpec:
    """One system under test: a name, the executables it needs, and how to start it."""

    name: str
    needs: tuple[str, ...]
    start: Callable[[int, Path], Running]
    note: str = ""
    #: Why it cannot run although its executables are there (a missing nginx
    #: module, say), or None; asked only when nothing in ``needs`` is missing.
    check: Callable[[], str | None] | None = None
    #: How to start it in front of several backends, for the systems the balance figure compares.
    start_balanced: BalancedStart | None = None

    def missing(self) -> list[str]:
        """Executables this proxy needs that are not installed."""
        return [n for n in self.needs if shutil.which(n) is None and not (VENV_BIN / n).exists()]

    def unavailable(self) -> str | None:
        """Why this proxy cannot run here (the note of a skipped system), or None."""
        if missing := self.missing():
            return f"{', '.join(missing)} not installed (try --install)"
        return self.check() if self.check is not None else None


def _direct(backend_port: int, workdir: Path) -> Running:
    return Running("direct", backend_port, None)


#: glibc malloc settings for the ``+malloc`` diagnostic rows: serve large
#: buffers from the heap (not a fresh mmap per read) and never hand the heap
#: top back to the kernel per free. Without them every read of 256 KiB gets
#: fresh pages, which the kernel must fault in and zero (see docs/performance.md).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


#: Where the run's frozen copy of the tunnelkit package is (see :func:`snapshot_tunnelkit`).
SNAPSHOT: dict[str, str] = {}


def snapshot_tunnelkit(source: Path, workdir: Path) -> str:
    """Copy the tunnelkit package for this run; return a hash of its sources.

    tunnelkit is installed editable and may be edited while a 20-minute run
    goes on: every tunnelkit started by the run imports this copy instead
    (PYTHONPATH comes before the editable install's path), so all repetitions
    measure the same code, and the hash in the results says which.
    """
    target = workdir / "snapshot"
    shutil.copytree(
        source, target / "tunnelkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    digest = hashlib.sha256()
    sources = [*(target / "tunnelkit").rglob("*.py"), *(target / "tunnelkit").rglob("*.c")]
    for path in sorted(sources):
        digest.update(path.relative_to(target).as_posix().encode() + b"\0" + path.read_bytes())
    SNAPSHOT["PYTHONPATH"] = str(target)
    return digest.hexdigest()[:12]


#: Stands for the run's work directory in an ``extra`` argument of :func:`tunnelkit_spec`.
WORKDIR = "{workdir}"


def tunnelkit_spec(
    read_size: int,
    name: str = "tunnelkit",
    *,
    no_write_through: bool = False,
    malloc_tuned: bool = False,
    extra: Sequence[str] = (),
) -> ProxySpec:
    """tunnelkit with its relevant flags given explicitly (the defaults, except ``--read-size``).

    ``no_write_through`` adds ``--no-write-through`` (every write queued in
    Twisted, as before write-through existed); ``malloc_tuned`` starts it with
    :data:`MALLOC_TUNABLES`. Both are diagnostic rows: they show what a
    mechanism is worth on this machine. ``extra`` is appended to the command
    line (tls_bench.py passes ``--tls-cert``/``--tls-key``; the ``-w2`` row
    ``--workers 2``, whose start waits until both workers are ready), with
    :data:`WORKDIR` replaced by the run's work directory (the ``+filelog``
    row's ``--access-log``).
    """
    workers = workers_option(extra)

    def start_balanced(backend_ports: Sequence[int], balance: str, workdir: Path) -> Running:
        """Every port a ``--to``; ``--balance`` only with several (one is the plain command)."""
        env = dict(SNAPSHOT)
        if malloc_tuned:
            env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        tag = f"{name}-{next(_STARTS)}"
        backends = [arg for port in backend_ports for arg in ("--to", f"127.0.0.1:{port}")]
        if len(backend_ports) > 1:
            backends += ["--balance", balance]
        argv = twistd_argv(
            workdir,
            tag,
            "tunnelkit",
            # ADDR:PORT form (backlog 1024, like every tunnelkit listener).
            "--listen",
            "127.0.0.1:0",
            *backends,
            "--read-size",
            str(read_size),
            "--nodelay",
            "--idle-timeout",
            "3600",
            "--drain-timeout",
            "1",
        )
        if no_write_through:
            argv.append("--no-write-through")
        argv += [arg.replace(WORKDIR, str(workdir)) for arg in extra]
        proc = Proc(
            name, argv, workdir / f"{tag}.out", app_log=workdir / f"{tag}.twistd.log", env=env
        )
        port = port_from_log(proc, _LISTENING_PORT)
        if workers:
            wait_workers_ready(proc, workers)
        return Running(name, port, proc, argv, workers=workers)

    def start(backend_port: int, workdir: Path) -> Running:
        return start_balanced([backend_port], "first", workdir)

    note = f"--read-size {read_size}" + (" --no-write-through" if no_write_through else "")
    if malloc_tuned:
        note += f" GLIBC_TUNABLES={MALLOC_TUNABLES}"
    if extra:
        note += " " + " ".join(extra)
    return ProxySpec(name, ("twistd",), start, note, start_balanced=start_balanced)


def workers_option(argv: Sequence[str]) -> int:
    """The N of ``--workers N`` in ``argv``; 0 when tunnelkit runs as one process."""
    count = 1
    for i, arg in enumerate(argv):
        if arg == "--workers" and i + 1 < len(argv):
            count = int(argv[i + 1])
        elif arg.startswith("--workers="):
            count = int(arg.partition("=")[2])
    return count if count > 1 else 0


def wait_workers_ready(proc: Proc, count: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``count`` tunnelkit workers have logged ``worker ready``.

    The supervisor reports its port before its workers have imported
    Twisted: an idle-memory baseline read then would miss a worker's heap and
    charge it to the connections, and a CPU window would count its start.
    """

    def ready() -> bool:
        return len(_WORKER_READY.findall(proc.output(limit=1 << 20))) >= count

    proc.wait_for(ready, f"{count} workers ready", timeout)


def wait_children(proc: Proc, count: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``proc`` has ``count`` child processes (nginx forks its workers after listening)."""
    proc.wait_for(lambda: children_count(proc.pid) >= count, f"{count} worker processes", timeout)


def twistd_argv(workdir: Path, tag: str, *plugin_args: str) -> list[str]:
    """``twistd -n`` with its pid and log files named ``tag`` in ``workdir``, then the plugin."""
    return [
        str(VENV_BIN / "twistd"),
        "-n",
        "--pidfile",
        str(workdir / f"{tag}.pid"),
        "--logfile",
        str(workdir / f"{tag}.twistd.log"),
        *plugin_args,
    ]


def start_portforward(
    backend_port: int, workdir: Path, listen: str = "tcp:0:interface=127.0.0.1"
) -> Running:
    """``twistd portforward`` on the Twisted endpoint ``listen`` (port 0: read from its log)."""
    tag = f"portforward-{next(_STARTS)}"
    argv = twistd_argv(
        workdir, tag, "portforward", "-p", listen, "-h", "127.0.0.1", "-d", str(backend_port)
    )
    proc = Proc("portforward", argv, workdir / f"{tag}.out", app_log=workdir / f"{tag}.twistd.log")
    port = port_from_log(proc, _TWISTED_PORT)
    return Running("portforward", port, proc, argv)


def _socat(backend_port: int, workdir: Path) -> Running:
    port = free_port()
    argv = [
        "socat",
        "-b",
        "65536",
        # backlog=1024 like tunnelkit: socat's default of 5 overflows under
        # wrk's 50 concurrent connects and then measures SYN retransmits.
        f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
        f"TCP:127.0.0.1:{backend_port}",
    ]
    proc = Proc("socat", argv, workdir / f"socat-{next(_STARTS)}.log")
    wait_listening(proc, port)
    return Running("socat", port, proc, argv)


HAPROXY_CONF = """\
global
    maxconn 4000
{global_extra}defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{defaults_extra}frontend fe
    bind 127.0.0.1:{port} backlog 1024{bind_extra}
    default_backend be
backend be
{balance}{servers}"""

#: HAProxy's ``balance`` algorithm for each tunnelkit ``--balance`` strategy the
#: balance figure offers (those that spread one client's connections).
HAPROXY_BALANCE = {"round-robin": "roundrobin", "least-conn": "leastconn", "random": "random(2)"}


def haproxy_starter(
    splice: bool, *, bind_extra: str = "", global_extra: str = ""
) -> Callable[[int, Path], Running]:
    """A start function for haproxy in mode tcp; ``bind_extra`` ends the ``bind`` line."""
    start_balanced = haproxy_balanced_starter(
        splice, bind_extra=bind_extra, global_extra=global_extra
    )

    def start(backend_port: int, workdir: Path) -> Running:
        return start_balanced([backend_port], "first", workdir)

    return start


def haproxy_balanced_starter(
    splice: bool, *, bind_extra: str = "", global_extra: str = ""
) -> BalancedStart:
    """haproxy_starter's config with a ``server`` line per backend port.

    With several, the backend says ``balance`` (:data:`HAPROXY_BALANCE`); with
    one, the config is the plain row's, word for word.
    """
    name = "haproxy-splice" if splice else "haproxy"

    def start(backend_ports: Sequence[int], balance: str, workdir: Path) -> Running:
        port = free_port()
        tag = f"{name}-{next(_STARTS)}"
        conf = workdir / f"{tag}.cfg"
        conf.write_text(
            HAPROXY_CONF.format(
                port=port,
                balance=f"    balance {HAPROXY_BALANCE[balance]}\n"
                if len(backend_ports) > 1
                else "",
                servers="".join(
                    f"    server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(backend_ports, 1)
                ),
                bind_extra=bind_extra,
                # splice needs pipes, i.e. file descriptors beyond maxconn's.
                global_extra=global_extra + ("    maxpipes 256\n" if splice else ""),
                defaults_extra="    option splice-auto\n" if splice else "",
            )
        )
        argv = ["haproxy", "-db", "-f", str(conf)]
        proc = Proc(name, argv, workdir / f"{tag}.log")
        wait_listening(proc, port)
        return Running(name, port, proc, argv)

    return start


NGINX_STREAM_CONF = """\
{load_module}daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
stream {{
    access_log off;
    server {{
        listen 127.0.0.1:{port}{listen_extra} backlog=1024;
{server_extra}        proxy_pass 127.0.0.1:{backend_port};
    }}
}}
"""

#: Where Debian's libnginx-mod-stream puts the module (nginx-light builds it dynamic).
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@functools.cache
def nginx_stream_support() -> tuple[str | None, str]:
    """(why nginx stream cannot run, or None; the ``load_module`` line it needs).

    Cached: ``nginx -V`` does not change during a run, and starts ask every time.
    """
    nginx = shutil.which("nginx")
    if nginx is None:
        return "nginx not installed (try --install)", ""
    try:
        built = subprocess.run(
            [nginx, "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nginx -V failed: {e}", ""
    options = built.split()
    if "--with-stream" in options:
        return None, ""
    if "--with-stream=dynamic" in options:
        if NGINX_STREAM_MODULE.exists():
            return None, f"load_module {NGINX_STREAM_MODULE};\n"
        return f"{NGINX_STREAM_MODULE} missing (libnginx-mod-stream; try --install)", ""
    return "nginx is built without the stream module", ""


def nginx_stream_unavailable() -> str | None:
    """Why nginx ``stream {}`` cannot run here, or None (a :attr:`ProxySpec.check`)."""
    return nginx_stream_support()[0]


def nginx_stream_starter(
    name: str,
    *,
    workers: int,
    connections: int,
    listen_extra: str = "",
    server_extra: str = "",
) -> Callable[[int, Path], Running]:
    """A start function for nginx ``stream {}`` in front of the backend, nothing logged per connection.

    ``listen_extra`` goes after the address of the ``listen`` line (tls_bench
    passes `` ssl``), ``server_extra`` is inserted before ``proxy_pass``
    (whole lines, such as the certificate's).
    """

    def start(backend_port: int, workdir: Path) -> Running:
        why, load_module = nginx_stream_support()
        if why is not None:
            raise BenchError(why)
        port = free_port()
        ndir = workdir / f"{name}-{next(_STARTS)}"
        ndir.mkdir()
        conf = ndir / "nginx.conf"
        conf.write_text(
            NGINX_STREAM_CONF.format(
                load_module=load_module,
                dir=ndir,
                workers=workers,
                connections=connections,
                port=port,
                listen_extra=listen_extra,
                server_extra=server_extra,
                backend_port=backend_port,
            )
        )
        argv = ["nginx", "-e", "stderr", "-p", str(ndir), "-c", str(conf)]
        proc = Proc(name, argv, ndir / "nginx.log")
        wait_listening(proc, port)
        wait_children(proc, workers)
        return Running(name, port, proc, argv, workers=workers)

    return start


RINETD_CONF = """\
pidlogfile {pidfile}
127.0.0.1 {port} 127.0.0.1 {backend_port}
"""


def _rinetd(backend_port: int, workdir: Path) -> Running:
    """rinetd in the foreground; its pid file in the temp dir (its default is /var/run/rinetd.pid)."""
    port = free_port()
    tag = f"rinetd-{next(_STARTS)}"
    conf = workdir / f"{tag}.conf"
    conf.write_text(
        RINETD_CONF.format(pidfile=workdir / f"{tag}.pid", port=port, backend_port=backend_port)
    )
    argv = ["rinetd", "-f", "-c", str(conf)]
    proc = Proc("rinetd", argv, workdir / f"{tag}.log")
    wait_listening(proc, port)
    return Running("rinetd", port, proc, argv)


@functools.cache
def uvloop_importable() -> bool:
    """Whether this interpreter (the one that runs asyncio_forward.py) can import uvloop."""
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def asyncio_name() -> str:
    """The asyncio row's name says which loop asyncio_forward.py will run on."""
    return "asyncio+uvloop" if uvloop_importable() else "asyncio"


def _asyncio_forward(backend_port: int, workdir: Path) -> Running:
    """benchmarks/asyncio_forward.py: plain asyncio Protocols, uvloop when importable."""
    name = asyncio_name()
    port = free_port()
    loop = "uvloop" if uvloop_importable() else "asyncio"
    argv = [sys.executable, str(HERE / "asyncio_forward.py"), str(port), str(backend_port), loop]
    proc = Proc(name, argv, workdir / f"asyncio-{next(_STARTS)}.log")
    wait_listening(proc, port)
    return Running(name, port, proc, argv)


#: The worker count of the tunnelkit multi-process row: one per core of this 2-core machine.
TUNNELKIT_WORKERS = 2


#: What the nginx stream row does: close both sides at the first EOF
#: (proxy_half_close off, its default) and log nothing.
NGINX_LIKE = ("--no-half-close", "--no-access-log")


def all_proxies(
    read_sizes: list[int] | None,
    default_read_size: int,
    *,
    no_write_through: bool = False,
    no_splice: bool = False,
    no_access_log: bool = False,
    file_log: bool = False,
    malloc_tuned: bool = False,
    python_engine: bool = False,
    no_half_close: bool = False,
) -> list[ProxySpec]:
    """Every system in the order of the tables.

    With ``read_sizes``, one tunnelkit row per size; ``no_write_through``,
    ``no_splice``, ``no_access_log``, ``file_log``, ``malloc_tuned`` and ``python_engine`` add a
    diagnostic row (``+nowt``, ``+nosplice``, ``+nolog``, ``+filelog``, ``+malloc``, ``+python``)
    after each. ``no_half_close`` adds ``+nohalf``: ``--no-half-close --no-access-log``, the
    close semantics and logging of the nginx stream row. Without a sweep, ``tunnelkit-w2``
    (``--workers 2``, and ``tunnelkit-w2+filelog``/``+nohalf`` with ``file_log``/``no_half_close``) follows:
    the multi-core figure beside the single process, as haproxy (2 threads)
    and nginx (2 workers) use both cores.
    """
    names = (
        [(rs, f"tunnelkit-{size_label(rs)}") for rs in read_sizes]
        if read_sizes
        else [(default_read_size, "tunnelkit")]
    )
    tunnelkits = []
    for rs, name in names:
        tunnelkits.append(tunnelkit_spec(rs, name))
        if no_write_through:
            tunnelkits.append(tunnelkit_spec(rs, f"{name}+nowt", no_write_through=True))
        if no_splice:
            tunnelkits.append(tunnelkit_spec(rs, f"{name}+nosplice", extra=("--splice", "off")))
        if no_access_log:
            tunnelkits.append(tunnelkit_spec(rs, f"{name}+nolog", extra=("--no-access-log",)))
        if file_log:
            access_log = ("--access-log", f"{WORKDIR}/access.log")
            tunnelkits.append(tunnelkit_spec(rs, f"{name}+filelog", extra=access_log))
        if malloc_tuned:
            tunnelkits.append(tunnelkit_spec(rs, f"{name}+malloc", malloc_tuned=True))
        if python_engine:
            tunnelkits.append(tunnelkit_spec(rs, f"{name}+python", extra=("--engine", "python")))
        if no_half_close:
            tunnelkits.append(tunnelkit_spec(rs, f"{name}+nohalf", extra=NGINX_LIKE))
    if not read_sizes:
        workers = ("--workers", str(TUNNELKIT_WORKERS))
        name = f"tunnelkit-w{TUNNELKIT_WORKERS}"
        tunnelkits.append(tunnelkit_spec(default_read_size, name, extra=workers))
        if file_log:
            # Workers write the file themselves: no supervisor relaying their log lines.
            extra = (*workers, "--access-log", f"{WORKDIR}/access.log")
            tunnelkits.append(tunnelkit_spec(default_read_size, f"{name}+filelog", extra=extra))
        if no_half_close:
            extra = (*workers, *NGINX_LIKE)
            tunnelkits.append(tunnelkit_spec(default_read_size, f"{name}+nohalf", extra=extra))
    return [
        ProxySpec("direct", (), _direct, "no proxy: the client talks to the backend"),
        *tunnelkits,
        ProxySpec("portforward", ("twistd",), start_portforward, "twistd portforward"),
        ProxySpec("socat", ("socat",), _socat, "socat -b 65536, fork per connection"),
        ProxySpec(
            "haproxy",
            ("haproxy",),
            haproxy_starter(False),
            "haproxy mode tcp",
            start_balanced=haproxy_balanced_starter(False),
        ),
        ProxySpec(
            "haproxy-splice",
            ("haproxy",),
            haproxy_starter(True),
            "haproxy mode tcp, option splice-auto",
        ),
        ProxySpec(
            "nginx-stream",
            ("nginx",),
            nginx_stream_starter("nginx-stream", workers=2, connections=8192),
            "nginx stream {} proxy_pass, worker_processes 2, no access log",
            check=nginx_stream_unavailable,
        ),
        ProxySpec("rinetd", ("rinetd",), _rinetd, "rinetd -f, one forwarding rule, single process"),
        ProxySpec(
            asyncio_name(),
            (),
            _asyncio_forward,
            "benchmarks/asyncio_forward.py: asyncio Protocols"
            + (" on uvloop" if uvloop_importable() else " (uvloop not installed)"),
        ),
    ]


@dataclass(frozen=True)
class BalanceRow:
    """A row of the balance figure: a system in front of the first ``backends`` backend ports.

    ``spec`` None is ``direct``: the client against the first port, the rate
    the backend process (all its ports together) can serve.
    """

    name: str
    spec: ProxySpec | None
    backends: int
    balance: str

    @property
    def system(self) -> str:
        return "direct" if self.spec is None else self.spec.name

    def start(self, ports: Sequence[int], workdir: Path) -> Running:
        if self.spec is None or self.spec.start_balanced is None:
            return Running(self.name, ports[0], None)
        return self.spec.start_balanced(ports[: self.backends], self.balance, workdir)


def balance_rows(specs: Sequence[ProxySpec], balance: str, count: int) -> list[BalanceRow]:
    """``direct``, then each system that can balance with one backend and with ``count``."""
    rows = [BalanceRow("direct", None, 1, balance)]
    for spec in specs:
        if spec.start_balanced is not None:
            rows += [BalanceRow(f"{spec.name} x{n}", spec, n, balance) for n in (1, count)]
    return rows


def size_label(n: int) -> str:
    """65536 -> '64k', 1048576 -> '1m' (names of the read-size sweep's rows)."""
    if n % (1 << 20) == 0:
        return f"{n >> 20}m"
    if n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def require_started(running: Running) -> Running:
    """Fail early if a proxy exited right after reporting its port."""
    if running.proc is not None and not running.proc.alive():
        raise BenchError(f"{running.name} exited at start\n{running.proc.output()}")
    return running
