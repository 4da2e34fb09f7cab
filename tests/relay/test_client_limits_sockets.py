"""Per-client limits over real loopback sockets, on the engine and on Twisted's plane.

Clients come from distinct loopback addresses (127.0.0.2, .3, ...: Linux
routes all of 127/8 to lo, no root needed). Each refused client is closed at
once without a byte, unseen by the backend, counted in the listener's
counters and said in at most one ``client_limited`` line per client per
interval; the other clients relay SHA-256-checked payloads meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import attrs
from loopback import (
    Forwarder,
    LoopbackTestCase,
    connect_from,
    exchange,
    hashing_echo,
    recv_exactly,
    recv_outcome,
    settled,
    sha256,
)
from planes import TWISTED, on_each_plane, on_planes
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.policy import client_limits
from tunnelkit.proxy_protocol.build import v1
from tunnelkit.relay.counters import ListenerCounters

Inline = Generator[Deferred[Any], Any, None]


def joined(source: str, address: str) -> Any:
    """A client from ``source`` whose tunnel to the echo backend is joined (``ping`` came back)."""
    sock = connect_from(source, address)
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    return sock


def refused(source: str, address: str) -> tuple[bytes, str]:
    """Connect from ``source`` and send a byte: what came back before the proxy closed, and how."""
    with connect_from(source, address) as sock:
        try:
            sock.sendall(b"x")
        except ConnectionError:
            return b"", "RST"
        return recv_outcome(sock)


def echoes(sock: Any, size: int = 256 * 1024) -> bool:
    """A random payload and EOF through a joined tunnel come back intact."""
    payload = os.urandom(size)
    with sock:
        return sha256(exchange(sock, payload)) == sha256(payload)


def opened_and_closed(sources: list[str], address: str) -> None:
    """Each source opens a tunnel (joined) and closes it, one after another."""
    for source in sources:
        with joined(source, address) as sock:
            sock.shutdown(1)
            recv_outcome(sock)


class LimitsCase(LoopbackTestCase):
    """A forwarder to a hashing echo backend, and how to read its counters, table and log lines."""

    def forwarder(self, *args: str, listen: str = "127.0.0.1:0") -> Forwarder:
        self.backend = self.serve(hashing_echo)
        return self.forward("--to", self.backend.address, "--no-access-log", *args, listen=listen)

    def lines(self) -> list[LogEvent]:
        """The client_limited events logged from now until the test ends."""
        seen: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if event.get("event") == "client_limited":
                seen.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    def counters(self, fwd: Forwarder) -> ListenerCounters:
        if fwd.native:
            return fwd.service.native.counters(0)
        factory: Any = fwd.service.factories[0]
        return attrs.evolve(factory.counters)

    def tracked(self, fwd: Forwarder) -> int:
        """How many clients the listener's table remembers."""
        if fwd.native:
            return len(fwd.service.listeners[0].profile.clients)
        factory: Any = fwd.service.factories[0]
        return len(factory.client_limits)

    def settled(
        self, fwd: Forwarder, check: Callable[[ListenerCounters], bool]
    ) -> Deferred[ListenerCounters]:
        """Fires with the counters once ``check`` holds for them (polled; bounded)."""
        return settled(lambda: self.counters(fwd), check)


@on_each_plane
class ClientLimitsTests(LimitsCase):
    """--max-conn-per-client and --rate-per-client: refusals, counters, log lines, memory."""

    @inlineCallbacks
    def test_live_tunnels_per_client(self) -> Inline:
        """Two live tunnels from 127.0.0.2: its third is closed at once and counted; 127.0.0.3 and a later 127.0.0.2 relay."""
        lines = self.lines()
        fwd = self.forwarder("--max-conn-per-client", "2")
        first = yield deferToThread(joined, "127.0.0.2", fwd.address)
        second = yield deferToThread(joined, "127.0.0.2", fwd.address)
        self.addCleanup(first.close)
        data, how = yield deferToThread(refused, "127.0.0.2", fwd.address)
        assert data == b"" and how in ("EOF", "RST"), (data, how)
        other = yield deferToThread(joined, "127.0.0.3", fwd.address)
        assert (yield deferToThread(echoes, other))
        assert self.backend.accepted == 3
        assert [(e["limit"], e["client"].split(":")[0]) for e in lines] == [
            ("connections", "127.0.0.2")
        ]
        assert (yield deferToThread(echoes, second))
        yield self.settled(fwd, lambda c: c.active == 1)
        again = yield deferToThread(joined, "127.0.0.2", fwd.address)
        assert (yield deferToThread(echoes, again))
        counters = yield self.settled(fwd, lambda c: c.active == 1)
        assert (counters.accepted, counters.refused_client_connections) == (4, 1)
        assert counters.refused_client_rate == 0

    @inlineCallbacks
    def test_an_ipv6_client_is_its_address(self) -> Inline:
        """On an IPv6 listener, ::1's second live tunnel is refused at --max-conn-per-client 1."""
        fwd = self.forwarder("--max-conn-per-client", "1", listen="tcp6:0:interface=\\:\\:1")
        held = yield deferToThread(joined, "::1", fwd.address)
        self.addCleanup(held.close)
        data, _ = yield deferToThread(refused, "::1", fwd.address)
        assert data == b""
        assert (yield deferToThread(echoes, held))
        counters = yield self.settled(fwd, lambda c: c.active == 0)
        assert (counters.accepted, counters.refused_client_connections) == (1, 1)

    @inlineCallbacks
    def test_new_connections_per_client(self) -> Inline:
        """--rate-per-client 1/m with a burst of 2: 127.0.0.2's third and later connections are refused and logged once."""
        lines = self.lines()
        fwd = self.forwarder("--rate-per-client", "1/m", "--rate-burst", "2")
        yield deferToThread(opened_and_closed, ["127.0.0.2"] * 2, fwd.address)
        for _ in range(5):
            data, how = yield deferToThread(refused, "127.0.0.2", fwd.address)
            assert data == b"" and how in ("EOF", "RST"), (data, how)
        other = yield deferToThread(joined, "127.0.0.3", fwd.address)
        assert (yield deferToThread(echoes, other))
        counters = yield self.settled(fwd, lambda c: c.active == 0)
        assert counters == ListenerCounters(
            accepted=3,
            refused_client_rate=5,
            bytes_up=counters.bytes_up,
            bytes_down=counters.bytes_down,
        )
        assert self.backend.accepted == 3
        assert [(e["limit"], e["refused"], e["listener"]) for e in lines] == [
            ("rate", 1, fwd.service.listeners[0].name)
        ]

    @inlineCallbacks
    def test_a_flood_of_addresses_keeps_memory_bounded(self) -> Inline:
        """40 client addresses in turn leave at most `tracked` (8 here) clients remembered, and the limits hold."""
        self.patch(client_limits, "TRACKED", 8)
        fwd = self.forwarder("--rate-per-client", "1/m", "--rate-burst", "1")
        sources = [f"127.0.1.{n}" for n in range(1, 41)]
        yield deferToThread(opened_and_closed, sources, fwd.address)
        counters = yield self.settled(fwd, lambda c: c.active == 0)
        assert counters.accepted == 40
        assert self.tracked(fwd) == 8
        # The last ones are remembered: their buckets are empty.
        data, _ = yield deferToThread(refused, sources[-1], fwd.address)
        assert data == b""
        counters = yield self.settled(fwd, lambda c: c.refused_client_rate == 1)
        assert self.tracked(fwd) == 8


def through_proxy(address: str, header: bytes, payload: bytes) -> bytes:
    """Send a PROXY ``header``, ``payload`` and EOF as a trusted proxy would; what came back."""
    with connect_from("127.0.0.1", address) as sock:
        sock.sendall(header + payload)
        sock.shutdown(1)
        return recv_outcome(sock)[0]


@on_planes(TWISTED)
class CarriedAddressTests(LimitsCase):
    """With --accept-proxy-protocol the limits count the carried client, not the proxy"""

    @inlineCallbacks
    def test_the_carried_address_is_the_client(self) -> Inline:
        """One live tunnel per carried client: a second from 203.0.113.7 is refused, 192.0.2.1 through the same proxy relays."""
        front = ("198.51.100.9", 443)
        fwd = self.forwarder(
            "--max-conn-per-client",
            "1",
            "--accept-proxy-protocol",
            "--trusted-proxies",
            "127.0.0.1",
        )
        held = yield deferToThread(connect_from, "127.0.0.1", fwd.address)
        self.addCleanup(held.close)
        held.sendall(v1(("203.0.113.7", 1), front) + b"ping")
        assert (yield deferToThread(recv_exactly, held, 4)) == b"ping"
        got = yield deferToThread(through_proxy, fwd.address, v1(("203.0.113.7", 2), front), b"x")
        assert got == b""
        payload = os.urandom(64 * 1024)
        got = yield deferToThread(through_proxy, fwd.address, v1(("192.0.2.1", 3), front), payload)
        assert sha256(got) == sha256(payload)
        counters = yield self.settled(fwd, lambda c: c.active == 1)
        assert (counters.accepted, counters.refused_client_connections) == (3, 1)
        assert self.backend.accepted == 2
