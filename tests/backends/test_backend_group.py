"""In-memory tests of backend dialing: order, timeouts, cancellation."""

from __future__ import annotations

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tunnelkit.backends.endpoints import AddressEndpoint
from tunnelkit.backends.group import Backend, BackendGroup, BackendsUnavailable, Dialed


@implementer(IStreamClientEndpoint)
class ControlledEndpoint:
    """An endpoint whose connection attempts the test completes or fails by hand."""

    def __init__(self, cancel_error: Exception | None = None) -> None:
        self.attempts: list[Deferred[Protocol]] = []
        self.cancelled = 0
        self.cancel_error = cancel_error

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        def cancel(d: Deferred[Protocol]) -> None:
            self.cancelled += 1
            if self.cancel_error is not None:
                d.errback(self.cancel_error)

        attempt: Deferred[Protocol] = Deferred(cancel)
        self.attempts.append(attempt)
        return attempt


def make(count: int, timeout: float = 5.0) -> tuple[Clock, list[ControlledEndpoint], BackendGroup]:
    clock = Clock()
    endpoints = [ControlledEndpoint() for _ in range(count)]
    backends = [Backend(f"b{i}", ep) for i, ep in enumerate(endpoints)]
    return clock, endpoints, BackendGroup(backends, clock, timeout)


class BackendGroupTests(SynchronousTestCase):
    """A group tries its backends in order (the InOrder strategy) and leaves nothing pending."""

    def test_first_backend_that_connects_wins(self) -> None:
        """The first listed backend is used when it connects."""
        _, endpoints, group = make(2)
        results: list[Dialed] = []
        group.dial(Factory()).addCallback(results.append)
        proto = Protocol()
        endpoints[0].attempts[0].callback(proto)
        self.assertEqual([(r.backend.name, r.protocol) for r in results], [("b0", proto)])
        self.assertEqual(endpoints[1].attempts, [])

    def test_next_backend_after_refusal(self) -> None:
        """A refused backend makes the group try the next one."""
        _, endpoints, group = make(2)
        results: list[Dialed] = []
        group.dial(Factory()).addCallback(results.append)
        endpoints[0].attempts[0].errback(ConnectionRefusedError())
        endpoints[1].attempts[0].callback(Protocol())
        self.assertEqual([r.backend.name for r in results], ["b1"])

    def test_connect_timeout_cancels_attempt_and_moves_on(self) -> None:
        """An attempt that takes longer than the connect timeout is cancelled; the next is tried."""
        clock, endpoints, group = make(2, timeout=5.0)
        group.dial(Factory())
        clock.advance(4.9)
        self.assertEqual(endpoints[0].cancelled, 0)
        clock.advance(0.1)
        self.assertEqual(endpoints[0].cancelled, 1)
        self.assertEqual(len(endpoints[1].attempts), 1)

    def test_timeout_is_reported_as_such_whatever_the_cancel_error(self) -> None:
        """Twisted's endpoints fail a cancelled attempt with ConnectingCancelledError: still a timeout."""
        clock = Clock()
        endpoint = ControlledEndpoint(ConnectingCancelledError(HostnameAddress(b"b0", 80)))
        group = BackendGroup([Backend("b0", endpoint)], clock, 2.0)
        failures: list[BackendsUnavailable] = []
        group.dial(Factory()).addErrback(lambda f: failures.append(f.value))
        clock.advance(2.0)
        [error] = failures
        self.assertTrue(error.timed_out)
        self.assertEqual(str(error), "b0: connect timeout (2 s)")

    def test_all_failing_reports_each_reason(self) -> None:
        """When every backend fails, the error names each backend and why."""
        clock, endpoints, group = make(2, timeout=5.0)
        failures: list[BackendsUnavailable] = []
        group.dial(Factory()).addErrback(lambda f: failures.append(f.value))
        endpoints[0].attempts[0].errback(ConnectionRefusedError())
        clock.advance(5)
        [error] = failures
        self.assertEqual([b.name for b, _ in error.errors], ["b0", "b1"])
        self.assertIn("refused", error.errors[0][1].lower())
        self.assertEqual(error.errors[1][1], "connect timeout (5 s)")
        self.assertTrue(error.timed_out)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_cancels_attempt_in_flight_and_stops(self) -> None:
        """Cancelling the dial cancels the pending attempt and tries no other backend."""
        clock, endpoints, group = make(2)
        dialing = group.dial(Factory())
        errors: list[type] = []
        dialing.addErrback(lambda f: errors.append(f.type))
        dialing.cancel()
        self.assertEqual(endpoints[0].cancelled, 1)
        self.assertEqual(endpoints[1].attempts, [])
        self.assertEqual(errors, [CancelledError])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_needs_a_backend(self) -> None:
        """A group with no backend is a programming error."""
        self.assertRaises(ValueError, BackendGroup, [], Clock(), 1.0)


class AddressEndpointTests(SynchronousTestCase):
    """The direct TCP endpoint: the protocol itself on the transport, the endpoint contract kept."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = AddressEndpoint(self.reactor, "::1", 80)
        self.connecting = self.endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, self.factory, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("::1", 80))

    def test_fires_after_the_protocol_is_connected(self) -> None:
        protocol = self.factory.buildProtocol(None)
        self.assertNoResult(self.connecting)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIs(self.successResultOf(self.connecting), protocol)
        self.assertIs(protocol.transport, transport)
        # No wrapper left behind: the class's makeConnection is back.
        self.assertNotIn("makeConnection", vars(protocol))

    def test_failure(self) -> None:
        self.factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.failureResultOf(self.connecting, ConnectionRefusedError)

    def test_cancel_stops_connecting(self) -> None:
        self.connecting.cancel()
        self.failureResultOf(self.connecting, ConnectingCancelledError)
        [connector] = self.reactor.connectors
        self.assertTrue(connector.stoppedConnecting)
