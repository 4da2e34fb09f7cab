"""SNI mode in memory: the ClientHello to the backend its name routes to, untouched; every refusal."""

from __future__ import annotations

from typing import Any

from hellos import crafted, real_hello, sni_extension
from transports import HalfCloseTransport, MemoryListener
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.modes.sni import SniMode, SniSettings, alert_record
from tunnelkit.policy.sni_routes import SniRoutes, parse_route
from tunnelkit.relay.tunnel import TunnelRecord
from tunnelkit.tls.client_hello import DECODE_ERROR, INTERNAL_ERROR, UNRECOGNIZED_NAME

HELLO = real_hello("api.example.com", ["h2", "http/1.1"])


class Harness:
    """An SNI listener on a memory reactor; each route's backend is ``10.0.0.N:443``."""

    def __init__(
        self, *routes: str, default: str | None = None, header_timeout: float = 10.0
    ) -> None:
        self.reactor = MemoryReactorClock()
        parsed = [parse_route(text) for text in routes]
        table = SniRoutes((match, self.group(backend)) for match, backend in parsed)
        settings = SniSettings(table, default and self.group(default), header_timeout)
        self.listener = MemoryListener(SniMode(settings), self.reactor)
        self.records: list[TunnelRecord] = self.listener.records
        self.leg, self.client = self.listener.client()

    def group(self, address: str) -> BackendGroup:
        host, _, port = address.rpartition(":")
        endpoint = host_endpoint(self.reactor, host, int(port), 5.0)
        return BackendGroup([Backend(address, endpoint)], self.reactor, 5.0)

    def send(self, data: bytes) -> None:
        self.leg.dataReceived(data)

    def dialled(self) -> list[str]:
        return [f"{host}:{port}" for host, port, *_ in self.reactor.tcpClients]

    def connect_backend(self) -> HalfCloseTransport:
        """Complete the outbound connection the proxy started; return its transport."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        transport.protocol = protocol
        return transport

    def end(self, backend: HalfCloseTransport | None = None) -> TunnelRecord:
        """The record of the client's tunnel, once its connections (and ``backend``'s) are gone."""
        if not self.records:
            self.leg.connectionLost(Failure(ConnectionDone()))
        if backend is not None and not self.records:
            backend.protocol.connectionLost(Failure(ConnectionDone()))
        [record] = self.records
        return record


def details(record: TunnelRecord) -> dict[str, Any]:
    return dict(record.details)


class RoutingTests(SynchronousTestCase):
    """From the ClientHello to the backend its route names."""

    def test_hello_reaches_the_routed_backend_untouched(self) -> None:
        """The hello, and what follows it in the same read, go to the route's backend first, once."""
        h = Harness("api.example.com=10.0.0.1:443", "*.example.com=10.0.0.2:443")
        h.send(HELLO + b"early")
        self.assertEqual(h.dialled(), ["10.0.0.1:443"])
        self.assertEqual(h.client.value(), b"")  # nothing is answered: the backend speaks TLS
        backend = h.connect_backend()
        self.assertEqual(backend.value(), HELLO + b"early")
        h.send(b" more")
        self.assertEqual(backend.value(), HELLO + b"early more")
        self.assertEqual(
            details(h.end(backend)),
            {
                "mode": "sni",
                "sni": "api.example.com",
                "alpn_offered": "h2,http/1.1",
                "route": "api.example.com",
            },
        )

    def test_split_at_every_byte_position(self) -> None:
        """A hello split in two at any byte reaches the routed backend whole, and nothing is dialled before."""
        for at in range(1, len(HELLO)):
            h = Harness("*.example.com=10.0.0.2:443", default="10.0.0.9:443")
            h.send(HELLO[:at])
            self.assertEqual(h.dialled(), [], at)
            h.send(HELLO[at:])
            self.assertEqual(h.dialled(), ["10.0.0.2:443"], at)
            self.assertEqual(h.connect_backend().value(), HELLO, at)

    def test_alpn_route(self) -> None:
        """A client offering the route's protocol takes it; the others go by name."""
        h = Harness("api.example.com=10.0.0.1:443", "*,alpn=acme-tls/1=10.0.0.3:443")
        h.send(real_hello("api.example.com", ["acme-tls/1"]))
        self.assertEqual(h.dialled(), ["10.0.0.3:443"])
        self.assertEqual(details(h.end())["route"], "*,alpn=acme-tls/1")

    def test_unknown_name_goes_to_the_default(self) -> None:
        """A name no route takes goes to the --to backends."""
        h = Harness("a.test=10.0.0.1:443", default="10.0.0.9:443")
        h.send(HELLO)
        self.assertEqual(h.dialled(), ["10.0.0.9:443"])
        self.assertEqual(details(h.end())["route"], "default")

    def test_no_sni_goes_to_the_default(self) -> None:
        """A hello without SNI goes to the --to backends and records no name."""
        h = Harness("*=10.0.0.1:443", default="10.0.0.9:443")
        h.send(real_hello(None))
        self.assertEqual(h.dialled(), ["10.0.0.9:443"])
        self.assertNotIn("sni", details(h.end()))


class RefusalTests(SynchronousTestCase):
    """What a client gets when its hello cannot be routed: a TLS alert where TLS has one, a close."""

    def test_unknown_name_without_default(self) -> None:
        """No route and no default: an unrecognized_name alert and a close; nothing dialled."""
        h = Harness("a.test=10.0.0.1:443")
        h.send(HELLO)
        self.assertEqual(h.client.value(), alert_record(UNRECOGNIZED_NAME))
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(h.dialled(), [])
        record = h.end()
        self.assertEqual(record.reason, "no route for SNI 'api.example.com' and no default backend")
        self.assertEqual(details(record)["sni"], "api.example.com")

    def test_no_sni_without_default(self) -> None:
        """No SNI and no default: the same alert; the reason says there was no name."""
        h = Harness("*=10.0.0.1:443")
        h.send(real_hello(None))
        self.assertEqual(h.client.value(), alert_record(UNRECOGNIZED_NAME))
        self.assertEqual(h.end().reason, "no SNI and no default backend")

    def test_not_tls_is_closed_at_once(self) -> None:
        """Plain text is refused at its first byte with a plain close, even with a default backend."""
        h = Harness(default="10.0.0.9:443")
        h.send(b"GET / HTTP/1.1\r\n")
        self.assertEqual(h.client.value(), b"")
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(h.dialled(), [])
        self.assertEqual(h.end().reason, "bad ClientHello: not a TLS handshake (first byte 0x47)")

    def test_malformed_hello_gets_decode_error(self) -> None:
        """A malformed hello gets a decode_error alert, and what follows it is never relayed."""
        h = Harness(default="10.0.0.9:443")
        h.send(crafted([sni_extension(b"a.test", b"b.test")]))
        self.assertEqual(h.client.value(), alert_record(DECODE_ERROR))
        h.send(HELLO)
        self.assertEqual(h.client.value(), alert_record(DECODE_ERROR))
        self.assertEqual(h.dialled(), [])

    def test_too_big(self) -> None:
        """A first flight longer than the limit is closed from its header, without an alert."""
        h = Harness(default="10.0.0.9:443")
        h.send(b"\x16\x03\x01\x00\x04\x01\x00\x80\x00")
        self.assertEqual(h.client.value(), b"")
        self.assertTrue(h.client.disconnecting)
        self.assertIn("takes more than 16384 bytes", h.end().reason)

    def test_header_deadline(self) -> None:
        """A hello that has not all come at the header deadline is closed, without an alert."""
        h = Harness(default="10.0.0.9:443", header_timeout=3.0)
        h.send(HELLO[:100])
        h.reactor.advance(2.9)
        self.assertFalse(h.client.disconnecting)
        h.reactor.advance(0.2)
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(h.client.value(), b"")
        record = h.end()
        self.assertEqual(record.reason, "no complete ClientHello in 3 s")
        self.assertEqual(record.close_kind.value, "timeout")
        self.assertEqual(h.dialled(), [])

    def test_backend_refuses(self) -> None:
        """A backend that refuses the connection: an internal_error alert, then the close."""
        h = Harness(default="10.0.0.9:443")
        h.send(HELLO)
        connector = h.reactor.connectors[-1]
        _host, _port, factory, _t, _b = h.reactor.tcpClients[-1]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.assertEqual(h.client.value(), alert_record(INTERNAL_ERROR))
        self.assertTrue(h.client.disconnecting)

    def test_client_leaving_mid_hello(self) -> None:
        """A client gone in the middle of its hello leaves no timer behind and dials nothing."""
        h = Harness(default="10.0.0.9:443")
        h.send(HELLO[:10])
        h.leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertEqual(len(h.records), 1)
        self.assertEqual(h.dialled(), [])
