"""``--mode auto`` in memory: which mode the first bytes name, whatever their chunking, and what is left for it.

The modes handed to are scripted here (a line reader standing for SOCKS5 and
CONNECT, which read before routing; plain forwarding, which reads nothing),
so these tests pin down the peek alone: every byte reaches the chosen mode
once and in order, silent clients and unknown protocols go to ``--to`` or
are closed, and the deadlines hold. The real modes behind one port are
tested end to end in tests/modes/test_auto_e2e.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from transports import HalfCloseTransport, MemoryListener
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.modes.auto import PEEK, AutoMode, AutoModes, detect
from tunnelkit.relay.phases import Mode, Refused, Route
from tunnelkit.relay.tunnel import CloseKind, Tunnel


class LineMode(Mode):
    """Reads one line through the client leg's intercept (as SOCKS5 and CONNECT read), holds the rest."""

    def __init__(self, name: str, reactor: MemoryReactorClock, port: int) -> None:
        self.name = name
        self.lines: list[bytes] = []
        self.group = BackendGroup(
            [Backend(name, host_endpoint(reactor, "127.0.0.1", port, 5.0))], reactor, 5.0
        )

    def identify(self, tunnel: Tunnel) -> Deferred[bytes]:
        seen = bytearray()
        found: Deferred[bytes] = Deferred()

        def feed(data: bytes) -> None:
            seen.extend(data)
            line, newline, rest = bytes(seen).partition(b"\n")
            if newline:
                tunnel.client.intercept(None)
                tunnel.client.hold(rest)
                self.lines.append(line)
                found.callback(line)

        tunnel.client.intercept(feed)
        return found

    def route(self, tunnel: Tunnel, request: bytes) -> Route:
        if request.endswith(b"refuse me"):
            raise Refused("refused by the line mode", status=403)
        return Route(self.group)


class ForwardTo(Mode):
    """Reads nothing: every client to one backend (as ``--to`` does)."""

    def __init__(self, reactor: MemoryReactorClock, port: int) -> None:
        self.group = BackendGroup(
            [Backend("other", host_endpoint(reactor, "127.0.0.1", port, 5.0))], reactor, 5.0
        )

    def route(self, tunnel: Tunnel, request: None) -> Route:
        return Route(self.group)


SOCKS, CONNECT, TLS, OTHER = 1080, 3128, 443, 80


class AutoTests(SynchronousTestCase):
    def listen(self, *, tls: bool = True, other: bool = True) -> None:
        self.reactor = MemoryReactorClock()
        self.modes = AutoModes(
            socks5=LineMode("socks5", self.reactor, SOCKS),
            connect=LineMode("connect", self.reactor, CONNECT),
            tls=LineMode("sni", self.reactor, TLS) if tls else None,
            other=ForwardTo(self.reactor, OTHER) if other else None,
        )
        self.listener = MemoryListener(AutoMode(self.modes, 2.0, 10.0), self.reactor)
        self.leg, self.client = self.listener.client()

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.leg.dataReceived(chunk)

    def dialed(self) -> list[int]:
        return [port for _host, port, *_ in self.reactor.tcpClients]

    def backend_receives(self) -> bytes:
        """Connect the dialed backend; what the relay sends it first."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, port))
        factory.buildProtocol(transport.getPeer()).makeConnection(transport)
        return transport.value()

    def closed(self) -> Any:
        self.assertTrue(self.client.disconnecting or self.client.aborted)
        self.leg.connectionLost(_lost())
        [record] = self.listener.records
        return record

    def test_socks5_greeting_goes_to_socks5_with_every_byte(self) -> None:
        self.listen()
        self.send(b"\x05\x01\x00", b"rest\nafter")
        self.assertEqual(self.modes.socks5.lines, [b"\x05\x01\x00rest"])  # type: ignore[attr-defined]
        self.assertEqual(self.dialed(), [SOCKS])
        self.assertEqual(self.backend_receives(), b"after")

    def test_connect_split_at_every_byte_goes_to_connect(self) -> None:
        """However the method arrives, CONNECT gets the whole head once."""
        head = b"CONNECT example.org:443 HTTP/1.1\n"
        for split in range(1, PEEK + 2):
            with self.subTest(split=split):
                self.listen()
                self.send(*[head[i : i + 1] for i in range(split)], head[split:])
                self.assertEqual(self.modes.connect.lines, [head[:-1]])  # type: ignore[attr-defined]
                self.assertEqual(self.dialed(), [CONNECT])

    def test_a_tls_client_goes_to_the_sni_router(self) -> None:
        self.listen()
        self.send(b"\x16\x03\x01 hello\n")
        self.assertEqual(self.dialed(), [TLS])

    def test_without_sni_routes_a_tls_client_goes_to_the_default(self) -> None:
        self.listen(tls=False)
        self.send(b"\x16\x03\x01 hello")
        self.assertEqual(self.dialed(), [OTHER])
        self.assertEqual(self.backend_receives(), b"\x16\x03\x01 hello")

    def test_anything_else_goes_to_the_default_untouched(self) -> None:
        """An HTTP GET, and a method that only starts like CONNECT: --to gets every byte."""
        for first in (b"GET / HTTP/1.1\r\n\r\n", b"CONNEXION", b"C+", b"CONNECT\t"):
            with self.subTest(first=first):
                self.listen()
                self.send(first, b"+more")
                self.assertEqual(self.dialed(), [OTHER])
                self.assertEqual(self.backend_receives(), first + b"+more")

    def test_an_unknown_protocol_without_a_default_is_closed(self) -> None:
        self.listen(other=False)
        self.send(b"SSH-2.0-OpenSSH_9.2\r\n")
        record = self.closed()
        self.assertIn("unknown protocol", record.reason)
        self.assertEqual(record.details["mode"], "auto")
        self.assertEqual(self.dialed(), [])

    def test_a_silent_client_goes_to_the_default_after_the_detect_timeout(self) -> None:
        """Server-speaks-first protocols: nothing sent, then --to."""
        self.listen()
        self.reactor.advance(1.9)
        self.assertEqual(self.dialed(), [])
        self.reactor.advance(0.2)
        self.assertEqual(self.dialed(), [OTHER])
        self.assertEqual(self.backend_receives(), b"")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_silent_client_without_a_default_is_closed_as_a_timeout(self) -> None:
        self.listen(other=False)
        self.reactor.advance(2.1)
        record = self.closed()
        self.assertEqual(record.close_kind, CloseKind.TIMEOUT)
        self.assertIn("sent nothing", record.reason)

    def test_a_client_that_starts_then_stalls_meets_the_header_deadline(self) -> None:
        """Bytes that might still be CONNECT: the header deadline from the accept, not the detect one."""
        self.listen()
        self.reactor.advance(1.0)
        self.send(b"CONN")
        self.reactor.advance(8.9)
        self.assertEqual(self.dialed(), [])
        self.reactor.advance(0.2)
        record = self.closed()
        self.assertEqual(record.close_kind, CloseKind.TIMEOUT)
        self.assertEqual(self.dialed(), [])

    def test_the_chosen_mode_answers_its_refusals_and_is_recorded(self) -> None:
        self.listen()
        self.send(b"\x05refuse me\n")
        record = self.closed()
        self.assertEqual(record.reason, "refused by the line mode")
        self.assertEqual(record.details["mode"], "socks5")

    def test_a_client_leaving_while_peeking_leaves_no_timer(self) -> None:
        self.listen()
        self.send(b"CO")
        self.leg.connectionLost(_lost())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.listener.records), 1)


@pytest.mark.parametrize(
    ("first", "named"),
    [
        (b"", True),
        (b"\x05", "socks5"),
        (b"\x16", "tls"),
        (b"C", True),
        (b"CONNECT", True),
        (b"CONNECT ", "connect"),
        (b"connect ", "other"),
        (b"\x04\x01", "other"),  # SOCKS4 is not served
        (b"POST", "other"),
    ],
)
def test_detect(first: bytes, named: Any) -> None:
    modes = AutoModes(socks5=Mode(), connect=Mode(), tls=Mode(), other=Mode())
    found = detect(first, modes)
    assert found is True if named is True else found is getattr(modes, named)


def _lost() -> Any:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    return Failure(ConnectionDone())
