"""SOCKS5 mode in memory: negotiation to join, every reply code, one lookup, auth, the deadline, parity with CONNECT."""

from __future__ import annotations

import errno
import ipaddress

import pytest
from loopback import NON_GLOBAL_HOSTS
from proxy_harness import LOOPBACK, PUBLIC, ProxyHarness
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.backends.resolver import ResolveError
from tunnelkit.modes.connect import ConnectMode
from tunnelkit.modes.socks5 import Socks5Mode
from tunnelkit.modes.socks5_frames import Reply, reply
from tunnelkit.policy.targets import TargetPolicy
from tunnelkit.relay.tunnel import CloseKind

GREETING = b"\x05\x01\x00"
AUTH_GREETING = b"\x05\x01\x02"
CREDENTIALS = b"\x01\x04user\x06s3cret"


def request(host: str, port: int = 443, command: int = 1) -> bytes:
    """A request for ``host``: by address type for an IP address in standard form, else as a name."""
    head = bytes((5, command, 0))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and str(address) == host:
        head += bytes((1 if address.version == 4 else 4,)) + address.packed
    else:
        head += bytes((3, len(host))) + host.encode()
    return head + port.to_bytes(2, "big")


def reply_code(answer: bytes) -> int:
    """The REP of the one reply at the end of ``answer`` (an IPv4 BND)."""
    assert answer[-10:-8] == b"\x05" + answer[-9:-8] and len(answer) >= 10, answer
    return answer[-9]


class Harness(ProxyHarness):
    """A SOCKS5 listener on a memory reactor."""

    mode = Socks5Mode

    def answer(self) -> bytes:
        return bytes(self.client.value())

    def refuse_connect(self, reason: Exception) -> None:
        """The outbound connection fails with ``reason``."""
        connector = self.reactor.connectors[-1]
        _host, _port, factory, _t, _b = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(connector, Failure(reason))

    def end(self, *transports: object) -> None:
        """Both sides close: the record is written."""
        self.leg.connectionLost(Failure(ConnectionDone()))
        for transport in transports:
            transport.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]


class Socks5ModeTests(SynchronousTestCase):
    """The SOCKS5 session from greeting to join or refusal."""

    def test_pipelined_negotiation_and_bytes_reach_target_after_the_reply(self) -> None:
        """Greeting, request and early data in one read: 05 00, then the reply with BND, then the bytes, once."""
        h = Harness(TargetPolicy.from_options(allow=["example.org"]))
        h.send(GREETING + request("example.org") + b"HELLO")
        self.assertEqual(h.answer(), b"\x05\x00")
        self.assertEqual(h.lookups, [("example.org", 443)])
        backend = h.connect_backend(IPv4Address("TCP", "10.0.0.7", 40000))
        bound = (ipaddress.ip_address("10.0.0.7"), 40000)
        self.assertEqual(h.answer(), b"\x05\x00" + reply(Reply.SUCCEEDED, bound))
        self.assertEqual(backend.value(), b"HELLO")
        h.send(b" WORLD")
        self.assertEqual(backend.value(), b"HELLO WORLD")
        h.end(backend)
        [record] = h.records
        self.assertEqual(
            record.details, {"mode": "socks5", "target": "example.org:443", "reply": 0}
        )
        self.assertEqual(record.bytes_up, 11)

    def test_byte_by_byte_negotiation(self) -> None:
        """Every frame one byte at a time still gives one tunnel to the checked address."""
        h = Harness()
        for byte in GREETING + request("example.org", 8443):
            h.send(bytes([byte]))
        self.assertEqual(h.lookups, [("example.org", 8443)])
        self.assertEqual(h.dialled(), [(str(PUBLIC), 8443)])

    def test_ipv6_bound_address(self) -> None:
        """The success reply names an IPv6 local address with address type 4."""
        h = Harness()
        h.send(GREETING + request(str(PUBLIC)))
        h.connect_backend(IPv6Address("TCP", "2001:db8::5", 5555))  # type: ignore[arg-type]
        bound = (ipaddress.ip_address("2001:db8::5"), 5555)
        self.assertEqual(h.answer(), b"\x05\x00" + reply(Reply.SUCCEEDED, bound))

    def test_one_lookup_and_connect_to_the_checked_address(self) -> None:
        """DNS rebinding: the name is resolved once and the checked public address is dialled."""
        h = Harness()
        h.send(GREETING + request("rebind.example"))
        h.connect_backend()
        self.assertEqual(h.lookups, [("rebind.example", 443)])
        self.assertEqual(h.dialled(), [(str(PUBLIC), 443)])

    def test_name_resolving_to_loopback_is_not_allowed(self) -> None:
        """A name whose lookup answers 127.0.0.1 gets 0x02 and no connection attempt."""
        h = Harness()
        h.answers = [[LOOPBACK]]
        h.send(GREETING + request("evil.example", 22))
        self.assertEqual(reply_code(h.answer()), Reply.NOT_ALLOWED)
        self.assertEqual(h.dialled(), [])
        self.assertTrue(h.client.disconnecting)

    def test_lookup_failure_and_timeout_are_host_unreachable(self) -> None:
        """A name that does not resolve, or not within the connect timeout, gets 0x04."""
        h = Harness(resolve_error=ResolveError("cannot resolve 'nowhere.invalid'"))
        h.send(GREETING + request("nowhere.invalid"))
        self.assertEqual(reply_code(h.answer()), Reply.HOST_UNREACHABLE)
        slow = Harness(resolve_hangs=True)
        slow.send(GREETING + request("slow.example"))
        slow.reactor.advance(5.0)
        self.assertEqual(reply_code(slow.answer()), Reply.HOST_UNREACHABLE)
        self.assertEqual((h.dialled(), slow.dialled()), ([], []))

    def test_connect_failures_have_their_reply_codes(self) -> None:
        """Refused 0x05, network unreachable 0x03, host unreachable 0x04, other errors 0x01."""
        cases = [
            (error.ConnectionRefusedError(), Reply.CONNECTION_REFUSED),
            (
                error.NoRouteError(errno.ENETUNREACH, "Network is unreachable"),
                Reply.NETWORK_UNREACHABLE,
            ),
            (error.ConnectError(errno.EHOSTUNREACH, "No route to host"), Reply.HOST_UNREACHABLE),
            (error.TCPTimedOutError(errno.ETIMEDOUT, "timed out"), Reply.HOST_UNREACHABLE),
            (error.ConnectError(errno.EACCES, "Permission denied"), Reply.GENERAL_FAILURE),
        ]
        for reason, code in cases:
            h = Harness()
            h.send(GREETING + request(str(PUBLIC)))
            for _ in range(3):  # the first try and --connect-retries' two (the same address)
                h.refuse_connect(reason)
                if h.answer() != b"\x05\x00":
                    break
            self.assertEqual(reply_code(h.answer()), code, reason)
            self.assertTrue(h.client.disconnecting)
            self.assertEqual(h.records, [])  # the client has not closed yet
            h.leg.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(h.records[0].details["reply"], code)

    def test_connect_timeout_is_host_unreachable(self) -> None:
        """A target that does not answer within --connect-timeout gets 0x04, recorded as a timeout."""
        h = Harness()
        h.send(GREETING + request(str(PUBLIC)))
        h.reactor.advance(5.0)
        self.assertEqual(reply_code(h.answer()), Reply.HOST_UNREACHABLE)
        h.leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.records[0].close_kind, CloseKind.TIMEOUT)

    def test_bind_and_udp_associate_are_not_supported(self) -> None:
        """BIND and UDP ASSOCIATE get 0x07 and a close, without any lookup or dial."""
        for command in (2, 3):
            h = Harness()
            h.send(GREETING + request("example.org", command=command))
            self.assertEqual(reply_code(h.answer()), Reply.COMMAND_NOT_SUPPORTED)
            self.assertTrue(h.client.disconnecting)
            self.assertEqual((h.lookups, h.dialled()), ([], []))

    def test_unknown_address_type(self) -> None:
        """Address type 0x02 gets 0x08 and a close."""
        h = Harness()
        h.send(GREETING + b"\x05\x01\x00\x02\x00\x00")
        self.assertEqual(reply_code(h.answer()), Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        self.assertTrue(h.client.disconnecting)

    def test_not_socks5_is_closed_without_answer(self) -> None:
        """An HTTP request (or SOCKS4) on a SOCKS5 listener is closed, nothing written."""
        h = Harness()
        h.send(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(h.answer(), b"")
        self.assertTrue(h.client.disconnecting)
        h.send(b"more")  # nothing after a refused frame is parsed
        h.leg.connectionLost(Failure(ConnectionDone()))
        self.assertIn("not a SOCKS5 greeting", h.records[0].reason)

    def test_header_deadline_closes(self) -> None:
        """An incomplete negotiation at the header deadline is closed, recorded as a timeout."""
        h = Harness()
        h.send(GREETING + b"\x05\x01")
        h.reactor.advance(9.9)
        self.assertFalse(h.client.disconnecting)
        h.reactor.advance(0.2)
        self.assertEqual(h.answer(), b"\x05\x00")
        self.assertTrue(h.client.disconnecting)
        h.leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.records[0].close_kind, CloseKind.TIMEOUT)

    def test_complete_request_cancels_the_deadline(self) -> None:
        """Once the request is read the header deadline no longer applies."""
        h = Harness()
        h.send(GREETING + request(str(PUBLIC)))
        h.connect_backend()
        h.reactor.advance(60)
        self.assertFalse(h.client.disconnecting)

    def test_client_leaving_mid_negotiation_leaves_no_timer(self) -> None:
        """A client gone in the middle of its negotiation: no timer, one record."""
        h = Harness()
        h.send(GREETING)
        h.leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertEqual(len(h.records), 1)

    def test_full_registry_closes(self) -> None:
        """At the connection cap a new client is closed before it is read."""
        h = Harness()
        h.registry.max_tunnels = 1
        protocol = h.listener.factory.buildProtocol(IPv4Address("TCP", "198.51.100.6", 5001))
        self.assertIsNone(protocol)

    # -- authentication ---------------------------------------------------------------

    def test_auth_only_username_password_is_chosen(self) -> None:
        """With users configured, a client offering only 'no authentication' gets 05 FF and a close."""
        h = Harness(auth=True)
        h.send(GREETING + request(str(PUBLIC)))
        self.assertEqual(h.answer(), b"\x05\xff")
        self.assertTrue(h.client.disconnecting)
        self.assertEqual((h.auth_checks, h.dialled()), ([], []))

    def test_auth_success_then_request(self) -> None:
        """The credentials are checked before the request is acted on; 01 00, then the reply."""
        h = Harness(auth=True)
        h.send(AUTH_GREETING + CREDENTIALS + request("example.org") + b"early")
        self.assertEqual(h.answer(), b"\x05\x02")
        self.assertEqual(h.auth_checks, [("user", "s3cret")])
        self.assertEqual(h.lookups, [])
        assert h.pending_auth is not None
        h.pending_auth.callback(True)
        self.assertEqual(h.answer(), b"\x05\x02\x01\x00")
        backend = h.connect_backend()
        self.assertEqual(backend.value(), b"early")
        h.end(backend)
        [record] = h.records
        self.assertEqual(record.details["user"], "user")
        self.assertNotIn("s3cret", repr(record))

    def test_auth_failure_answers_01_01_and_never_routes(self) -> None:
        """Wrong credentials: status 01 01 and a close; the request behind them is never looked up."""
        h = Harness(auth=True)
        h.send(AUTH_GREETING + CREDENTIALS + request("example.org"))
        assert h.pending_auth is not None
        h.pending_auth.callback(False)
        self.assertEqual(h.answer(), b"\x05\x02\x01\x01")
        self.assertTrue(h.client.disconnecting)
        self.assertEqual((h.lookups, h.dialled()), ([], []))

    def test_deadline_during_the_check(self) -> None:
        """The one deadline covers a slow check: a close, and the late answer changes nothing."""
        h = Harness(auth=True)
        h.send(AUTH_GREETING + CREDENTIALS)
        h.reactor.advance(10.1)
        self.assertTrue(h.client.disconnecting)
        assert h.pending_auth is not None
        h.pending_auth.callback(True)
        self.assertEqual(h.answer(), b"\x05\x02")

    def test_client_leaving_during_the_check_cancels_it(self) -> None:
        """A client gone while its credentials are checked: the check is cancelled, one record."""
        h = Harness(auth=True)
        h.send(AUTH_GREETING + CREDENTIALS)
        h.leg.connectionLost(Failure(ConnectionDone()))
        assert h.pending_auth is not None
        self.assertTrue(h.pending_auth.called)  # cancelled
        self.assertEqual(len(h.records), 1)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    # -- --to -------------------------------------------------------------------------

    def test_fixed_backend_after_the_check(self) -> None:
        """With --to, an allowed target goes to that backend; a refused one gets 0x02, no dial."""
        h = Harness(fixed="10.9.8.7")
        h.send(GREETING + request("example.org") + b"hi")
        self.assertEqual(h.dialled(), [("10.9.8.7", 6379)])
        self.assertEqual(h.connect_backend().value(), b"hi")
        refused = Harness(fixed="10.9.8.7")
        refused.send(GREETING + request("127.0.0.1", 22))
        self.assertEqual(reply_code(refused.answer()), Reply.NOT_ALLOWED)
        self.assertEqual(refused.dialled(), [])


class ConnectHarness(ProxyHarness):
    mode = ConnectMode


def _socks5_request_forms(host: str) -> list[bytes]:
    """Every way a SOCKS5 client can name ``host``: as a name, and by address type if it is one."""
    forms = [GREETING + request(host) if ":" not in host else b""]
    forms.append(GREETING + b"\x05\x01\x00\x03" + bytes((len(host),)) + host.encode() + b"\x01\xbb")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return [f for f in forms if f]
    atyp = 1 if address.version == 4 else 4
    forms.append(GREETING + bytes((5, 1, 0, atyp)) + address.packed + b"\x01\xbb")
    return [f for f in forms if f]


@pytest.mark.parametrize("host", NON_GLOBAL_HOSTS)
def test_policy_parity_with_connect(host: str) -> None:
    """Every SSRF form CONNECT refuses with 403, SOCKS5 refuses with 0x02, as a name or an address, without a lookup or a dial."""
    connect = ConnectHarness()
    authority = f"[{host}]:443" if ":" in host else f"{host}:443"
    connect.send(f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())
    assert connect.client.value().startswith(b"HTTP/1.1 403 ")
    for form in _socks5_request_forms(host):
        socks = Harness()
        socks.send(form)
        assert reply_code(socks.answer()) == Reply.NOT_ALLOWED, form
        assert (socks.lookups, socks.dialled()) == ([], [])
        assert (connect.lookups, connect.dialled()) == ([], [])
