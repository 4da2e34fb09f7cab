"""Real loopback sockets for relay tests: an in-process forwarder, threaded backends, clients.

:class:`Forwarder` is tunnelkit's service built from command-line arguments
(``tunnelkit.cli.plugin.Options`` and ``build_service``) and listening on the real
reactor of this process, so a ``twisted.trial.unittest.TestCase`` can reach
the proxy's own sockets and its ``tunnel_closed`` records. Backends and
clients are blocking sockets used from threads; every blocking call has a
timeout and every loop a bound.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import hashlib
import http.server
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from planes import Plane
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tunnelkit.app.build import build_service, prepare
from tunnelkit.cli.plugin import Options
from tunnelkit.config.model import ConfigError
from tunnelkit.relay.tunnel import Tunnel

MiB = 1024 * 1024

#: Timeout of every blocking socket operation of a backend or client.
IO_TIMEOUT = 15.0

#: Longest wait for an expected ``tunnel_closed`` record.
RECORD_TIMEOUT = 15.0

Handler = Callable[[socket.socket], Any]

#: The numeric spellings of IPv4 loopback and unspecified addresses that
#: inet_aton, and so getaddrinfo, accepts.
NUMERIC_IPV4_LOOPBACK = ["127.0.0.1", "127.1", "2130706433", "0x7f.1", "0177.0.0.1", "0"]

#: IPv6 unspecified, loopback and IPv4-mapped loopback.
IPV6_LOOPBACK = ["::", "::1", "::ffff:127.0.0.1"]

#: Hosts the default target policy refuses, as addresses (no lookup): loopback,
#: private, metadata, CGNAT, ULA, multicast and their translated forms. Every
#: proxy mode must refuse each of them (policy parity, tests/modes/test_socks5_mode.py).
NON_GLOBAL_HOSTS = [
    *NUMERIC_IPV4_LOOPBACK,
    "0.0.0.0",
    *IPV6_LOOPBACK,
    "::127.0.0.1",
    "::8.8.8.8",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
    "2001:db8::1",
    "3fff::1",
    "5f00::1",
    "64:ff9b::7f00:1",
    "64:ff9b::a00:1",
    "64:ff9b:1::808:808",
    "2002:7f00:1::1",
    "2002:a00:1::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_address(address: str) -> tuple[str, int]:
    """``127.0.0.1:80`` or ``[::1]:80`` as a (host, port) pair."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- clients --------------------------------------------------------------


def connect(address: str, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A blocking client socket connected to ``host:port``, ``[v6]:port`` or a UNIX socket path."""
    target: str | tuple[str, int]
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address
    else:
        host, port = split_address(address)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        target = (host, port)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_from(source: str, address: str, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A blocking client socket bound to loopback address ``source`` (127.0.0.2, ::1 ...), connected to ``address``."""
    sock = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect(split_address(address))
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer if EOF comes first."""
    chunks = []
    left = size
    while left and (chunk := sock.recv(min(left, MiB))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF."""
    chunks = []
    while chunk := sock.recv(MiB):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange_counting(sock: socket.socket, payload: bytes) -> tuple[bytes, int]:
    """Send ``payload`` and EOF from a thread while reading everything until EOF here.

    Returns everything received and how much of it had arrived when the
    sender finished sending ``payload``.
    """
    received: list[bytes] = []
    counted = 0
    at_send_end: list[int] = []
    failure: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
            at_send_end.append(counted)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:
            failure.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while chunk := sock.recv(MiB):
        received.append(chunk)
        counted += len(chunk)
    sender.join(IO_TIMEOUT)
    assert not sender.is_alive(), "the sender did not finish"
    assert not failure, failure
    return b"".join(received), at_send_end[0]


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and EOF from a thread while reading everything until EOF here."""
    return exchange_counting(sock, payload)[0]


def echo_through(address: str, payload: bytes) -> bytes:
    """Send ``payload`` and EOF through the tunnel at ``address``; return all that came back."""
    with connect(address) as sock:
        return exchange(sock, payload)


def assert_echoes(address: str, size: int = 2 * MiB) -> bytes:
    """A random payload goes through the tunnel at ``address`` and back intact; returns it."""
    payload = os.urandom(size)
    received = echo_through(address, payload)
    assert len(received) == size
    assert sha256(received) == sha256(payload)
    return payload


class Download(threading.Thread):
    """A client in a thread that sends ``request`` and hashes everything it receives until EOF.

    ``dial`` opens the connection (a TLS client passes its own).
    """

    def __init__(
        self, address: str, request: bytes, dial: Callable[[str], socket.socket] = connect
    ) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.request = request
        self.dial = dial
        self.digest = hashlib.sha256()
        self.received = 0
        self.failure: list[BaseException] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with self.dial(self.address) as sock:
                sock.sendall(self.request)
                while chunk := sock.recv(MiB):
                    self.digest.update(chunk)
                    self.received += len(chunk)
        except BaseException as e:
            self.failure.append(e)
        finally:
            self.done.set()


def read_slowly(sock: socket.socket) -> tuple[int, str]:
    """Read slowly for a while (64 KiB every 2 ms), then at full speed until EOF: the size and SHA-256."""
    digest = hashlib.sha256()
    received = 0
    for _ in range(500):
        chunk = sock.recv(64 * 1024)
        if not chunk:
            break
        digest.update(chunk)
        received += len(chunk)
        time.sleep(0.002)
    while chunk := sock.recv(MiB):
        digest.update(chunk)
        received += len(chunk)
    return received, digest.hexdigest()


def reset(sock: socket.socket) -> None:
    """Close abortively: SO_LINGER with a zero timeout makes close() send an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_outcome(sock: socket.socket) -> tuple[bytes, str]:
    """Read until the connection ends; the bytes and how it ended: ``EOF`` or ``RST``."""
    chunks = []
    try:
        while chunk := sock.recv(MiB):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "RST"
    return b"".join(chunks), "EOF"


# -- backends -------------------------------------------------------------


class ThreadedServer:
    """A loopback TCP server running ``handler(conn)`` in a thread per connection.

    What each handler returns (or raises) is queued, in order of completion,
    for :meth:`outcome`. It can be made to ignore connection attempts for a
    while (:meth:`silence`), as a backend that is down or overloaded would, or
    made ``refusing``: bound but not listening, so connections are refused
    until :meth:`open`.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        backlog: int = 128,
        silent: bool = False,
        port: int = 0,
        *,
        refusing: bool = False,
    ) -> None:
        self.handler = handler
        self.backlog = backlog
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, port))
        self.address = join_address(host, self.sock.getsockname()[1])
        self.accepted = 0
        #: True while SYNs to :attr:`address` go unanswered.
        self.silent = False
        self._outcomes: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None
        self._fillers: list[socket.socket] = []
        if silent:
            self.silence()
        elif not refusing:
            self.open()

    def open(self) -> None:
        """Accept and serve connections (again, after :meth:`silence`)."""
        self.sock.listen(self.backlog)
        self.sock.settimeout(0.05)
        self._stop.clear()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()
        self.silent = False
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()

    def silence(self) -> bool:
        """Stop accepting and leave new SYNs unanswered (see :func:`fill_accept_queue`).

        Returns :attr:`silent`: False when this kernel answers SYNs anyway.
        """
        self._stop_accepting()
        self.sock.settimeout(None)
        self.sock.listen(0)
        fillers = fill_accept_queue(self.sock)
        self._fillers = fillers or []
        self.silent = fillers is not None
        return self.silent

    def _stop_accepting(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(5)
            assert not self._acceptor.is_alive(), "the accept loop did not stop"
            self._acceptor = None

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT)
            serving = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                self._threads.append(serving)
            serving.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                result = self.handler(conn)
        except BaseException as e:
            self._outcomes.put((False, e))
        else:
            self._outcomes.put((True, result))

    def outcome(self, timeout: float = IO_TIMEOUT) -> Any:
        """What the next handler to finish returned; re-raises what it raised."""
        try:
            ok, value = self._outcomes.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no backend handler finished within {timeout:g} s") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop accepting, unblock and end every handler (bounded waits)."""
        self._stop_accepting()
        for filler in self._fillers:
            filler.close()
        self.sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)


#: The ``serve`` fixture (conftest.py): ``serve(handler, **options)`` starts a
#: :class:`ThreadedServer` that is closed after the test.
Serve = Callable[..., ThreadedServer]


def echo(conn: socket.socket) -> int:
    """Send back every byte until EOF, then half-close; return the count."""
    total = 0
    while data := conn.recv(256 * 1024):
        conn.sendall(data)
        total += len(data)
    conn.shutdown(socket.SHUT_WR)
    return total


def hashing_echo(conn: socket.socket) -> str:
    """Send back every byte until EOF, then half-close; return the SHA-256 of what came."""
    digest = hashlib.sha256()
    while data := conn.recv(256 * 1024):
        digest.update(data)
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def paced_bulk(payload: bytes, seconds: float, conn: socket.socket) -> None:
    """On ``GET\\n`` send ``payload`` spread evenly over ``seconds``, then FIN; else just return."""
    request = b""
    while not request.endswith(b"\n"):
        chunk = conn.recv(16)
        if not chunk:
            return
        request += chunk
    if request != b"GET\n":
        return
    step = 256 * 1024
    started = time.monotonic()
    chunks = range(0, len(payload), step)
    for i, offset in enumerate(chunks):
        delay = started + seconds * i / len(chunks) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        conn.sendall(payload[offset : offset + step])
    conn.shutdown(socket.SHUT_WR)


def hash_until_eof(conn: socket.socket, progress: Callable[[int], object] | None = None) -> str:
    """Read until EOF; the SHA-256 of what came. ``progress`` is told the running total."""
    digest = hashlib.sha256()
    received = 0
    while data := conn.recv(256 * 1024):
        digest.update(data)
        if progress is not None:
            received += len(data)
            progress(received)
    return digest.hexdigest()


def send_while_reading(
    payload: bytes, conn: socket.socket, progress: Callable[[int], object] | None = None
) -> str:
    """Send ``payload`` then FIN from a thread while reading until EOF (see :func:`hash_until_eof`)."""
    sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
    sender.start()
    digest = hash_until_eof(conn, progress)
    sender.join(IO_TIMEOUT)
    assert not sender.is_alive(), "the payload was not all sent"
    return digest


class BulkSender:
    """Backend: on ``N\\n`` send N random bytes in 1 MiB chunks, then EOF; returns their SHA-256.

    :attr:`sent` shows the progress of the current transfer while it runs.
    """

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, conn: socket.socket) -> str:
        request = b""
        while not request.endswith(b"\n") and len(request) < 32:
            chunk = conn.recv(32)
            if not chunk:
                break
            request += chunk
        size = int(request)
        digest = hashlib.sha256()
        self.sent = 0
        block = os.urandom(MiB)
        while self.sent < size:
            # A fresh prefix per chunk: no two chunks are equal, cheaply.
            length = min(MiB, size - self.sent)
            chunk = os.urandom(min(16, length)) + block[16:length]
            conn.sendall(chunk)
            digest.update(chunk)
            self.sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        return digest.hexdigest()

    def wait_stalled(self, size: int, timeout: float = 10.0) -> int:
        """Wait until the transfer of ``size`` bytes is blocked (0.5 s without progress) or done; the bytes sent."""
        last, still_since = -1, time.monotonic()
        deadline = still_since + timeout
        while self.sent < size and time.monotonic() < deadline:
            if self.sent != last:
                last, still_since = self.sent, time.monotonic()
            elif time.monotonic() - still_since >= 0.5:
                break
            time.sleep(0.02)
        return self.sent


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_backend(directory: Path) -> Iterator[str]:
    """A threaded HTTP server of the files in ``directory`` on 127.0.0.1:0, for the ``with`` block."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        serving.join(5)


def digest_then_reply(reply: bytes) -> Callable[[socket.socket], tuple[int, str]]:
    """Backend: read to EOF, then send the SHA-256 of what came and ``reply``, then close."""

    def handler(conn: socket.socket) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        while data := conn.recv(256 * 1024):
            digest.update(data)
            size += len(data)
        conn.sendall(digest.digest() + reply)
        conn.shutdown(socket.SHUT_WR)
        return size, digest.hexdigest()

    return handler


def fill_accept_queue(listener: socket.socket) -> list[socket.socket] | None:
    """Make a listener with a backlog of 0 drop SYNs; the sockets queued there, or ``None``.

    A backlog of 0 takes one connection into the accept queue; while nothing
    accepts it, Linux drops the SYNs of further connections (a full accept
    queue drops SYNs even with syncookies on), so a connect there neither
    succeeds nor is refused. Real connects try it: the first that times out
    proves it. ``None`` (nothing left open) if the kernel answers them all.
    """
    target = listener.getsockname()
    fillers: list[socket.socket] = []
    for _ in range(8):
        probe = socket.socket(listener.family, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(target)
        except TimeoutError:
            probe.close()
            return fillers
        except BaseException:
            probe.close()
            for filler in fillers:
                filler.close()
            raise
        fillers.append(probe)
    for filler in fillers:
        filler.close()
    return None


@contextlib.contextmanager
def refusing_address() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so nobody else gets it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def silent_listener() -> Iterator[str | None]:
    """A loopback address whose SYNs go unanswered, or ``None`` if the kernel answers anyway."""
    server = ThreadedServer(echo, silent=True)
    try:
        yield server.address if server.silent else None
    finally:
        server.close()


# -- the forwarder under test -----------------------------------------------


@implementer(ILogObserver)
class TunnelRecords:
    """A log observer keeping the fields of every ``tunnel_closed`` event, in order."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.records: list[dict[str, Any]] = []
        self._waiters: list[tuple[int, Deferred[list[dict[str, Any]]]]] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") != "tunnelkit.tunnel":
            return
        if event.get("event") != "tunnel_closed":
            return
        self.records.append(dict(event))
        for count, waiter in list(self._waiters):
            if len(self.records) >= count:
                self._waiters.remove((count, waiter))
                if not waiter.called:
                    waiter.callback(self.records[:count])

    def first(self, count: int, timeout: float) -> Deferred[list[dict[str, Any]]]:
        """Fires with the first ``count`` records once there are that many; fails after ``timeout`` s."""
        if len(self.records) >= count:
            return succeed(self.records[:count])
        waiter: Deferred[list[dict[str, Any]]] = Deferred()
        self._waiters.append((count, waiter))

        def too_late(result: object, timeout: float) -> list[dict[str, Any]]:
            raise AssertionError(
                f"{count} tunnel_closed records: not within {timeout:g} s "
                f"(got {len(self.records)}: {self.records})"
            )

        return waiter.addTimeout(timeout, self.clock, onTimeoutCancel=too_late)


class Forwarder:
    """tunnelkit's service from command-line ``args``, listening on 127.0.0.1:0 in-process.

    Every ``tunnel_closed`` event it logs is kept in :attr:`records` (the
    event's fields, as documented in docs/logging.md). Use it from a trial
    ``TestCase`` running the global reactor; :meth:`stop` must be called (as a
    cleanup) so no port or tunnel outlives the test.
    """

    def __init__(self, *args: str, listen: str = "127.0.0.1:0") -> None:
        from twisted.internet import reactor

        config = Options(reactor)
        # An explicit --max-connections keeps build_service from raising this
        # process's file-descriptor limit; a short drain bounds stop().
        config.parseOptions(
            ["--listen", listen, "--max-connections", "4096", "--drain-timeout", "2", *args]
        )
        assert config.settings is not None
        try:
            prepared = prepare(config.settings, reactor)
        except ConfigError as e:  # as makeService ends the command
            raise SystemExit(config.error_lines(e)) from None
        self.service = build_service(prepared)
        self._log = TunnelRecords(reactor)
        self.records = self._log.records
        globalLogPublisher.addObserver(self._log)
        try:
            self.service.listen()
            # As twistd does once daemonized: the native engine takes the ports here.
            self.service.startService()
        except BaseException:
            globalLogPublisher.removeObserver(self._log)
            raise
        bound: Any = self.service.ports[0].getHost()
        #: ``host:port``, or the path of a ``unix:`` listener.
        self.address = (
            join_address(bound.host, bound.port) if hasattr(bound, "host") else bound.name
        )

    @property
    def native(self) -> bool:
        """Whether the native engine relays (else Twisted does)."""
        return self.service.native is not None

    @property
    def tunnels(self) -> list[Tunnel]:
        """The tunnels live right now (Twisted's path only: the engine's are in C)."""
        return list(self.service.registry.active)

    def pending_connects(self) -> int:
        """How many tunnels wait for their backend to connect."""
        if self.service.native is not None:
            states = [state for _, _, state in self.service.native.engine.tunnels()]
            return states.count("connecting")
        return sum(tunnel.pending is not None for tunnel in self.tunnels)

    @contextlib.contextmanager
    def joined_sockets(self) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
        """The proxy's (client-facing, backend-facing) sockets of each joined tunnel.

        For the engine's tunnels they are duplicates of its descriptors
        (same sockets, so getsockopt reads the real options), closed after.
        """
        if self.service.native is None:
            yield [proxy_sockets(t) for t in self.tunnels if t.backend is not None]
            return
        pairs = [
            (socket.socket(fileno=os.dup(client)), socket.socket(fileno=os.dup(backend)))
            for client, backend, state in self.service.native.engine.tunnels()
            if state == "joined"
        ]
        try:
            yield pairs
        finally:
            for pair in pairs:
                for sock in pair:
                    sock.close()

    def closed(
        self, count: int = 1, timeout: float = RECORD_TIMEOUT
    ) -> Deferred[list[dict[str, Any]]]:
        """Fires with the first ``count`` records once that many tunnels have ended."""
        return self._log.first(count, timeout)

    def stop(self) -> Deferred[Any]:
        """Stop listening and let live tunnels end (reset after 2 s), as on SIGTERM."""
        stopped: Deferred[Any] = self.service.stopService()

        def done(result: object) -> object:
            globalLogPublisher.removeObserver(self._log)
            return result

        return stopped.addBoth(done)


_T = TypeVar("_T")


def settled(read: Callable[[], _T], check: Callable[[_T], bool]) -> Deferred[_T]:
    """Fires with ``read()`` once ``check`` holds for it (polled every 20 ms; fails after IO_TIMEOUT).

    For what a process counts as connections end (counters, tables), which
    the test sees only some moments later.
    """
    from twisted.internet import reactor

    @inlineCallbacks
    def poll() -> Any:
        for _ in range(int(IO_TIMEOUT / 0.02)):
            value = read()
            if check(value):
                return value
            yield deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"it did not settle: {read()}")

    return poll()


def proxy_sockets(tunnel: Tunnel) -> tuple[socket.socket, socket.socket]:
    """The proxy's accepted (client-facing) and outbound (backend-facing) sockets of a joined tunnel."""
    assert tunnel.backend is not None, "the tunnel has no backend yet"
    client: socket.socket = tunnel.client.transport.getHandle()
    backend: socket.socket = tunnel.backend.transport.getHandle()
    return client, backend


class LoopbackTestCase(TestCase):
    """A forwarder and backends that are torn down after each test (forwarder first)."""

    timeout = 60
    #: The plane every forwarder of the test relays on (set by ``planes.on_planes``);
    #: ``None``: the options decide, as for users.
    plane: Plane | None = None

    def serve(self, handler: Callable[[socket.socket], Any]) -> ThreadedServer:
        server = ThreadedServer(handler)
        self.addCleanup(server.close)
        return server

    def forward(self, *args: str, listen: str = "127.0.0.1:0") -> Forwarder:
        """A forwarder on this test's plane, stopped after the test unless the test stopped it."""
        forwarder = Forwarder(*(self.plane.args if self.plane else ()), *args, listen=listen)
        self.addCleanup(lambda: forwarder.stop() if forwarder.service.running else None)
        if self.plane is not None:
            self.plane.check_forwarder(forwarder)
        return forwarder


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[collections.Counter[str]]:
    """Count the objects of tunnelkit that only the garbage collector freed in the block.

    A tunnel that ends in a reference cycle keeps its transports and buffers
    until the collector runs, which then costs CPU on every short connection.
    The counter is filled when the block ends.
    """
    gc.collect()
    found: collections.Counter[str] = collections.Counter()
    yield found
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found.update(
            type(o).__qualname__
            for o in gc.garbage
            # tunnelkit's own types only: the test's Twisted clients may end in
            # cycles of their own, and a cycle holding a tunnel holds its legs.
            if type(o).__module__.startswith("tunnelkit")
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
