"""The connection phases in memory: identify, route and connect in order, refusals, cancellation, bugs.

Each test runs one client through a :class:`TunnelFactory` whose mode is
scripted here, on a memory reactor, and checks what the phases did: which
mode hooks ran in which order, what the client was told, and the record.
"""

from __future__ import annotations

from typing import Any

from transports import HalfCloseTransport, MemoryListener
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.relay.phases import Handoff, Mode, Refused, Route, time_left
from tunnelkit.relay.tunnel import CloseKind, Leg, Tunnel, TunnelRecord


class ScriptedMode(Mode):
    """A mode whose identify and route do what the test says, and which notes each hook."""

    name = "scripted"

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.calls: list[str] = []
        self.identified: Deferred[Any] | None = None
        self.routing: Any = None
        self.group = BackendGroup(
            [Backend("b", host_endpoint(reactor, "127.0.0.1", 9, 5.0))], reactor, 5.0
        )

    def identify(self, tunnel: Tunnel) -> Deferred[Any] | None:
        self.calls.append("identify")
        return self.identified

    def route(self, tunnel: Tunnel, request: Any) -> Route | Deferred[Route]:
        self.calls.append(f"route {request!r}")
        if isinstance(self.routing, BaseException):
            raise self.routing
        if isinstance(self.routing, Deferred):
            tunnel.pending = self.routing  # as a mode that waits does: leaving cancels it
        return self.routing if self.routing is not None else Route(self.group)

    def established(self, tunnel: Tunnel, backend: Leg) -> None:
        self.calls.append("established")

    def refuse(self, tunnel: Tunnel, refused: Refused) -> None:
        self.calls.append(f"refuse {refused.status}")
        super().refuse(tunnel, refused)


class PhaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.mode = ScriptedMode(self.reactor)
        self.listener = MemoryListener(self.mode, self.reactor)
        self.records = self.listener.records
        self.factory = self.listener.factory
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start_client(self) -> Any:
        self.leg, _ = self.listener.client()
        return self.leg

    def record(self) -> TunnelRecord:
        """The tunnel's record, once its client leg has closed as the refusal asked."""
        self.assertTrue(self.leg.transport.disconnecting or self.leg.transport.aborted)
        self.leg.connectionLost(_refused())
        [record] = self.records
        return record

    def connect_backend(self) -> None:
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, port))
        factory.buildProtocol(transport.getPeer()).makeConnection(transport)

    def test_phases_run_in_order_and_the_mode_is_recorded(self) -> None:
        """identify, then route with what identify gave, then connect, then established."""
        self.mode.identified = Deferred()
        self.start_client()
        self.assertEqual(self.mode.calls, ["identify"])
        self.assertEqual(self.reactor.tcpClients, [])
        self.mode.identified.callback("request")
        self.assertEqual(self.mode.calls, ["identify", "route 'request'"])
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.connect_backend()
        self.assertEqual(self.mode.calls[-1], "established")

    def test_a_mode_that_reads_nothing_routes_at_once(self) -> None:
        self.start_client()
        self.assertEqual(self.mode.calls, ["identify", "route None"])
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_a_refusal_in_route_is_answered_by_the_mode(self) -> None:
        """A phase raising Refused: the mode's refuse, the refusal's reason in the record."""
        self.mode.routing = Refused("not allowed", status=403)
        self.start_client()
        self.assertEqual(self.mode.calls[-1], "refuse 403")
        record = self.record()
        self.assertEqual((record.reason, record.close_kind), ("not allowed", CloseKind.ERROR))
        self.assertEqual(record.details["mode"], "scripted")

    def test_a_refusal_while_identifying(self) -> None:
        self.mode.identified = Deferred()
        self.start_client()
        self.mode.identified.errback(Refused("too slow", CloseKind.TIMEOUT, status=408))
        self.assertEqual(self.mode.calls, ["identify", "refuse 408"])
        self.assertEqual(self.record().close_kind, CloseKind.TIMEOUT)

    def test_a_failed_connect_is_a_refusal_with_a_gateway_status(self) -> None:
        self.start_client()
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, _refused())
        self.assertEqual(self.mode.calls[-1], "refuse 502")
        self.assertIn("no backend connected", self.record().reason)

    def test_a_connect_timeout_is_a_504(self) -> None:
        self.start_client()
        self.reactor.advance(5.0)
        self.assertEqual(self.mode.calls[-1], "refuse 504")
        self.assertEqual(self.record().close_kind, CloseKind.TIMEOUT)

    def test_a_client_that_leaves_while_routing_cancels_it_quietly(self) -> None:
        """The pending route is cancelled by the relay; no refusal, no error logged."""
        routing: Deferred[Route] = Deferred()
        self.mode.routing = routing
        leg = self.start_client()
        leg.connectionLost(_refused())
        self.assertTrue(routing.called)  # cancelled
        self.assertEqual(self.mode.calls, ["identify", "route None"])
        self.assertFalse([e for e in self.events if e.get("event") == "phase_error"])
        self.assertEqual(len(self.records), 1)

    def test_a_bug_in_a_phase_is_logged_and_the_tunnel_reset(self) -> None:
        """An exception that is not a refusal: phase_error names the phase, the tunnel is reset."""
        self.mode.routing = ZeroDivisionError("bug")
        self.start_client()
        [event] = [e for e in self.events if e.get("event") == "phase_error"]
        self.assertEqual(event["phase"], "route")
        self.assertEqual(self.record().reason, "internal error")
        self.flushLoggedErrors(ZeroDivisionError)

    def test_an_identify_may_hand_the_connection_to_another_mode(self) -> None:
        """A Handoff: the other mode routes, answers, and is the one recorded."""
        other = ScriptedMode(self.reactor)
        other.name = "other"
        other.routing = Refused("not there", status=403)
        self.mode.identified = Deferred()
        self.start_client()
        inner: Deferred[str] = Deferred()
        self.mode.identified.callback(Handoff(other, inner))
        inner.callback("inner")
        self.assertEqual(self.mode.calls, ["identify"])
        self.assertEqual(other.calls, ["route 'inner'", "refuse 403"])
        self.assertEqual(self.record().details["mode"], "other")

    def test_the_mode_handed_to_answers_its_own_identify_refusal(self) -> None:
        """A refusal while the other mode identifies is answered in that mode's words."""
        other = ScriptedMode(self.reactor)
        self.mode.identified = Deferred()
        self.start_client()
        inner: Deferred[str] = Deferred()
        self.mode.identified.callback(Handoff(other, inner))
        inner.errback(Refused("bad request", status=400))
        self.assertEqual((self.mode.calls, other.calls), (["identify"], ["refuse 400"]))

    def test_a_handoff_to_a_mode_that_reads_nothing_routes_at_once(self) -> None:
        other = ScriptedMode(self.reactor)
        self.mode.identified = Deferred()
        self.start_client()
        self.mode.identified.callback(Handoff(other, None))
        self.assertEqual(other.calls, ["route None"])

    def test_a_preamble_is_read_before_the_mode_identifies(self) -> None:
        """The listener's preamble first; the mode identifies once it has fired."""
        reading: Deferred[None] = Deferred()
        self.factory.preamble = lambda tunnel: reading
        self.start_client()
        self.assertEqual(self.mode.calls, [])
        reading.callback(None)
        self.assertEqual(self.mode.calls, ["identify", "route None"])

    def test_a_preamble_refusal_is_answered_by_the_mode(self) -> None:
        """A preamble that refuses: no identify, the mode's refuse, the reason recorded."""
        reading: Deferred[None] = Deferred()
        self.factory.preamble = lambda tunnel: reading
        self.start_client()
        reading.errback(Refused("bad PROXY header", status=400))
        self.assertEqual(self.mode.calls, ["refuse 400"])
        self.assertEqual(self.record().reason, "bad PROXY header")

    def test_time_left_counts_from_the_accept(self) -> None:
        """One deadline for everything read first: what is left of it, never 0."""
        leg = self.start_client()
        self.reactor.advance(4)
        self.assertEqual(time_left(leg.tunnel, 10.0), 6.0)
        self.reactor.advance(7)
        self.assertEqual(time_left(leg.tunnel, 10.0), 0.001)

    def test_replay_gives_peeked_bytes_to_the_reader_of_now(self) -> None:
        """Bytes read by one reader and replayed reach the next one, once, in order."""
        self.mode.identified = Deferred()
        leg = self.start_client()
        peeked: list[bytes] = []
        read: list[bytes] = []
        leg.intercept(peeked.append)
        leg.dataReceived(b"first")
        leg.intercept(read.append)
        leg.replay(b"".join(peeked))
        leg.dataReceived(b"second")
        self.assertEqual(read, [b"first", b"second"])


def _refused() -> Any:
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure

    return Failure(ConnectionRefusedError())
