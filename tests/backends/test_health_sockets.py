"""Health checks over real loopback sockets: a backend going away and back, send/expect, TLS.

The checker runs with a short interval against servers on this reactor;
every wait is for an observed event (a check logged, a backend marked), with
the test's timeout as the only bound.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import trustme
from certs import write_ca
from OpenSSL import SSL
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import LogEvent, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tunnelkit.backends.endpoints import AddressEndpoint
from tunnelkit.backends.group import Backend
from tunnelkit.backends.health import HealthChecker, HealthSettings
from tunnelkit.config.model import BackendTLSSettings
from tunnelkit.tls.backend import BackendTLS, TLSClientEndpoint

reactor: Any = _reactor
Inline = Generator[Deferred[Any], Any, None]

#: Short, so that a test sees many checks; the checks' own timeout bounds each one.
INTERVAL = 0.05
CHECK_TIMEOUT = 5.0


class Served(Protocol):
    """One connection to a :class:`Server`: answers ``PING\\r\\n`` with the server's answer."""

    factory: Server

    def connectionMade(self) -> None:
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()
        self.factory.live.add(self)
        self.factory.connections += 1
        if not self.factory.connected.called:
            self.factory.connected.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.endswith(b"\r\n"):
            self.factory.received.append(self.buffer)
            assert self.transport is not None
            self.transport.write(self.factory.answer)
            if self.factory.close_after_answer:
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.live.discard(self)
        self.closed.callback(None)


class Server(Factory):
    """A backend on this reactor that counts connections and records what it was sent."""

    protocol = Served
    noisy = False

    def __init__(self, answer: bytes = b"+PONG\r\n", close_after_answer: bool = False) -> None:
        self.answer = answer
        self.close_after_answer = close_after_answer
        self.live: set[Served] = set()
        self.connections = 0
        #: Fires on the first connection.
        self.connected: Deferred[None] = Deferred()
        self.received: list[bytes] = []

    def close_all(self) -> Deferred[Any]:
        """Reset every connection still open; fires once they are closed."""
        live = list(self.live)
        for served in live:
            assert served.transport is not None
            served.transport.abortConnection()
        return gatherResults([served.closed for served in live])


@implementer(IOpenSSLContextFactory)
class ServerContext:
    """A TLS server's context for ``listenSSL``, with ``leaf`` as its certificate."""

    def __init__(self, leaf: trustme.LeafCert) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        leaf.configure_cert(self.context)

    def getContext(self) -> SSL.Context:
        return self.context


class Watch:
    """The checker's target: records marks and checks, and wakes the test on a condition."""

    def __init__(self, endpoints: Sequence[IStreamClientEndpoint]) -> None:
        self.backends = tuple(Backend(f"b{i}", ep) for i, ep in enumerate(endpoints))
        self.clock = reactor
        self.marks: list[tuple[int, bool, str]] = []
        self.checks: list[tuple[int, bool, str]] = []
        self.log = Logger(observer=self._observe)
        self.waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self.checker: HealthChecker | None = None

    def is_up(self, index: int) -> bool:
        return True

    def mark(self, index: int, up: bool, reason: str) -> None:
        self.marks.append((index, up, reason))
        self._wake()

    def checked(self, index: int, passed: bool) -> None:
        """Counted by the group; the log events here say the same."""

    def passes(self, index: int) -> int:
        return sum(1 for i, passed, _ in self.checks if i == index and passed)

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        """Fires once ``condition()`` holds (checked after every check and mark)."""
        waiting: Deferred[None] = Deferred()
        self.waiting.append((condition, waiting))
        self._wake()
        return waiting

    def _observe(self, event: LogEvent) -> None:
        if event.get("event") == "health_check":
            self.checks.append((event["index"], event["passed"], event["why"]))
            self._wake()

    def _wake(self) -> None:
        for entry in list(self.waiting):
            condition, waiting = entry
            if condition():
                self.waiting.remove(entry)
                waiting.callback(None)


class HealthSocketTests(TestCase):
    """Checks through real endpoints against real listening sockets."""

    timeout = 60

    def listen(self, server: Server, port: int = 0, context: Any = None) -> IListeningPort:
        listening: IListeningPort
        if context is None:
            listening = reactor.listenTCP(port, server, interface="127.0.0.1")
        else:
            listening = reactor.listenSSL(port, server, context, interface="127.0.0.1")
        self.addCleanup(server.close_all)
        self.addCleanup(listening.stopListening)
        return listening

    def tcp(self, port: IListeningPort) -> AddressEndpoint:
        return AddressEndpoint(reactor, "127.0.0.1", port.getHost().port)  # type: ignore[attr-defined]

    def checked(self, endpoints: Sequence[IStreamClientEndpoint], **settings: Any) -> Watch:
        """Start a checker of ``endpoints`` (stopped after the test, before the servers)."""
        watch = Watch(endpoints)
        settings = {"interval": INTERVAL, "timeout": CHECK_TIMEOUT} | settings
        checker = HealthChecker(watch, HealthSettings(**settings), log=watch.log)
        checker.start()
        self.addCleanup(checker.stop)
        watch.checker = checker
        return watch

    def tls_authority(self) -> tuple[trustme.CA, BackendTLS]:
        """A CA, and TLS towards backends that trusts it alone."""
        directory = Path(tempfile.mkdtemp(prefix="tunnelkit-health-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        ca = trustme.CA()
        return ca, BackendTLS(BackendTLSSettings(ca=str(write_ca(ca, directory))))

    def tls(self, port: IListeningPort, tls: BackendTLS) -> TLSClientEndpoint:
        """The endpoint of a TLS backend named ``localhost`` on ``port``, as the service builds it."""
        return TLSClientEndpoint(
            self.tcp(port),
            tls.creator("localhost"),
            read_size=65536,
            diagnose=lambda connection, failure: tls.diagnose("localhost", connection, failure),
        )

    @inlineCallbacks
    def test_down_after_fall_and_up_after_rise(self) -> Inline:
        """A server that stops listening is marked down after 3 refused checks, and up after 2 passes."""
        server = Server()
        port = self.listen(server)
        number = port.getHost().port  # type: ignore[attr-defined]
        watch = self.checked([self.tcp(port)], rise=2, fall=3)
        yield watch.until(lambda: watch.passes(0) >= 3)
        self.assertEqual(watch.marks, [])
        self.assertGreaterEqual(server.connections, 3)

        yield port.stopListening()
        yield watch.until(lambda: len(watch.marks) == 1)
        [(index, up, reason)] = watch.marks
        self.assertEqual((index, up), (0, False))
        self.assertTrue(reason.startswith("3 health checks failed: Connection was refused"), reason)

        self.listen(server, number)
        yield watch.until(lambda: len(watch.marks) == 2)
        self.assertEqual(watch.marks[1], (0, True, "2 health checks passed"))

    @inlineCallbacks
    def test_send_and_expect(self) -> Inline:
        """send is written on each check; a server answering something else is marked down."""
        good, bad = Server(), Server(b"-ERR\r\n", close_after_answer=True)
        endpoints = [self.tcp(self.listen(good)), self.tcp(self.listen(bad))]
        watch = self.checked(endpoints, send=b"PING\r\n", expect=b"+PONG", fall=1)
        yield watch.until(lambda: watch.passes(0) >= 3 and len(watch.marks) == 1)
        why = "closed after 6 bytes without the expected response: Connection was closed cleanly."
        self.assertEqual(watch.marks, [(1, False, f"1 health check failed: {why}")])
        self.assertEqual(set(good.received), {b"PING\r\n"})

    @inlineCallbacks
    def test_tls_handshake_and_certificate(self) -> Inline:
        """A TLS check passes with a good certificate and fails on a wrong name or an unknown CA."""
        ca, tls = self.tls_authority()
        stranger = trustme.CA()
        servers = [Server(), Server(), Server()]
        issued = [
            ca.issue_cert("localhost"),
            ca.issue_cert("other.example"),
            stranger.issue_cert("localhost"),
        ]
        endpoints = [
            self.tls(self.listen(server, context=ServerContext(leaf)), tls)
            for server, leaf in zip(servers, issued, strict=True)
        ]
        watch = self.checked(endpoints, send=b"PING\r\n", expect=b"+PONG", fall=1)
        yield watch.until(lambda: watch.passes(0) >= 2 and len(watch.marks) == 2)
        marks = {index: (up, reason) for index, up, reason in watch.marks}
        self.assertEqual(sorted(marks), [1, 2])
        self.assertFalse(marks[1][0] or marks[2][0])
        self.assertIn("hostname mismatch, the certificate is for other.example", marks[1][1])
        self.assertIn("certificate verify failed", marks[2][1])
        self.assertEqual(set(servers[0].received), {b"PING\r\n"})
        self.assertEqual(servers[1].received + servers[2].received, [])

    @inlineCallbacks
    def test_silent_tls_handshake_times_out(self) -> Inline:
        """A backend that accepts and never answers the handshake fails the check at its timeout."""
        silent = Server(answer=b"")
        _, tls = self.tls_authority()
        watch = self.checked([self.tls(self.listen(silent), tls)], timeout=0.2, fall=1)
        yield watch.until(lambda: len(watch.marks) == 1)
        self.assertEqual(
            watch.marks, [(0, False, "1 health check failed: connect timeout (0.2 s)")]
        )
        self.assertGreaterEqual(silent.connections, 1)

    @inlineCallbacks
    def test_stop_during_tls_handshake(self) -> Inline:
        """stop() during a handshake gives no verdict and leaves no socket (trial checks the reactor)."""
        silent = Server(answer=b"")
        _, tls = self.tls_authority()
        watch = self.checked([self.tls(self.listen(silent), tls)])
        yield silent.connected
        assert watch.checker is not None
        yield watch.checker.stop()
        self.assertEqual(watch.checks, [])

    @inlineCallbacks
    def test_unix_backends(self) -> Inline:
        """A UNIX-socket backend is checked through its endpoint too: a missing socket goes down."""
        directory = Path(tempfile.mkdtemp(prefix="tunnelkit-health-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        server = Server()
        port = reactor.listenUNIX(str(directory / "up.sock"), server)
        self.addCleanup(server.close_all)
        self.addCleanup(port.stopListening)
        endpoints = [
            clientFromString(reactor, f"unix:path={directory / name}")
            for name in ("up.sock", "missing.sock")
        ]
        watch = self.checked(endpoints, send=b"PING\r\n", expect=b"+PONG", fall=2)
        yield watch.until(lambda: watch.passes(0) >= 2 and len(watch.marks) == 1)
        [(index, up, reason)] = watch.marks
        self.assertEqual((index, up), (1, False))
        self.assertTrue(reason.startswith("2 health checks failed: "), reason)
        self.assertIn("No such file or directory", reason)
