"""CONNECT mode in memory: request to join, every refusal, one lookup, cancellation."""

from __future__ import annotations

from proxy_harness import LOOPBACK, PUBLIC, ProxyHarness
from transports import HalfCloseTransport
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.backends.resolver import ResolveError
from tunnelkit.modes.connect import ConnectMode
from tunnelkit.policy.targets import TargetPolicy

#: A CONNECT request with the Basic credentials user:s3cret.
WITH_CREDENTIALS = (
    b"CONNECT example.org:443 HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpzM2NyZXQ=\r\n\r\n"
)


class Harness(ProxyHarness):
    """A CONNECT listener on a memory reactor."""

    mode = ConnectMode

    def response(self) -> bytes:
        return bytes(self.client.value())


class ConnectModeTests(SynchronousTestCase):
    """The CONNECT session from request head to join or refusal."""

    def test_pipelined_bytes_reach_target_after_200(self) -> None:
        """Bytes after the header in the same read go to the target exactly once, after the 200."""
        h = Harness(TargetPolicy.from_options(allow=["example.org"]))
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\nHELLO")
        self.assertEqual(h.response(), b"")
        backend = h.connect_backend()
        self.assertEqual(h.response(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(backend.value(), b"HELLO")
        self.assertEqual(h.client.producerState, "producing")
        h.send(b" WORLD")
        self.assertEqual(backend.value(), b"HELLO WORLD")

    def test_header_byte_by_byte(self) -> None:
        """A header arriving one byte at a time still yields one tunnel to the named target."""
        h = Harness()
        for byte in b"CONNECT example.org:443 HTTP/1.0\r\n\r\n":
            h.send(bytes([byte]))
        self.assertEqual(h.lookups, [("example.org", 443)])
        self.assertEqual(h.reactor.tcpClients[-1][:2], (str(PUBLIC), 443))

    def test_one_lookup_and_connect_to_the_checked_address(self) -> None:
        """DNS rebinding: the name is resolved once and the checked public address is dialled."""
        h = Harness()
        h.send(b"CONNECT rebind.example:443 HTTP/1.1\r\n\r\n")
        h.connect_backend()
        self.assertEqual(h.lookups, [("rebind.example", 443)])
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [(str(PUBLIC), 443)])

    def test_name_resolving_to_loopback_is_refused(self) -> None:
        """A name whose lookup answers 127.0.0.1 gets 403 and no connection attempt."""
        h = Harness()
        h.answers = [[LOOPBACK]]
        h.send(b"CONNECT evil.example:22 HTTP/1.1\r\n\r\n")
        self.assertTrue(h.response().startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertTrue(h.client.disconnecting)

    def test_unresolvable_name_is_502(self) -> None:
        """A lookup failure answers 502 Bad Gateway and closes."""
        h = Harness(resolve_error=ResolveError("cannot resolve 'nowhere.invalid'"))
        h.send(b"CONNECT nowhere.invalid:443 HTTP/1.1\r\n\r\n")
        self.assertTrue(h.response().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_slow_lookup_is_504(self) -> None:
        """A lookup that outlives the connect timeout answers 504."""
        h = Harness(resolve_hangs=True)
        h.send(b"CONNECT slow.example:443 HTTP/1.1\r\n\r\n")
        h.reactor.advance(5.0)
        self.assertTrue(h.response().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))

    def test_refused_target_is_502_and_timeout_is_504(self) -> None:
        """A refused connection answers 502; one that times out answers 504."""
        for advance, status in ((None, b"502"), (5.0, b"504")):
            h = Harness()
            h.send(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
            connector = h.reactor.connectors[-1]
            if advance is None:
                _host, _port, factory, _t, _b = h.reactor.tcpClients[-1]
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            else:
                h.reactor.advance(advance)
            self.assertTrue(h.response().startswith(b"HTTP/1.1 " + status), h.response())
            self.assertTrue(h.client.disconnecting)

    def test_numeric_loopback_refused_without_lookup(self) -> None:
        """127.1 is the loopback address: refused by the default policy, never resolved."""
        h = Harness()
        h.send(b"CONNECT 127.1:80 HTTP/1.1\r\n\r\n")
        self.assertTrue(h.response().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(h.lookups, [])

    def test_bad_request_then_smuggled_request_gets_one_answer(self) -> None:
        """A refused head followed by another request in the same read: one response, then close."""
        h = Harness()
        h.send(b"GET http://x/ HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        answer = h.response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"))
        self.assertIn(b"\r\nAllow: CONNECT\r\n", answer)
        self.assertEqual(answer.count(b"HTTP/1.1"), 1)
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
        self.assertEqual(h.response(), answer)
        self.assertTrue(h.client.disconnecting)

    def test_header_deadline_answers_408(self) -> None:
        """An incomplete head at the header deadline answers 408 and closes."""
        h = Harness()
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\nX-Slow: 1")
        h.reactor.advance(9.9)
        self.assertEqual(h.response(), b"")
        h.reactor.advance(0.2)
        self.assertTrue(h.response().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(h.client.disconnecting)

    def test_client_leaving_mid_head_cancels_header_deadline(self) -> None:
        """A client gone in the middle of its head leaves no timer behind."""
        h = Harness()
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\n")
        h.leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertEqual(len(h.records), 1)

    def test_complete_head_cancels_header_deadline(self) -> None:
        """Once the head is complete the header deadline no longer applies."""
        h = Harness()
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
        h.connect_backend()
        h.reactor.advance(60)
        self.assertEqual(h.response(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertFalse(h.client.disconnecting)

    def test_auth_required_407(self) -> None:
        """With users configured, a request without credentials answers 407 with the Basic realm."""
        h = Harness(auth=True)
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
        answer = h.response()
        self.assertTrue(answer.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"))
        self.assertIn(b'\r\nProxy-Authenticate: Basic realm="tunnelkit"\r\n', answer)
        self.assertEqual(h.auth_checks, [])

    def test_auth_checked_then_connects(self) -> None:
        """Credentials are checked (asynchronously) before any lookup; a match proceeds."""
        h = Harness(auth=True)
        h.send(WITH_CREDENTIALS)
        self.assertEqual(h.auth_checks, [("user", "s3cret")])
        self.assertEqual(h.lookups, [])
        assert h.pending_auth is not None
        h.pending_auth.callback(True)
        backend = h.connect_backend()
        self.assertTrue(h.response().startswith(b"HTTP/1.1 200 "))
        h.leg.connectionLost(Failure(ConnectionDone()))
        backend.protocol.connectionLost(Failure(ConnectionDone()))
        [record] = h.records
        self.assertEqual(record.details["user"], "user")
        self.assertNotIn("s3cret", repr(record))

    def test_wrong_password_407(self) -> None:
        """A failed check answers 407 and never resolves the target."""
        h = Harness(auth=True)
        h.send(WITH_CREDENTIALS)
        assert h.pending_auth is not None
        h.pending_auth.callback(False)
        self.assertTrue(h.response().startswith(b"HTTP/1.1 407 "))
        self.assertEqual(h.lookups, [])

    def test_client_leaving_during_auth_cancels_everything(self) -> None:
        """A client gone while its credentials are checked: no lookup, no dial, one record."""
        h = Harness(auth=True)
        h.send(WITH_CREDENTIALS)
        h.leg.connectionLost(Failure(ConnectionDone()))
        assert h.pending_auth is not None
        self.assertTrue(h.pending_auth.called)
        self.assertEqual((h.lookups, h.reactor.tcpClients), ([], []))
        self.assertEqual(len(h.records), 1)
        self.assertEqual(h.records[0].details["user"], "user")

    def test_client_leaving_during_dial_cancels_it(self) -> None:
        """A client gone while the target connects: the attempt is cancelled, one record."""
        h = Harness()
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
        connector = h.reactor.connectors[-1]
        h.leg.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(len(h.records), 1)
        self.assertEqual(h.records[0].details["target"], "example.org:443")

    def test_record_has_target_status_and_tunnel_bytes(self) -> None:
        """The record names the target and status, and counts only bytes after the head."""
        h = Harness()
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\n\r\nabc")
        backend = h.connect_backend()
        h.send(b"defg")
        h.leg.connectionLost(Failure(ConnectionDone()))
        backend.protocol.connectionLost(Failure(ConnectionDone()))
        [record] = h.records
        self.assertEqual(
            record.details, {"mode": "connect", "target": "example.org:443", "status": 200}
        )
        self.assertEqual(record.bytes_up, 7)
        self.assertEqual(record.backend_address, f"{PUBLIC}:443")

    def test_fixed_backend_gets_allowed_tunnels(self) -> None:
        """With --to, an allowed target is tunnelled to that backend, not to the target."""
        h = Harness(fixed="10.9.8.7")
        h.send(b"CONNECT example.org:443 HTTP/1.1\r\n\r\nhi")
        self.assertEqual(h.lookups, [("example.org", 443)])
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("10.9.8.7", 6379)])
        backend = h.connect_backend()
        self.assertEqual(h.response(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(backend.value(), b"hi")

    def test_fixed_backend_still_checks_the_target(self) -> None:
        """With --to, a target the policy refuses gets 403 and the backend is never dialled."""
        h = Harness(fixed="10.9.8.7")
        h.send(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n")
        self.assertTrue(h.response().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(h.reactor.tcpClients, [])

    def test_full_registry_answers_503(self) -> None:
        """At the connection cap a new client gets 503 and a close."""
        h = Harness()
        h.registry.max_tunnels = 1
        late = HalfCloseTransport()
        protocol = h.listener.factory.buildProtocol(IPv4Address("TCP", "198.51.100.6", 5001))
        assert protocol is not None
        protocol.makeConnection(late)
        self.assertTrue(late.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertTrue(late.disconnecting)
