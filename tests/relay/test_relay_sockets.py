"""The relay over real loopback sockets: full duplex, half-close, RST, timeouts, backpressure, no leaks.

In-process tests run tunnelkit's service (built by ``tunnelkit.cli.plugin``) on the
real reactor inside a trial ``TestCase``, with blocking clients and backends in
threads (Twisted protocols for the 200 concurrent tunnels); the memory and
descriptor tests run ``twistd -n tunnelkit`` as a process and read its
``/proc`` entries. Every suite runs on both planes, with splice(2) as needed,
forced on and off, and on Twisted with queued writes only (tests/planes.py).
Payloads are random and checked by SHA-256; addresses are loopback, ports are 0.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from loopback import (
    IO_TIMEOUT,
    BulkSender,
    LoopbackTestCase,
    MiB,
    Serve,
    connect,
    cyclic_garbage,
    digest_then_reply,
    echo,
    echo_through,
    exchange_counting,
    read_slowly,
    recv_all,
    recv_exactly,
    recv_outcome,
    refusing_address,
    reset,
    sha256,
    silent_listener,
    split_address,
)
from planes import (
    ENGINE,
    ENGINE_NO_SPLICE,
    ENGINE_SPLICE,
    SPLICE_VARIANTS,
    TWISTED,
    TWISTED_QUEUED,
    TWISTED_SPLICE,
    Plane,
    on_each_plane,
    on_planes,
)
from processes import (
    Process,
    assert_rss_growth_below,
    proc_status_kib,
    reset_peak_rss,
    tunnel_closed_events,
    twistd,
    wait_until,
)
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

SOAK = os.environ.get("TUNNELKIT_SOAK") == "1"

Inline = Generator[Deferred[Any], Any, None]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@inlineCallbacks
def poll(condition: Callable[[], object], what: Callable[[], str], timeout: float = 10.0) -> Inline:
    """Let the reactor run until ``condition()`` is true; fail with ``what()`` after ``timeout`` s."""
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what()}: not within {timeout:g} s")
        yield deferLater(reactor, 0.01, lambda: None)


def socket_option(sock: socket.socket, level: int, name: int) -> int:
    value: int = sock.getsockopt(level, name)
    return value


# -- bytes both ways ------------------------------------------------------


def banner_then_echo(banner: bytes) -> Callable[[socket.socket], int]:
    """Backend: send ``banner`` on accept, before reading anything, then echo until EOF."""

    def handler(conn: socket.socket) -> int:
        conn.sendall(banner)
        return echo(conn)

    return handler


@on_planes(*SPLICE_VARIANTS, TWISTED_QUEUED)
class DataTests(LoopbackTestCase):
    """Bytes move intact in both directions, in any order the peers choose."""

    @inlineCallbacks
    def test_32_mib_echoed_both_ways_at_once(self) -> Inline:
        """32 MiB sent while the echo streams back arrive intact both ways, with exact byte counts."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address)
        payload = os.urandom(32 * MiB)

        def client() -> tuple[bytes, int]:
            with connect(fwd.address) as sock:
                return exchange_counting(sock, payload)

        received, echoed_during_send = yield deferToThread(client)
        assert len(received) == len(payload)
        assert sha256(received) == sha256(payload)
        # The echo was already flowing back while the client was still sending.
        assert echoed_during_send > 0
        [record] = yield fwd.closed(1)
        assert (record["bytes_up"], record["bytes_down"]) == (32 * MiB, 32 * MiB)
        assert (record["closed_by"], record["close_kind"]) == ("client", "FIN")

    @inlineCallbacks
    def test_client_half_close_still_gets_full_reply(self) -> Inline:
        """After the client's shutdown(SHUT_WR) the backend reads to EOF and its 4 MiB reply reaches the client whole."""
        reply = os.urandom(4 * MiB)
        backend = self.serve(digest_then_reply(reply))
        fwd = self.forward("--to", backend.address)
        payload = os.urandom(3 * MiB)

        def client() -> bytes:
            with connect(fwd.address) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock)

        answer = yield deferToThread(client)
        seen = backend.outcome()
        assert seen == (len(payload), sha256(payload))
        assert answer[:32] == hashlib.sha256(payload).digest()
        assert len(answer) == 32 + len(reply)
        assert sha256(answer[32:]) == sha256(reply)
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"], record["reason"]) == (
            "client",
            "FIN",
            "client sent FIN",
        )
        assert (record["bytes_up"], record["bytes_down"]) == (len(payload), 32 + len(reply))

    @inlineCallbacks
    def test_backend_speaks_first(self) -> Inline:
        """A backend's banner reaches a client that has not sent anything yet."""
        banner = os.urandom(64 * 1024)
        backend = self.serve(banner_then_echo(banner))
        fwd = self.forward("--to", backend.address)

        def client() -> tuple[bytes, bytes]:
            with connect(fwd.address, timeout=5) as sock:
                first = recv_exactly(sock, len(banner))
                sock.sendall(b"hello")
                sock.shutdown(socket.SHUT_WR)
                return first, recv_all(sock)

        first, rest = yield deferToThread(client)
        assert sha256(first) == sha256(banner)
        assert rest == b"hello"
        assert backend.outcome() == len(b"hello")
        [record] = yield fwd.closed(1)
        assert (record["bytes_up"], record["bytes_down"]) == (5, len(banner) + 5)


# -- many tunnels at once -------------------------------------------------


class Gate:
    """Holds every backend connection paused until ``expected`` are open at the same time."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.open = 0
        self.most_open = 0
        self.waiting: list[Any] = []
        self.released = False

    def arrive(self, transport: Any) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        if self.released:
            return
        transport.pauseProducing()
        self.waiting.append(transport)
        if self.open >= self.expected:
            self.released = True
            waiting, self.waiting = self.waiting, []
            for each in waiting:
                each.resumeProducing()


@implementer(IHalfCloseableProtocol)
class GatedEcho(Protocol):
    """Echo with backpressure (the transport is its own producer), opened by a :class:`Gate`."""

    transport: Any

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)
        self.gate.arrive(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.gate.open -= 1


class PayloadClient(Protocol):
    """Sends its payload and EOF, hashes what comes back, and keeps the reason it was closed."""

    transport: Any

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.digest = hashlib.sha256()
        self.received = 0
        self.port = 0
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.port = self.transport.getHost().port
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.reason = reason


@on_planes(ENGINE, ENGINE_SPLICE, TWISTED, TWISTED_SPLICE, TWISTED_QUEUED)
class ConcurrencyTests(LoopbackTestCase):
    """Tunnels are independent of each other."""

    @inlineCallbacks
    def test_200_concurrent_tunnels(self) -> Inline:
        """200 tunnels open at the same time each echo their own random payload intact."""
        count = 200
        reactor = _reactor()
        gate = Gate(count)
        factory = Factory.forProtocol(lambda: GatedEcho(gate))
        backend_port = reactor.listenTCP(0, factory, backlog=512, interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        fwd = self.forward("--to", f"127.0.0.1:{backend_port.getHost().port}")
        host, port = split_address(fwd.address)
        sizes = [random.randint(16 * 1024, 192 * 1024) for _ in range(count)]
        clients = [PayloadClient(os.urandom(size)) for size in sizes]
        connected = [
            connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=10), client)
            for client in clients
        ]
        yield gatherResults(connected)
        yield poll(
            lambda: gate.released,
            lambda: f"{count} tunnels open at once (at most {gate.most_open} were)",
            20,
        )
        yield poll(
            lambda: all(c.reason for c in clients),
            lambda: (
                f"every echo complete ({sum(not c.reason for c in clients)} clients still open)"
            ),
            30,
        )
        for client in clients:
            assert client.reason is not None and client.reason.check(ConnectionDone), client.reason
            expected = (len(client.payload), sha256(client.payload))
            assert (client.received, client.digest.hexdigest()) == expected, client.port
        records = yield fwd.closed(count)
        by_port = {int(r["client"].rpartition(":")[2]): r for r in records}
        for client in clients:
            record = by_port[client.port]
            size = len(client.payload)
            assert (record["bytes_up"], record["bytes_down"]) == (size, size)
            assert record["close_kind"] == "FIN"

    @inlineCallbacks
    def test_ended_tunnels_are_freed_without_the_collector(self) -> Inline:
        """Nothing of an ended tunnel is left in a reference cycle: refcounting frees it at once."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address)
        with cyclic_garbage() as cycles:
            for _ in range(10):
                answer = yield deferToThread(echo_through, fwd.address, b"x" * 1000)
                assert answer == b"x" * 1000
            yield fwd.closed(10)
        assert not cycles, cycles


# -- backends that cannot be reached --------------------------------------


def wait_for_close(address: str, timeout: float) -> tuple[bytes, str, float]:
    """Connect, send nothing, and time how long until the connection ends, and how."""
    with connect(address, timeout=timeout) as sock:
        started = time.monotonic()
        data, how = recv_outcome(sock)
        return data, how, time.monotonic() - started


@on_each_plane
class UnreachableBackendTests(LoopbackTestCase):
    """A client whose backend cannot be connected is closed, and the record says why."""

    @inlineCallbacks
    def test_refused_backend_closes_client_at_once(self) -> Inline:
        """A refused backend closes the client right away, far under the 30 s connect timeout."""
        with refusing_address() as refused:
            fwd = self.forward("--to", refused, "--connect-timeout", "30")
            data, how, took = yield deferToThread(wait_for_close, fwd.address, 20)
            [record] = yield fwd.closed(1)
        assert data == b""
        assert how in ("EOF", "RST")
        assert took < 10, took
        assert (record["closed_by"], record["close_kind"]) == ("proxy", "error")
        assert "refused" in record["reason"], record["reason"]
        assert (record["backend"], record["connect_time"]) == ("-", None)

    @inlineCallbacks
    def test_silent_backend_hits_connect_timeout(self) -> Inline:
        """A backend that never answers the SYN closes the client after the 1 s connect timeout."""
        with silent_listener() as silent:
            if silent is None:
                raise SkipTest("this kernel answers SYNs beyond a full accept queue")
            fwd = self.forward("--to", silent, "--connect-timeout", "1")
            data, how, took = yield deferToThread(wait_for_close, fwd.address, 20)
            [record] = yield fwd.closed(1)
        assert data == b""
        assert how == "EOF"
        # Loose bounds: the timeout fired, and it was the 1 s one.
        assert 0.8 <= took < 8, took
        assert (record["closed_by"], record["close_kind"], record["connect_time"]) == (
            "proxy",
            "timeout",
            None,
        )
        assert record["reason"].endswith("connect timeout (1 s)"), record["reason"]
        assert 0.8 <= record["duration"] < 8, record

    @inlineCallbacks
    def test_bytes_up_counts_only_what_reached_a_backend(self) -> Inline:
        """A client whose backend never connects logs bytes_up 0, though it sent 88 bytes (both planes agree)."""
        with silent_listener() as silent:
            if silent is None:
                raise SkipTest("this kernel answers SYNs beyond a full accept queue")
            fwd = self.forward("--to", silent, "--connect-timeout", "1")

            def send_then_wait() -> tuple[bytes, str]:
                with connect(fwd.address, timeout=20) as sock:
                    sock.sendall(os.urandom(88))
                    return recv_outcome(sock)

            data, _how = yield deferToThread(send_then_wait)
            [record] = yield fwd.closed(1)
        assert data == b""
        assert (record["close_kind"], record["backend"]) == ("timeout", "-"), record
        assert (record["bytes_up"], record["bytes_down"]) == (0, 0), record

    @inlineCallbacks
    def test_client_reset_mid_connect_cancels_attempt(self) -> Inline:
        """A client that resets while its backend is still connecting ends the tunnel at once."""
        with silent_listener() as silent:
            if silent is None:
                raise SkipTest("this kernel answers SYNs beyond a full accept queue")
            fwd = self.forward("--to", silent, "--connect-timeout", "5")
            sock = connect(fwd.address)
            try:
                yield poll(fwd.pending_connects, lambda: "a pending attempt")
            finally:
                reset(sock)
            [record] = yield fwd.closed(1, timeout=2)
        assert (record["closed_by"], record["close_kind"]) == ("client", "RST"), record

    @inlineCallbacks
    def test_client_fin_then_reset_mid_connect_cancels_attempt(self) -> Inline:
        """A client that half-closes, then resets, while its backend is still connecting ends the tunnel at once."""
        with silent_listener() as silent:
            if silent is None:
                raise SkipTest("this kernel answers SYNs beyond a full accept queue")
            fwd = self.forward("--to", silent, "--connect-timeout", "60")
            sock = connect(fwd.address)
            try:
                yield poll(fwd.pending_connects, lambda: "a pending attempt")
                sock.shutdown(socket.SHUT_WR)
                # The proxy sees the FIN first (there is nothing to wait for that shows it).
                yield deferLater(_reactor(), 0.3, lambda: None)
            finally:
                reset(sock)
            # Far under the connect timeout: the reset ended it, not the timer.
            [record] = yield fwd.closed(1, timeout=10)
        assert (record["closed_by"], record["close_kind"]) == ("client", "RST"), record
        assert fwd.pending_connects() == 0


# -- resets and clean closes ----------------------------------------------


def reset_after_request(conn: socket.socket) -> None:
    """Backend: read the request byte, then reset the connection."""
    assert conn.recv(1) == b"x"
    reset(conn)


def expect_reset(conn: socket.socket) -> tuple[bytes, str]:
    """Backend: read the request byte, say ``ready``, then see how the connection ends."""
    assert conn.recv(1) == b"x"
    conn.sendall(b"ready")
    return recv_outcome(conn)


def reply_and_close(conn: socket.socket) -> None:
    """Backend: read the request byte, reply ``bye`` and close normally."""
    assert conn.recv(1) == b"x"
    conn.sendall(b"bye")


Ended = tuple[tuple[bytes, str], dict[str, Any]]


@on_planes(*SPLICE_VARIANTS, TWISTED_QUEUED)
class CloseTests(LoopbackTestCase):
    """An RST on one side is an RST on the other; a clean close stays clean."""

    @inlineCallbacks
    def request_until_closed(
        self, handler: Callable[[socket.socket], None]
    ) -> Generator[Deferred[Any], Any, Ended]:
        """Send the request byte to a ``handler`` backend and read until the connection ends.

        Returns what the client received and how its connection ended, and the
        tunnel's record, once the backend's handler has returned.
        """
        backend = self.serve(handler)
        fwd = self.forward("--to", backend.address)

        def client() -> tuple[bytes, str]:
            with connect(fwd.address) as sock:
                sock.sendall(b"x")
                return recv_outcome(sock)

        outcome = yield deferToThread(client)
        backend.outcome()
        [record] = yield fwd.closed(1)
        return outcome, record

    @inlineCallbacks
    def test_backend_reset_reaches_client(self) -> Inline:
        """A backend that resets makes the client's recv fail with ECONNRESET."""
        outcome, record = yield self.request_until_closed(reset_after_request)
        assert outcome == (b"", "RST")
        assert (record["closed_by"], record["close_kind"]) == ("backend", "RST")

    @inlineCallbacks
    def test_client_reset_reaches_backend(self) -> Inline:
        """A client that resets makes the backend's recv fail with ECONNRESET."""
        backend = self.serve(expect_reset)
        fwd = self.forward("--to", backend.address)

        def client() -> tuple[bytes, str]:
            sock = connect(fwd.address)
            sock.sendall(b"x")
            assert recv_exactly(sock, 5) == b"ready"
            reset(sock)
            outcome: tuple[bytes, str] = backend.outcome()
            return outcome

        outcome = yield deferToThread(client)
        assert outcome == (b"", "RST")
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("client", "RST")

    @inlineCallbacks
    def test_clean_close_stays_clean(self) -> Inline:
        """A backend that replies and closes normally gives the client its reply and EOF, not a reset."""
        outcome, record = yield self.request_until_closed(reply_and_close)
        assert outcome == (b"bye", "EOF")
        assert (record["closed_by"], record["close_kind"]) == ("backend", "FIN")


@on_planes(ENGINE, ENGINE_SPLICE, TWISTED, TWISTED_SPLICE)
class IdleTests(LoopbackTestCase):
    """The idle timeout on real sockets."""

    @inlineCallbacks
    def test_idle_timeout_closes_quiet_tunnel(self) -> Inline:
        """With --idle-timeout 0.5 a tunnel that goes quiet is closed on both sides."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address, "--idle-timeout", "0.5")

        def client() -> tuple[bytes, str, float]:
            with connect(fwd.address, timeout=5) as sock:
                sock.sendall(b"ping")
                assert recv_exactly(sock, 4) == b"ping"
                quiet_from = time.monotonic()
                data, how = recv_outcome(sock)
                return data, how, time.monotonic() - quiet_from

        data, how, quiet = yield deferToThread(client)
        assert (data, how) == (b"", "EOF")
        # Loose bounds: it waited for the idle period, and not for anything longer.
        assert 0.25 <= quiet < 5, quiet
        assert backend.outcome() == 4
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("proxy", "timeout")
        assert record["reason"] == "idle timeout (0.5 s without data)"

    @inlineCallbacks
    def test_writing_to_a_slow_reader_is_not_idle(self) -> Inline:
        """A tunnel that only writes (a held 1 MiB read draining to a slow reader) for longer than --idle-timeout is not idle."""
        bulk = BulkSender()
        backend = self.serve(bulk)
        fwd = self.forward(
            "--to",
            backend.address,
            "--idle-timeout",
            "0.5",
            "--read-size",
            str(MiB),
            "--sndbuf",
            "16384",
        )
        size = 2 * MiB

        def slow_client() -> tuple[int, str, str]:
            # Small kernel buffers: what the proxy holds drains at the reader's pace.
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                sock.settimeout(IO_TIMEOUT)
                sock.connect(split_address(fwd.address))
                sock.sendall(b"%d\n" % size)
                digest, received = hashlib.sha256(), 0
                for _ in range(size // 1024 + 1000):
                    chunk = sock.recv(64 * 1024)
                    if not chunk:
                        break
                    digest.update(chunk)
                    received += len(chunk)
                    time.sleep(0.05)  # at most 640 KiB/s: a held MiB takes longer than the timeout
                return received, digest.hexdigest(), backend.outcome()

        received, digest, sent = yield deferToThread(slow_client)
        assert (received, digest) == (size, sent)
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("backend", "FIN"), record


# -- socket options -------------------------------------------------------

#: Below every Linux default cap (net.core.wmem_max/rmem_max, 212992), so the
#: kernel keeps them and reports exactly twice the value (it doubles SO_SNDBUF
#: and SO_RCVBUF for its bookkeeping overhead).
SNDBUF = 40 * 1024
RCVBUF = 60 * 1024
MSS = 1000


def maxseg_then_echo(conn: socket.socket) -> int:
    """Backend: the MSS of its socket (what the proxy announced), after an echo."""
    echo(conn)
    return socket_option(conn, socket.IPPROTO_TCP, socket.TCP_MAXSEG)


def round_trip(sock: socket.socket) -> Deferred[None]:
    """Fires once a byte went through the client's tunnel and back: it is joined."""

    def echo_one() -> None:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"

    return deferToThread(echo_one)


def assert_maxseg(value: int) -> None:
    """TCP_MAXSEG read on a connected Linux socket is the MSS in use, not the value set:
    the smaller of ours and the peer's, less the TCP options on every segment
    (12 bytes of timestamps on loopback; options take at most 40). Without
    --mss it reads tens of kilobytes on loopback."""
    assert MSS - 40 <= value <= MSS, value


@on_each_plane
class SocketOptionTests(LoopbackTestCase):
    """The options asked for are on the proxy's sockets of both legs, read back with getsockopt."""

    @inlineCallbacks
    def test_options_on_both_legs(self) -> Inline:
        """--nodelay, --keepalive 30, --sndbuf, --rcvbuf and --mss 1000 are set on the accepted and the outbound socket."""
        backend = self.serve(maxseg_then_echo)
        fwd = self.forward(
            "--to",
            backend.address,
            "--nodelay",
            "--keepalive",
            "30",
            "--sndbuf",
            str(SNDBUF),
            "--rcvbuf",
            str(RCVBUF),
            "--mss",
            str(MSS),
        )
        with connect(fwd.address) as client:
            yield round_trip(client)
            with fwd.joined_sockets() as joined:
                [pair] = joined
                for leg, sock in zip(("client", "backend"), pair, strict=True):
                    options = {
                        "TCP_NODELAY": socket_option(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY),
                        "SO_KEEPALIVE": socket_option(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        "TCP_KEEPIDLE": socket_option(
                            sock, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE
                        ),
                        "SO_SNDBUF": socket_option(sock, socket.SOL_SOCKET, socket.SO_SNDBUF),
                        "SO_RCVBUF": socket_option(sock, socket.SOL_SOCKET, socket.SO_RCVBUF),
                    }
                    assert options == {
                        "TCP_NODELAY": 1,
                        "SO_KEEPALIVE": 1,
                        "TCP_KEEPIDLE": 30,
                        "SO_SNDBUF": 2 * SNDBUF,
                        "SO_RCVBUF": 2 * RCVBUF,
                    }, leg
                    assert_maxseg(socket_option(sock, socket.IPPROTO_TCP, socket.TCP_MAXSEG))
            # The peers send segments of at most the MSS the proxy announced.
            assert_maxseg(socket_option(client, socket.IPPROTO_TCP, socket.TCP_MAXSEG))
            client.shutdown(socket.SHUT_WR)
            yield deferToThread(recv_all, client)
        assert_maxseg(backend.outcome())
        yield fwd.closed(1)

    @inlineCallbacks
    def check_nodelay(self, args: tuple[str, ...], expected: int) -> Inline:
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address, *args)
        with connect(fwd.address) as client:
            yield round_trip(client)
            with fwd.joined_sockets() as joined:
                [pair] = joined
                for sock in pair:
                    assert socket_option(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY) == expected
                    assert socket_option(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        yield fwd.closed(1)

    def test_nodelay_is_the_default(self) -> Deferred[None]:
        """Without options TCP_NODELAY is on for both legs (the kernel's default is off)."""
        return self.check_nodelay((), 1)

    def test_no_nodelay_turns_it_off(self) -> Deferred[None]:
        """--no-nodelay leaves Nagle's algorithm on for both legs."""
        return self.check_nodelay(("--no-nodelay",), 0)


# -- the twistd process: memory under a slow reader, descriptors after churn --


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- which plane relays by default ---------------------------------------------


class EngineChoiceTests(LoopbackTestCase):
    """--engine auto picks the native engine for plain forwarding, python keeps Twisted's path."""

    def test_auto_is_native(self) -> None:
        """With the default --engine auto, plain forwarding relays on the native engine."""
        assert self.forward("--to", "127.0.0.1:9").native

    def test_python_is_twisted(self) -> None:
        """--engine python relays with Twisted."""
        assert not self.forward("--to", "127.0.0.1:9", *TWISTED.args).native


def download(address: str, size: int) -> tuple[int, str]:
    with connect(address) as sock:
        sock.sendall(b"%d\n" % size)
        data = recv_all(sock)
        return len(data), sha256(data)


def wait_records(tk: Process, count: int) -> list[dict[str, Any]]:
    def enough(text: str) -> list[dict[str, Any]] | None:
        events = tunnel_closed_events(text)
        return events if len(events) >= count else None

    return tk.wait_for(enough, f"{count} tunnel_closed events", 15)


@pytest.mark.soak
@on_planes(ENGINE, ENGINE_SPLICE, ENGINE_NO_SPLICE, TWISTED, TWISTED_SPLICE, TWISTED_QUEUED)
def test_slow_reader_keeps_proxy_memory_flat(tmp_path: Path, serve: Serve, plane: Plane) -> None:
    """A backend pushing 256 MiB (1 GiB with TUNNELKIT_SOAK=1) to a stalled, then slow reader grows twistd's RSS by under 32 MiB."""
    size = (1024 if SOAK else 256) * MiB
    bulk = BulkSender()
    backend = serve(bulk)
    argv = ("--listen", "127.0.0.1:0", "--to", backend.address)
    with twistd(*argv, cwd=tmp_path, plane=plane) as tk:
        [address] = tk.wait_listening()
        assert download(address, 4 * MiB)[0] == 4 * MiB
        backend.outcome()
        wait_records(tk, 1)
        baseline = proc_status_kib(tk.pid, "VmRSS")
        peak_reset = reset_peak_rss(tk.pid)
        with connect(address) as sock:
            sock.sendall(b"%d\n" % size)
            # Stall: read nothing until the backend is blocked (its progress
            # stops) or, without backpressure, has sent everything.
            stalled_at = bulk.wait_stalled(size)
            rss_stalled = proc_status_kib(tk.pid, "VmRSS")
            # Then read slowly for a while (64 KiB every 2 ms), then at full speed.
            received, received_digest = read_slowly(sock)
        sent_digest = backend.outcome()
        peak = proc_status_kib(tk.pid, "VmHWM" if peak_reset else "VmRSS")
        wait_records(tk, 2)
    assert stalled_at < size, "the backend sent everything to a reader that read nothing"
    assert received == size
    assert received_digest == sent_digest
    assert_rss_growth_below(32, baseline, rss_stalled, peak, stalled_at)


def wait_fds(pid: int, condition: Callable[[int], bool], what: str) -> int:
    """Poll the process's descriptor count until ``condition(count)``; return it."""
    counts: list[int] = []

    def check() -> bool:
        counts.append(fd_count(pid))
        return condition(counts[-1])

    try:
        wait_until(check, what, 15)
    except AssertionError as e:
        raise AssertionError(f"{e}; descriptors: {counts[-1]}") from None
    return counts[-1]


def close_half_by_reset(clients: list[socket.socket]) -> None:
    """Close every other socket with an RST, the rest normally."""
    for i, sock in enumerate(clients):
        if i % 2:
            reset(sock)
        else:
            sock.close()


def relay_batch(address: str, count: int) -> None:
    """Open ``count`` tunnels at once, echo 1 KiB through each, then end half with FIN, half with RST."""
    clients = [connect(address) for _ in range(count)]
    try:
        payloads = [os.urandom(1024) for _ in clients]
        for sock, payload in zip(clients, payloads, strict=True):
            sock.sendall(payload)
        for sock, payload in zip(clients, payloads, strict=True):
            assert recv_exactly(sock, len(payload)) == payload
        for sock in clients[::2]:
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b""
    finally:
        close_half_by_reset(clients)


@on_each_plane
def test_fds_back_to_baseline_after_churn(tmp_path: Path, serve: Serve, plane: Plane) -> None:
    """After 300 tunnels ended cleanly, by RST, or by clients leaving mid-connect, twistd holds as many descriptors as before."""
    backend = serve(echo)
    batch = 100
    argv = ("--listen", "127.0.0.1:0", "--to", backend.address, "--connect-timeout", "3")
    with twistd(*argv, cwd=tmp_path, plane=plane) as tk:
        [address] = tk.wait_listening()
        # One tunnel first: the reactor is then running, with all its own descriptors.
        with connect(address) as sock:
            sock.sendall(b"warm-up")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"warm-up"
        wait_records(tk, 1)
        baseline = fd_count(tk.pid)

        # Full tunnels, closed cleanly or reset, a batch at a time.
        for _ in range(2):
            relay_batch(address, batch)
        relayed_fds = wait_fds(tk.pid, lambda n: n <= baseline, "relayed tunnels' descriptors")
        relayed = wait_records(tk, 1 + 2 * batch)[1:]
        assert relayed_fds == baseline
        assert Counter((r["closed_by"], r["close_kind"]) for r in relayed) == {
            ("client", "FIN"): batch,
            ("client", "RST"): batch,
        }

        # Clients that leave (half FIN, half RST) while the backend is still
        # connecting. A reset ends the tunnel at once; a FIN is only a
        # half-close, passed on after the join, so those tunnels wait for the
        # connect timeout, hence the short --connect-timeout.
        if not backend.silence():
            pytest.skip("this kernel answers SYNs beyond a full accept queue (relayed part passed)")
        clients = [connect(address) for _ in range(batch)]
        try:
            wait_fds(tk.pid, lambda n: n >= baseline + 2 * batch, "every tunnel connecting")
        finally:
            close_half_by_reset(clients)
        after = wait_fds(tk.pid, lambda n: n <= baseline, "left clients' descriptors")
        records = wait_records(tk, 1 + 3 * batch)
        log = tk.stdout
    assert after == baseline
    assert len(tunnel_closed_events(log)) == len(records), "a tunnel was logged more than once"
    assert [r["backend"] for r in records[1 + 2 * batch :]] == ["-"] * batch
