"""In-memory tests of backend dialing: order, timeouts, cancellation."""

from __future__ import annotations

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tunnelkit.backends.balance import WEIGHT_SCALE
from tunnelkit.backends.endpoints import AddressEndpoint
from tunnelkit.backends.group import (
    Backend,
    BackendGroup,
    BackendsUnavailable,
    Balancing,
    Dialed,
)


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


def balanced(
    count: int, balancing: Balancing, *, weights: tuple[int, ...] = (), backups: int = 0
) -> tuple[Clock, list[ControlledEndpoint], BackendGroup]:
    clock = Clock()
    endpoints = [ControlledEndpoint() for _ in range(count)]
    backends = [
        Backend(f"b{i}", ep, weights[i] if weights else 1, i >= count - backups)
        for i, ep in enumerate(endpoints)
    ]
    return clock, endpoints, BackendGroup(backends, clock, 5.0, balancing, listener="l")


def refuse(endpoint: ControlledEndpoint) -> None:
    endpoint.attempts[-1].errback(ConnectionRefusedError())


class AbortedTunnel:
    """Stands for a live tunnel: remembers why it was aborted."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, reason: str, kind: object) -> None:
        self.aborted.append(reason)


class BalancedGroupTests(SynchronousTestCase):
    """Retries, passive ejection, backups, limits, health marks and slow start, in memory."""

    def dial(self, group: BackendGroup) -> tuple[list[Dialed], list[Failure]]:
        results: list[Dialed] = []
        failures: list[Failure] = []
        group.dial(Factory()).addCallbacks(results.append, failures.append)
        return results, failures

    def test_retries_bound_the_attempts(self) -> None:
        """Refused everywhere: 1 + retries attempts, then the dial fails naming each."""
        _, endpoints, group = balanced(4, Balancing("round-robin", retries=2))
        _, failures = self.dial(group)
        for endpoint in endpoints[:3]:
            refuse(endpoint)
        self.assertEqual([len(e.attempts) for e in endpoints], [1, 1, 1, 0])
        error = failures[0].value
        assert isinstance(error, BackendsUnavailable)
        self.assertEqual([b.name for b, _ in error.errors], ["b0", "b1", "b2"])
        self.assertEqual([s.load.active for s in group.states], [0, 0, 0, 0])

    def test_active_counts_attempts_and_tunnels(self) -> None:
        """A backend's connections count from the attempt until the tunnel is released."""
        _, endpoints, group = balanced(2, Balancing("least-conn"))
        results, _ = self.dial(group)
        self.assertEqual(group.states[0].load.active, 1)
        endpoints[0].attempts[0].callback(Protocol())
        self.assertEqual(results[0].attempts, 1)
        self.dial(group)  # the least loaded is now b1
        self.assertEqual([len(e.attempts) for e in endpoints], [1, 1])
        group.release(results[0], object())  # type: ignore[arg-type]
        self.assertEqual(group.states[0].load.active, 0)

    def test_failures_in_a_row_eject_then_probation(self) -> None:
        """eject_after failures eject a backend (logged once); after the backoff it is tried again."""
        clock, endpoints, group = balanced(2, Balancing("first", retries=1, eject_after=2))
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(2):
            self.dial(group)
            refuse(endpoints[0])
            endpoints[1].attempts[-1].callback(Protocol())
        self.assertEqual(len(endpoints[0].attempts), 2)
        self.dial(group)  # b0 is ejected: straight to b1
        self.assertEqual((len(endpoints[0].attempts), len(endpoints[1].attempts)), (2, 3))
        down = [e for e in events if e.get("event") == "backend_down"]
        self.assertEqual([(e["backend"], e["listener"]) for e in down], [("b0", "l")])
        self.assertIn("2 connect failures in a row", str(down[0]["reason"]))
        clock.advance(1.0)  # the first backoff is over: b0 is tried again
        self.dial(group)
        refuse(endpoints[0])  # and ejected again at once, for twice as long
        clock.advance(1.5)
        self.dial(group)
        self.assertEqual(len(endpoints[0].attempts), 3)
        clock.advance(0.5)
        self.dial(group)
        endpoints[0].attempts[-1].callback(Protocol())
        up = [e for e in events if e.get("event") == "backend_up"]
        self.assertEqual(len(down), 1)
        self.assertEqual([(e["backend"], e["reason"]) for e in up], [("b0", "connected again")])

    def test_panic_tries_ejected_backends_rather_than_none(self) -> None:
        """Every backend ejected: they are tried anyway, rather than turning the client away."""
        _, endpoints, group = balanced(1, Balancing("first", eject_after=1))
        self.dial(group)
        refuse(endpoints[0])
        results, _ = self.dial(group)
        endpoints[0].attempts[-1].callback(Protocol())
        self.assertEqual(len(results), 1)

    def test_health_up_ends_an_ejection(self) -> None:
        """Checks that bring a backend back up outweigh the failures that ejected it."""
        _, endpoints, group = balanced(
            2, Balancing("first", retries=0, eject_after=1, eject_base=60)
        )
        self.dial(group)
        refuse(endpoints[0])
        group.mark(0, False, "test")
        group.mark(0, True, "test")
        self.dial(group)
        self.assertEqual([len(e.attempts) for e in endpoints], [2, 0])

    def test_ejection_alone_never_says_clients_are_turned_away(self) -> None:
        """Every backend ejected: they are still tried (panic), so no_backend_available is not logged."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, endpoints, group = balanced(2, Balancing("first", retries=1, eject_after=1))
        self.dial(group)
        refuse(endpoints[0])
        refuse(endpoints[1])
        names = [e.get("event") for e in events]
        self.assertEqual(names.count("backend_down"), 2)
        self.assertNotIn("no_backend_available", names)
        group.mark(0, False, "test")
        group.mark(1, False, "test")
        self.assertIn("no_backend_available", [e.get("event") for e in events])

    def test_backups_only_while_every_primary_is_down(self) -> None:
        """A backup takes clients when the health checks have taken every primary down."""
        _, endpoints, group = balanced(3, Balancing("round-robin"), backups=1)
        for _ in range(4):
            self.dial(group)
        self.assertEqual([len(e.attempts) for e in endpoints], [2, 2, 0])
        group.mark(0, False, "test")
        group.mark(1, False, "test")
        self.dial(group)
        self.assertEqual([len(e.attempts) for e in endpoints], [2, 2, 1])
        group.mark(1, True, "test")
        self.dial(group)
        self.assertEqual([len(e.attempts) for e in endpoints], [2, 3, 1])

    def test_all_down_fails_at_once(self) -> None:
        """No backend up: no attempt, and the failure says so."""
        _, endpoints, group = balanced(2, Balancing("round-robin"))
        group.mark(0, False, "test")
        group.mark(1, False, "test")
        _, failures = self.dial(group)
        self.assertEqual([len(e.attempts) for e in endpoints], [0, 0])
        self.assertEqual(str(failures[0].value), "no backend available")

    def test_weight_zero_is_never_picked(self) -> None:
        """A drained backend (weight 0) takes no new client."""
        _, endpoints, group = balanced(2, Balancing("round-robin"), weights=(0, 1))
        for _ in range(3):
            self.dial(group)
        self.assertEqual([len(e.attempts) for e in endpoints], [0, 3])

    def test_max_conn_spills_over(self) -> None:
        """A full backend (--max-conn-per-backend) sends the next clients to the others."""
        _, endpoints, group = balanced(2, Balancing("first", max_conn=2))
        for _ in range(3):
            self.dial(group)
        self.assertEqual([len(e.attempts) for e in endpoints], [2, 1])

    def test_slow_start_ramps_the_weight(self) -> None:
        """A backend back up starts at a small weight and reaches its own over slow_start."""
        clock, _, group = balanced(2, Balancing("round-robin", slow_start=10.0))
        group.mark(0, False, "test")
        group.mark(0, True, "test")
        weights = [group.states[0].load.weight]
        for _ in range(10):
            clock.advance(1.0)
            weights.append(group.states[0].load.weight)
        self.assertEqual(weights[0], 1)
        self.assertEqual(weights, sorted(weights))
        self.assertEqual(weights[-1], WEIGHT_SCALE)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_on_down_aborts_the_backends_tunnels(self) -> None:
        """With close_on_down, a backend's live tunnels end when its checks take it down."""
        _, endpoints, group = balanced(2, Balancing("first", close_on_down=True))
        results, _ = self.dial(group)
        endpoints[0].attempts[0].callback(Protocol())
        tunnel = AbortedTunnel()
        group.attach(results[0], tunnel)  # type: ignore[arg-type]
        group.mark(0, False, "3 health checks failed")
        self.assertEqual(tunnel.aborted, ["backend b0 went down: 3 health checks failed"])

    def test_the_engines_pool_hears_health_and_weights(self) -> None:
        """A mirrored group pushes each health change and slow-start weight to the engine's pool."""
        clock, _, group = balanced(2, Balancing("round-robin", slow_start=2.0))
        pushed: list[tuple[int, bool | None, int | None]] = []

        class Pool:
            def set(self, index: int, *, up: bool | None = None, weight: int | None = None) -> None:
                pushed.append((index, up, weight))

        group.mirror = Pool()
        group.mark(1, False, "test")
        group.mark(1, True, "test")
        clock.advance(1.0)
        clock.advance(1.0)
        assert pushed[:2] == [(1, False, None), (1, None, 1)]
        assert (1, True, None) in pushed
        assert pushed[-1] == (1, None, WEIGHT_SCALE)


class ReplaceTests(SynchronousTestCase):
    """Names resolved again: the group's backends change; state, dials and tunnels stay right."""

    def dial(self, group: BackendGroup) -> list[Dialed]:
        results: list[Dialed] = []
        group.dial(Factory()).addCallback(results.append)
        return results

    def renamed(self, group: BackendGroup, *names: str) -> dict[str, ControlledEndpoint]:
        """Replace ``group``'s backends with ones named ``names`` (fresh endpoints)."""
        endpoints = {name: ControlledEndpoint() for name in names}
        group.replace([Backend(name, endpoint) for name, endpoint in endpoints.items()])
        return endpoints

    def test_persisting_names_keep_their_state(self) -> None:
        """Health, connections and the round-robin's place follow the name; new ones start up."""
        _, endpoints, group = balanced(3, Balancing("round-robin"))
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.dial(group)  # b0, held
        group.mark(1, False, "test")
        b0, b1 = group.states[0], group.states[1]
        fresh = self.renamed(group, "b3", "b1", "b0")
        self.assertEqual([s.backend.name for s in group.states], ["b3", "b1", "b0"])
        self.assertIs(group.states[2], b0)
        self.assertIs(group.states[1], b1)
        self.assertEqual([s.up for s in group.states], [True, False, True])
        self.assertEqual([s.load.active for s in group.states], [0, 0, 1])
        self.assertIs(group.backends[2].endpoint, fresh["b0"])
        changed = [e for e in events if e.get("event") == "backends_changed"]
        self.assertEqual(
            [(e["listener"], e["added"], e["removed"]) for e in changed], [("l", ["b3"], ["b2"])]
        )
        # Round-robin went on from b0's turn: b3 next (b1 is down), on the new endpoints.
        self.dial(group)
        self.assertEqual([len(fresh[n].attempts) for n in ("b3", "b1", "b0")], [1, 0, 0])
        self.assertEqual([len(e.attempts) for e in endpoints], [1, 0, 0])

    def test_a_dial_in_flight_across_a_replace_counts_on_its_backend(self) -> None:
        """A dial begun before a replace retries among the new backends and releases the right one."""
        _, endpoints, group = balanced(2, Balancing("first", retries=2))
        results = self.dial(group)  # b0 connecting
        b0 = group.states[0]
        fresh = self.renamed(group, "b9", "b0")
        refuse(endpoints[0])  # b0 (kept, now second) failed: the next is b9, not b0 again
        self.assertEqual(b0.load.active, 0)
        self.assertEqual(len(fresh["b9"].attempts), 1)
        fresh["b9"].attempts[0].callback(Protocol())
        [dialed] = results
        self.assertEqual((dialed.backend.name, dialed.attempts), ("b9", 2))
        self.assertEqual([s.load.active for s in group.states], [1, 0])
        group.release(dialed, object())  # type: ignore[arg-type]
        self.assertEqual([s.load.active for s in group.states], [0, 0])

    def test_a_tunnel_of_a_removed_backend_releases_only_its_own(self) -> None:
        """A tunnel joined before its backend was removed leaves the new backends' counts alone."""
        _, endpoints, group = balanced(2, Balancing("least-conn"))
        results = self.dial(group)
        endpoints[0].attempts[0].callback(Protocol())
        self.renamed(group, "b1", "b5")
        self.dial(group)  # b1 or b5: one of the new set is connecting
        before = [s.load.active for s in group.states]
        group.release(results[0], object())  # type: ignore[arg-type]
        self.assertEqual([s.load.active for s in group.states], before)
        self.assertEqual(sum(before), 1)

    def test_close_on_down_after_a_replace(self) -> None:
        """A tunnel joined before a replace is closed when its (persisting) backend goes down."""
        _, endpoints, group = balanced(2, Balancing("first", close_on_down=True))
        results = self.dial(group)
        endpoints[0].attempts[0].callback(Protocol())
        tunnel = AbortedTunnel()
        group.attach(results[0], tunnel)  # type: ignore[arg-type]
        self.renamed(group, "b7", "b0")
        group.mark(0, False, "down")  # b7: not b0's tunnel
        self.assertEqual(tunnel.aborted, [])
        group.mark(1, False, "down")
        self.assertEqual(tunnel.aborted, ["backend b0 went down: down"])
