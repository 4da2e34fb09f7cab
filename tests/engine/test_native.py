"""Plain forwarding end to end on both relay paths: the native engine and Twisted's.

The native engine (tunnelkit/engine/_engine.c driven by tunnelkit/engine/driver.py) takes
over accept, client policy, the connection cap, failover, relay, half-close
and the drain from Twisted when the options allow it. Each behaviour here is
proved over real loopback sockets on each plane (tests/planes.py), so both
paths keep the same promises and log the same records. Payloads are random and checked by
SHA-256; addresses are loopback, ports are 0, UNIX paths are temporary.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Generator
from typing import Any

from loopback import (
    IO_TIMEOUT,
    Forwarder,
    LoopbackTestCase,
    MiB,
    connect,
    connect_from,
    digest_then_reply,
    echo,
    exchange,
    hashing_echo,
    recv_all,
    recv_exactly,
    recv_outcome,
    refusing_address,
    sha256,
    silent_listener,
)
from planes import ENGINE, on_each_plane, on_planes
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from tunnelkit.engine.driver import NativeRelay
from tunnelkit.relay.tunnel import TunnelRecord

Inline = Generator[Deferred[Any], Any, None]

#: How long a refused client may wait for the proxy to close it.
CLOSE_TIMEOUT = 5.0


def refused_client(address: str) -> tuple[int, bytes, str]:
    """Connect and send nothing: the client's port, and what it got before the proxy closed it."""
    with connect(address, timeout=CLOSE_TIMEOUT) as sock:
        port: int = sock.getsockname()[1]
        data, how = recv_outcome(sock)
    return port, data, how


def open_tunnel(address: str, source: str = "127.0.0.1") -> socket.socket:
    """A client (from ``source``) whose tunnel to an echo backend is joined: ``ping`` came back."""
    sock = connect_from(source, address)
    try:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    except BaseException:
        sock.close()
        raise
    return sock


def end_tunnel(sock: socket.socket) -> bytes:
    """Half-close a client, read what is left until EOF, close."""
    with sock:
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def echoes(sock: socket.socket, size: int) -> bool:
    """A random ``size``-byte payload and EOF sent on ``sock`` come back intact."""
    with sock:
        payload = os.urandom(size)
        received = exchange(sock, payload)
    return len(received) == size and sha256(received) == sha256(payload)


def serve_one(listener: socket.socket, handler: Callable[[socket.socket], Any]) -> Any:
    """Accept one connection on ``listener`` and return what ``handler`` makes of it."""
    listener.settimeout(IO_TIMEOUT)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(IO_TIMEOUT)
        return handler(conn)


@implementer(ILogObserver)
class Events:
    """A log observer keeping the events whose ``event`` field is one of ``names``."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.seen: list[dict[str, Any]] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("event") in self.names:
            self.seen.append(dict(event))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.seen if event["event"] == name]


@on_each_plane
class ForwardingTests(LoopbackTestCase):
    """Client policy, the cap, failover, half-close, UNIX sockets, byte counts and drain."""

    def observe(self, *names: str) -> Events:
        """Keep the log events called ``names`` until the test ends."""
        events = Events(*names)
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        return events

    @inlineCallbacks
    def test_client_policy(self) -> Inline:
        """--allow-client: other clients are closed at once, unseen by the backend and unrecorded; allowed ones relay 1 MiB."""
        events = self.observe("client_refused")
        backend = self.serve(hashing_echo)
        fwd = self.forward("--to", backend.address, "--allow-client", "127.0.0.2/32")
        port, data, how = yield deferToThread(refused_client, fwd.address)
        assert data == b"" and how in ("EOF", "RST"), (data, how)
        [refused] = events.named("client_refused")
        assert refused["client"] == f"127.0.0.1:{port}", refused
        sock = yield deferToThread(connect_from, "127.0.0.2", fwd.address)
        assert (yield deferToThread(echoes, sock, MiB))
        [record] = yield fwd.closed(1)
        assert record["client"].startswith("127.0.0.2:"), record
        assert (record["bytes_up"], record["bytes_down"]) == (MiB, MiB)
        assert backend.accepted == 1
        assert len(fwd.records) == 1, fwd.records

    @inlineCallbacks
    def test_connection_cap(self) -> Inline:
        """--max-connections 1: clients beyond it are closed at once, unseen by the backend, logged once per burst."""
        events = self.observe("connection_limit")
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address, "--max-connections", "1")
        first = yield deferToThread(open_tunnel, fwd.address)
        self.addCleanup(first.close)
        for _ in range(2):
            _, data, how = yield deferToThread(refused_client, fwd.address)
            assert data == b"" and how in ("EOF", "RST"), (data, how)
        assert backend.accepted == 1
        [limit] = events.named("connection_limit")
        assert limit["max_tunnels"] == 1
        assert (yield deferToThread(end_tunnel, first)) == b""
        yield fwd.closed(1)
        # The freed slot serves a new client; refusing the next starts a new burst.
        second = yield deferToThread(open_tunnel, fwd.address)
        self.addCleanup(second.close)
        yield deferToThread(refused_client, fwd.address)
        assert len(events.named("connection_limit")) == 2
        assert (yield deferToThread(echoes, second, 64 * 1024))
        records = yield fwd.closed(2)
        assert [r["close_kind"] for r in records] == ["FIN", "FIN"], records
        assert (backend.accepted, len(fwd.records)) == (2, 2)

    @inlineCallbacks
    def test_policy_refusal_at_the_cap(self) -> Inline:
        """At the cap, a client the policy refuses is still logged as client_refused, not as connection_limit."""
        events = self.observe("client_refused", "connection_limit")
        backend = self.serve(echo)
        fwd = self.forward(
            "--to", backend.address, "--max-connections", "1", "--allow-client", "127.0.0.2/32"
        )
        allowed = yield deferToThread(open_tunnel, fwd.address, "127.0.0.2")
        self.addCleanup(allowed.close)
        port, _, _ = yield deferToThread(refused_client, fwd.address)
        seen = [(event["event"], event.get("client")) for event in events.seen]
        assert seen == [("client_refused", f"127.0.0.1:{port}")], seen

    @inlineCallbacks
    def test_failover_to_second_backend(self) -> Inline:
        """A refused first --to fails over to the second, which the record names."""
        backend = self.serve(hashing_echo)
        with refusing_address() as refused:
            fwd = self.forward("--to", refused, "--to", backend.address)
            sock = yield deferToThread(connect, fwd.address)
            assert (yield deferToThread(echoes, sock, 256 * 1024))
            [record] = yield fwd.closed(1)
        assert (record["backend"], record["backend_address"]) == (backend.address, backend.address)
        assert record["connect_time"] is not None and record["connect_time"] >= 0, record
        assert (record["closed_by"], record["close_kind"]) == ("client", "FIN")
        assert backend.accepted == 1

    @inlineCallbacks
    def test_all_backends_refused(self) -> Inline:
        """When every --to refuses, the client is closed and the record names each backend tried, in order."""
        with refusing_address() as one, refusing_address() as two:
            fwd = self.forward("--to", one, "--to", two)
            _, data, how = yield deferToThread(refused_client, fwd.address)
            [record] = yield fwd.closed(1)
        assert data == b"" and how in ("EOF", "RST"), (data, how)
        assert (record["closed_by"], record["close_kind"]) == ("proxy", "error"), record
        reason = record["reason"]
        assert reason.startswith("no backend connected:"), reason
        assert one in reason and two in reason and reason.index(one) < reason.index(two), reason
        assert (record["backend"], record["backend_address"], record["connect_time"]) == (
            "-",
            "-",
            None,
        )

    @inlineCallbacks
    def send_early_then_digest(self, size: int, *args: str) -> Generator[Any, Any, tuple[Any, ...]]:
        """A client sends ``size`` random bytes and its FIN at once; the digest backend answers.

        Returns the seconds the client took to send everything and its FIN,
        and the tunnel's record.
        """
        backend = self.serve(digest_then_reply(b""))
        fwd = self.forward(*args, "--to", backend.address)
        payload = os.urandom(size)

        def client() -> tuple[bytes, float]:
            with connect(fwd.address) as sock:
                started = time.monotonic()
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sent = time.monotonic() - started
                return recv_all(sock), sent

        answer, sent = yield deferToThread(client)
        assert answer == hashlib.sha256(payload).digest()
        assert (yield deferToThread(backend.outcome)) == (size, sha256(payload))
        [record] = yield fwd.closed(1)
        assert (record["bytes_up"], record["bytes_down"]) == (size, 32)
        assert (record["closed_by"], record["close_kind"]) == ("client", "FIN"), record
        return sent, record

    @inlineCallbacks
    def test_urgent_data_is_stepped_over(self) -> Inline:
        """TCP urgent data on a spliced tunnel is dropped as by recv: the rest of the stream and the FIN still arrive."""
        backend = self.serve(digest_then_reply(b""))
        fwd = self.forward("--splice", "on", "--to", backend.address)
        head, tail = os.urandom(64 * 1024), os.urandom(64 * 1024)

        def client() -> bytes:
            with connect(fwd.address) as sock:
                sock.sendall(head)
                sock.send(b"!", socket.MSG_OOB)
                sock.sendall(tail)
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock)

        answer = yield deferToThread(client)
        assert answer == hashlib.sha256(head + tail).digest()
        assert (yield deferToThread(backend.outcome)) == (len(head + tail), sha256(head + tail))
        [record] = yield fwd.closed(1)
        assert (record["bytes_up"], record["closed_by"]) == (len(head + tail), "client"), record

    @inlineCallbacks
    def test_early_data_and_fin(self) -> Inline:
        """256 KiB and a FIN sent right after connect all reach the backend, whose reply reaches the client."""
        yield self.send_early_then_digest(256 * 1024)

    @inlineCallbacks
    def test_data_and_fin_while_connecting(self) -> Inline:
        """Data and a FIN that arrive while the backend is still connecting are relayed, in order, after the join."""
        with silent_listener() as silent:
            if silent is None:
                raise SkipTest("this kernel answers SYNs beyond a full accept queue")
            args = ("--connect-timeout", "0.5", "--to", silent)
            sent, record = yield self.send_early_then_digest(32 * 1024, *args)
        # The FIN was sent long before the first backend's connect timed out.
        assert sent < 0.25 <= record["connect_time"], (sent, record)

    @inlineCallbacks
    def unix_echo(self, splice: str) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """4 MiB through a unix: listener to a unix: backend and back, with ``--splice splice``; the record."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        listen_path = os.path.join(directory, "proxy.sock")
        backend_path = os.path.join(directory, "backend.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(backend_path)
        listener.listen(8)
        args = ("--to", f"unix:{backend_path}", "--splice", splice)
        fwd = self.forward(*args, listen=f"unix:{listen_path}")
        assert os.fsdecode(fwd.address) == listen_path
        served = deferToThread(serve_one, listener, hashing_echo)
        payload = os.urandom(4 * MiB)
        sock = yield deferToThread(connect, listen_path)
        with sock:
            received = yield deferToThread(exchange, sock, payload)
        assert len(received) == len(payload) and sha256(received) == sha256(payload)
        assert (yield served) == sha256(payload)
        records: list[dict[str, Any]] = yield fwd.closed(1)
        [record] = records
        assert (record["bytes_up"], record["bytes_down"]) == (4 * MiB, 4 * MiB)
        assert record["backend"] == f"unix:{backend_path}", record
        # An unnamed UNIX client is "-" on both paths (docs/logging.md).
        assert (record["client"], record["backend_address"]) == ("-", backend_path), record
        assert (record["closed_by"], record["close_kind"]) == ("client", "FIN")
        return record

    @inlineCallbacks
    def test_unix_listener_and_backend(self) -> Inline:
        """unix: listener to unix: backend, copying through user space: 4 MiB echoed intact, counted exactly."""
        record = yield self.unix_echo("off")
        assert "spliced" not in record, record

    @inlineCallbacks
    def test_unix_listener_and_backend_spliced(self) -> Inline:
        """unix: listener to unix: backend, spliced from the join: 4 MiB echoed intact, counted exactly."""
        record = yield self.unix_echo("on")
        assert record["spliced"] is True, record

    @inlineCallbacks
    def test_exact_byte_counts(self) -> Inline:
        """100,000 bytes up and a 3,000,000-byte reply down are counted exactly; the backend's FIN closes."""
        up, down = os.urandom(100_000), os.urandom(3_000_000)

        def reply_then_close(conn: socket.socket) -> tuple[str, bytes]:
            request = recv_exactly(conn, len(up))
            conn.sendall(down)
            conn.shutdown(socket.SHUT_WR)
            return sha256(request), recv_all(conn)

        backend = self.serve(reply_then_close)
        fwd = self.forward("--to", backend.address)

        def client() -> bytes:
            with connect(fwd.address) as sock:
                sock.sendall(up)
                return recv_all(sock)

        received = yield deferToThread(client)
        assert len(received) == len(down) and sha256(received) == sha256(down)
        assert (yield deferToThread(backend.outcome)) == (sha256(up), b"")
        [record] = yield fwd.closed(1)
        assert (record["bytes_up"], record["bytes_down"]) == (100_000, 3_000_000)
        assert (record["closed_by"], record["close_kind"]) == ("backend", "FIN"), record

    @inlineCallbacks
    def test_drain_deadline_resets_idle_tunnel(self) -> Inline:
        """On stop an idle tunnel is cut at the 2 s drain deadline and logged as a shutdown."""
        from twisted.internet import reactor

        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address)
        sock = yield deferToThread(open_tunnel, fwd.address)
        self.addCleanup(sock.close)
        sock.settimeout(10)
        ended = deferToThread(recv_outcome, sock)
        started = reactor.seconds()
        yield fwd.stop()
        took = reactor.seconds() - started
        data, how = yield ended
        assert 1.5 <= took < 5, took
        assert data == b"" and how in ("EOF", "RST"), (data, how)
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("proxy", "shutdown"), record
        assert "drain deadline" in record["reason"], record
        assert (record["bytes_up"], record["bytes_down"]) == (4, 4)

    @inlineCallbacks
    def test_no_half_close_backend_first(self) -> Inline:
        """--no-half-close: the backend's FIN closes both sides, after its 1 MiB reached the client intact.

        The backend is closed at once; the client gets a FIN and its socket
        is closed once the client closes too (a lingering close, no RST).
        """
        payload = os.urandom(MiB)

        def speak_then_close(conn: socket.socket) -> bytes:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            return conn.recv(1)  # the proxy's FIN (half-close would wait for the client's)

        backend = self.serve(speak_then_close)
        fwd = self.forward("--to", backend.address, "--no-half-close")
        sock = yield deferToThread(connect, fwd.address)
        with sock:
            received = yield deferToThread(recv_all, sock)
            assert sha256(received) == sha256(payload)
            # The backend is closed while the client is still open.
            assert (yield deferToThread(backend.outcome)) == b""
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("backend", "FIN"), record
        assert (record["bytes_up"], record["bytes_down"]) == (0, MiB)

    @inlineCallbacks
    def test_no_half_close_client_first(self) -> Inline:
        """--no-half-close: the client's FIN closes both once its 1 MiB reached the backend: no reply comes back."""
        payload = os.urandom(MiB)

        def digest_then_answer(conn: socket.socket) -> tuple[int, str]:
            received = recv_all(conn)
            with contextlib.suppress(OSError):  # the proxy may have reset it by now
                conn.sendall(b"too late")
            return len(received), sha256(received)

        def send_then_read(address: str) -> tuple[bytes, str]:
            with connect(address) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                return recv_outcome(sock)

        backend = self.serve(digest_then_answer)
        fwd = self.forward("--to", backend.address, "--no-half-close")
        data, how = yield deferToThread(send_then_read, fwd.address)
        assert (data, how) == (b"", "EOF")
        assert (yield deferToThread(backend.outcome)) == (MiB, sha256(payload))
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("client", "FIN"), record
        assert (record["bytes_up"], record["bytes_down"]) == (MiB, 0)


@on_planes(ENGINE)
class EngineWaitTests(LoopbackTestCase):
    """On tunnelkit's reactor the engine does the reactor's waiting (the reactor's epoll nested in the engine's)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        super().setUp()
        if getattr(reactor, "nest_engine", None) is None:
            raise SkipTest("Twisted's own reactor: the engine is watched as a reader")

    @inlineCallbacks
    def test_the_engine_waits_for_the_reactor(self) -> Inline:
        """Nested while it runs, unnested after; tunnels relay and threads still wake the reactor."""
        from twisted.internet import reactor

        backend = self.serve(hashing_echo)
        fwd = self.forward("--to", backend.address)
        relay = fwd.service.native
        assert relay is not None
        assert reactor._engine_wait == relay.wait
        assert relay not in reactor.getReaders()
        # deferToThread comes back through the reactor's waker, nested in the engine's epoll.
        sock = yield deferToThread(connect, fwd.address)
        assert (yield deferToThread(echoes, sock, MiB))
        yield fwd.closed(1)
        yield fwd.stop()
        assert reactor._engine_wait is None

    @inlineCallbacks
    def test_a_failed_nest_falls_back_to_reading(self) -> Inline:
        """If the engine cannot watch the reactor's descriptor, the reactor is un-nested and watches the engine."""
        from twisted.internet import reactor

        real = reactor.nest_engine

        def bad_descriptor(wait: Any) -> int | None:
            fileno = real(wait)
            return -1 if wait is not None and fileno is not None else fileno

        self.patch(reactor, "nest_engine", bad_descriptor)
        backend = self.serve(hashing_echo)
        fwd = self.forward("--to", backend.address)
        assert len(self.flushLoggedErrors(OSError)) == 1
        assert reactor._engine_wait is None
        assert fwd.service.native in reactor.getReaders()
        sock = yield deferToThread(connect, fwd.address)
        assert (yield deferToThread(echoes, sock, MiB))

    def two_forwarders(self) -> tuple[Forwarder, Forwarder]:
        """Two forwarders in this process, both on the native engine, to one echo backend."""
        backend = self.serve(hashing_echo)
        return self.forward("--to", backend.address), self.forward("--to", backend.address)

    @inlineCallbacks
    def test_a_second_engine_leaves_the_first_served(self) -> Inline:
        """The reactor waits in one engine; a second relay in the process is watched as a reader: both relay."""
        first, second = self.two_forwarders()
        for fwd in (first, second):
            sock = yield deferToThread(connect, fwd.address)
            assert (yield deferToThread(echoes, sock, MiB))

    @inlineCallbacks
    def test_the_other_engine_relays_once_one_stops(self) -> Inline:
        """Stopping the nested relay leaves the other one served (and stopping that one too)."""
        for stopped in (0, 1):
            pair = self.two_forwarders()
            yield pair[stopped].stop()
            sock = yield deferToThread(connect, pair[1 - stopped].address)
            assert (yield deferToThread(echoes, sock, MiB))

    def nested_forwarder(self, backend_address: str) -> tuple[Forwarder, list[float | None]]:
        """A forwarder whose engine does the reactor's waiting, and the list of its wait() timeouts."""
        from twisted.internet import reactor

        fwd = self.forward("--to", backend_address)
        relay = fwd.service.native
        calls: list[float | None] = []

        def counted(timeout: float | None) -> bool:
            calls.append(timeout)
            return relay.wait(timeout)

        # Swap the relay's wait for the counting one (a reactor takes one engine).
        reactor.nest_engine(None)
        assert reactor.nest_engine(counted) is not None
        assert reactor._engine_wait is counted
        return fwd, calls

    @inlineCallbacks
    def test_relaying_stays_in_the_engine(self) -> Inline:
        """200 round trips through a tunnel come back to Python a handful of times, not once per event."""
        backend = self.serve(echo)
        fwd, calls = self.nested_forwarder(backend.address)
        sock = yield deferToThread(connect, fwd.address)
        self.addCleanup(sock.close)

        def round_trips() -> int:
            calls.clear()
            for i in range(200):
                message = b"%05d" % i
                sock.sendall(message)
                assert recv_exactly(sock, 5) == message
            return len(calls)

        returns = yield deferToThread(round_trips)
        assert returns < 20, returns

    @inlineCallbacks
    def test_records_come_while_other_tunnels_live(self) -> Inline:
        """With a tunnel held open (the engine never empties), a short one's record still reaches the log soon."""
        backend = self.serve(echo)
        fwd, _ = self.nested_forwarder(backend.address)
        held = yield deferToThread(open_tunnel, fwd.address)
        self.addCleanup(held.close)
        short = yield deferToThread(open_tunnel, fwd.address)
        assert (yield deferToThread(end_tunnel, short)) == b""
        [record] = yield fwd.closed(1, timeout=2)
        assert (record["closed_by"], record["close_kind"]) == ("client", "FIN"), record


class RecordedEngine:
    """Stands in for an Engine whose batch of records is ready to be taken."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records

    def take_notices(self) -> tuple[()]:
        return ()

    def take_records(self) -> list[Any]:
        taken, self.records = self.records, []
        return taken


class FlakyLog:
    """A listener's factory whose access log fails on the client named ``bad``."""

    listener = "127.0.0.1:0"

    def __init__(self, bad: str) -> None:
        self.bad = bad
        self.logged: list[str] = []

    def tunnel_log(self, record: TunnelRecord, listener: str) -> None:
        if record.client == self.bad:
            raise RuntimeError("the access log failed")
        self.logged.append(record.client)


class ReportTests(SynchronousTestCase):
    """The records of one batch from the engine are logged one by one."""

    def test_a_failing_record_costs_only_itself(self) -> None:
        """The access log failing on the first record of a batch: it is logged as a failure, the others still reach the log."""
        clients = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        records = [
            (
                0,
                client,
                "b",
                "127.0.0.1:9",
                1,
                1,
                2,
                0.5,
                0.1,
                0,
                0,
                "client sent FIN",
                False,
                None,
                None,
            )
            for client in clients
        ]
        factory = FlakyLog(bad=clients[0])
        relay = NativeRelay.__new__(NativeRelay)  # only what _report reads
        relay.engine = RecordedEngine(records)
        relay._factories = [factory]  # type: ignore[list-item]
        relay._report()
        assert factory.logged == clients[1:]
        [failure] = self.flushLoggedErrors(RuntimeError)
        assert failure.getErrorMessage() == "the access log failed"


def epoll_targets(epfd: int) -> list[int]:
    """The descriptors registered in epoll descriptor ``epfd`` of this process (from /proc)."""
    with open(f"/proc/self/fdinfo/{epfd}") as info:
        return [int(line.split()[1]) for line in info if line.startswith("tfd:")]


def test_no_registration_outlives_a_closed_socket() -> None:
    """A tunnel's sockets leave the engine's epoll when they close, even while another descriptor shares them.

    close() alone leaves the registration while a fork()ed child (before its
    exec) or a dup holds the socket, and its next event would name a freed tunnel.
    """
    try:
        from tunnelkit.engine import _engine
    except ImportError:
        raise SkipTest("the native engine is not built") from None
    with (
        socket.create_server(("127.0.0.1", 0)) as backend,
        socket.create_server(("127.0.0.1", 0)) as listener,
    ):
        listener.setblocking(False)
        engine = _engine.Engine(max_tunnels=10)
        profile = _engine.Profile(
            [("b", "127.0.0.1", backend.getsockname()[1])],
            65536,
            1 << 30,
            "off",
            0.0,
            0.0,
            2.0,
            5.0,
            log_records=False,
        )
        try:
            engine.add_listener(listener.fileno(), 0, profile)
            idle = set(epoll_targets(engine.fileno()))  # the listener and the engine's eventfd
            with socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT):
                deadline = time.monotonic() + IO_TIMEOUT
                while not [t for t in engine.tunnels() if t[2] == "joined"]:
                    assert time.monotonic() < deadline, engine.tunnels()
                    engine.run()
                    time.sleep(0.001)
                [(client_fd, _, _)] = engine.tunnels()
                held = os.dup(client_fd)  # what a fork()ed child holds until its exec
                try:
                    engine.abort_all("test")
                    assert set(epoll_targets(engine.fileno())) == idle
                finally:
                    os.close(held)
        finally:
            engine.close()
