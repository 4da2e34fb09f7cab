"""UDP forwarding over real loopback sockets, in-process: many clients, IPv6, ICMP, oversized, --udp-replies."""

from __future__ import annotations

import os
import random
import socket
from typing import Any

from loopback import Forwarder
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from udp_peers import MAX_DATAGRAM, Echo, PingPong, SessionRecords, digest


def _closed_port(host: str) -> int:
    """A UDP port nothing listens on (bound, then closed): datagrams to it draw ICMP port unreachable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _udp(host: str, port: int) -> str:
    return f"udp:[{host}]:{port}" if ":" in host else f"udp:{host}:{port}"


class UdpForwardingTests(TestCase):
    """A udp: listener of the real service, with backends and clients on the reactor."""

    timeout = 15

    def setUp(self) -> None:
        self.sessions = SessionRecords()
        self.addCleanup(self.sessions.close)

    def backend(self, protocol: Any, host: str = "127.0.0.1") -> int:
        port = reactor.listenUDP(0, protocol, interface=host, maxPacketSize=MAX_DATAGRAM)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def forward(
        self, to: str, *args: str, host: str = "127.0.0.1"
    ) -> tuple[Forwarder, tuple[str, int]]:
        forwarder = Forwarder("--to", to, *args, listen=_udp(host, 0))
        self.addCleanup(lambda: forwarder.stop() if forwarder.service.running else None)
        bound = forwarder.service.ports[0].getHost()
        return forwarder, (bound.host, bound.port)

    def client(self, address: tuple[str, int], datagrams: list[bytes]) -> PingPong:
        protocol = PingPong(address, datagrams)
        interface = "::" if ":" in address[0] else ""
        port = reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return protocol

    def ping(self, address: tuple[str, int], datagrams: list[bytes]) -> PingPong:
        client = self.client(address, datagrams)
        client.start()
        return client

    @inlineCallbacks
    def test_many_clients_each_get_only_their_own_datagrams(self) -> Any:
        """Twenty clients at once: each gets back exactly its own datagrams, whole and in order, from the listening address.

        Each client has one datagram in flight, so all of them fit the
        sockets' default receive buffers (a burst beyond them is dropped by
        the kernel, as UDP allows).
        """
        echo = Echo()
        forwarder, address = self.forward(
            _udp("127.0.0.1", self.backend(echo)), "--udp-session-rate", "100"
        )
        rng = random.Random(21)
        sent = [
            [os.urandom(rng.choice([1, 64, 512, 1400, 4000])) for _ in range(25)] for _ in range(20)
        ]
        clients = [self.ping(address, datagrams) for datagrams in sent]
        replies = yield gatherResults([c.done for c in clients])
        for datagrams, got, client in zip(sent, replies, clients, strict=True):
            self.assertEqual(digest(got), digest(datagrams))
            self.assertEqual(client.sources, {address})
        self.assertEqual(len(echo.senders), 20)  # a session (its own socket) per client
        yield forwarder.stop()
        records = yield self.sessions.first(20)
        self.assertEqual({r["reason"] for r in records}, {"shutdown"})
        self.assertEqual(sum(r["datagrams_up"] for r in records), 500)
        self.assertEqual(
            sum(r["bytes_down"] for r in records), sum(len(d) for each in sent for d in each)
        )

    @inlineCallbacks
    def test_ipv6(self) -> Any:
        """udp:[::1]:0 to an IPv6 backend: datagrams both ways, the record names both addresses."""
        forwarder, address = self.forward(_udp("::1", self.backend(Echo(), "::1")), host="::1")
        sent = [os.urandom(size) for size in (1, 1000, 65000)]
        got = yield self.ping(address, sent).done
        self.assertEqual(digest(got), digest(sent))
        yield forwarder.stop()
        [record] = yield self.sessions.first(1)
        self.assertTrue(record["client"].startswith("[::1]:"))
        self.assertTrue(record["backend_address"].startswith("[::1]:"))

    @inlineCallbacks
    def test_icmp_port_unreachable_ends_the_session(self) -> Any:
        """A backend port nothing listens on: the kernel's ICMP error ends the session, counted and recorded."""
        forwarder, address = self.forward(_udp("127.0.0.1", _closed_port("127.0.0.1")))
        self.ping(address, [b"anyone there?"])
        [record] = yield self.sessions.first(1)
        self.assertEqual(record["reason"], "backend refused (ICMP port unreachable)")
        [table] = [p.protocol.table for p in forwarder.service.ports]  # type: ignore[attr-defined]
        self.assertEqual(table.counters.backend_refused, 1)

    @inlineCallbacks
    def test_oversized_datagram_is_counted_and_dropped(self) -> Any:
        """65,520 bytes from an IPv6 client cannot go to an IPv4 backend (65,507 at most): dropped and counted, the next one passes."""
        forwarder, address = self.forward(_udp("127.0.0.1", self.backend(Echo())), host="::1")
        client = self.client(address, [b"small"])
        client.transport.write(b"x" * 65520, address)  # type: ignore[union-attr]
        client.start()  # the oversized datagram gets no reply: the next follows at once
        got = yield client.done
        self.assertEqual(got, [b"small"])
        yield forwarder.stop()
        [record] = yield self.sessions.first(1)
        self.assertEqual((record["oversized"], record["datagrams_up"]), (1, 1))

    @inlineCallbacks
    def test_udp_replies_one(self) -> Any:
        """--udp-replies 1: the first reply goes back and ends the session; the backend's second is not relayed."""
        forwarder, address = self.forward(
            _udp("127.0.0.1", self.backend(Echo(copies=2))), "--udp-replies", "1"
        )
        client = self.ping(address, [b"query"])
        got = yield client.done
        self.assertEqual(got, [b"0:query"])
        [record] = yield self.sessions.first(1)
        self.assertEqual((record["reason"], record["datagrams_down"]), ("1 reply", 1))
        client.datagrams.append(b"again")  # a new session, with one reply again
        client.done = type(client.done)()
        client.transport.write(b"again", address)  # type: ignore[union-attr]
        got = yield client.done
        self.assertEqual(got[-1], b"0:again")
        self.assertEqual(len(client.replies), 2)
        yield forwarder.stop()

    @inlineCallbacks
    def test_sessions_log_only_their_record(self) -> Any:
        """A session's socket logs no "starting on"/"Closed" lines of its own: its record says it all."""
        lines: list[str] = []

        def observe(event: LogEvent) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        forwarder, address = self.forward(
            _udp("127.0.0.1", self.backend(Echo())), "--udp-replies", "1"
        )
        for _ in range(3):
            yield self.ping(address, [b"q"]).done
        yield self.sessions.first(3)
        yield forwarder.stop()
        self.assertEqual([line for line in lines if "BackendProtocol" in line], [])
        self.assertEqual(
            [line for line in lines if "Closed)" in line], [f"(UDP Port {address[1]} Closed)"]
        )

    @inlineCallbacks
    def test_health_checks_take_a_silent_port_out(self) -> Any:
        """--health-send/--health-expect: a backend port nothing listens on is marked down (ICMP), and every session goes to the one that answers."""
        down: Deferred[LogEvent] = Deferred()

        def observe(event: LogEvent) -> None:
            if event.get("event") == "backend_down" and not down.called:
                down.callback(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        echo = Echo()
        live = _udp("127.0.0.1", self.backend(echo))
        dead = _udp("127.0.0.1", _closed_port("127.0.0.1"))
        forwarder, address = self.forward(
            live, "--to", dead, "--health-interval", "0.05", "--health-send", "ping",
            "--health-expect", "ping", "--fall", "1", "--udp-session-rate", "100",
        )  # fmt: skip
        event = yield down
        self.assertEqual(event["backend"], dead)
        self.assertIn("ICMP port unreachable", event["reason"])
        clients = [self.ping(address, [b"hello %d" % i]) for i in range(8)]
        replies = yield gatherResults([c.done for c in clients])
        self.assertEqual(replies, [[b"hello %d" % i] for i in range(8)])
        yield forwarder.stop()
        records = yield self.sessions.first(8)
        self.assertEqual({r["backend"] for r in records}, {live})

    @inlineCallbacks
    def test_a_flood_of_source_ports_opens_at_most_the_per_source_cap(self) -> Any:
        """A hundred source ports of one address: ten sessions (ten backend sockets), the rest counted and dropped."""
        echo = Echo()
        forwarder, address = self.forward(
            _udp("127.0.0.1", self.backend(echo)), "--udp-sessions-per-source", "10"
        )
        [table] = [p.protocol.table for p in forwarder.service.ports]  # type: ignore[attr-defined]
        flood = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(100)]
        try:
            for sock in flood:
                sock.sendto(b"x", address)
            for _ in range(500):  # bounded: until every datagram was admitted or refused
                if table.counters.sessions + sum(table.counters.refused.values()) >= 100:
                    break
                yield deferLater(reactor, 0.01, lambda: None)
        finally:
            for sock in flood:
                sock.close()
        self.assertEqual(table.counters.sessions, 10)
        self.assertEqual(table.counters.refused, {"sessions_per_source": 90})
        self.assertEqual(len(table.sessions), 10)
        yield forwarder.stop()
