"""In-memory tests of active health checks: rise/fall, jitter, timeouts, send/expect, stop."""

from __future__ import annotations

import itertools
from random import Random
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tunnelkit.backends.group import Backend
from tunnelkit.backends.health import MAX_RESPONSE, HealthChecker, HealthSettings

REFUSED = "Connection was refused by other side."


class Transport(StringTransport):
    """A transport that tells its protocol when it is closed, and how."""

    def __init__(self, protocol: Any) -> None:
        super().__init__()
        self.protocol = protocol
        self.closed_by: str | None = None

    def loseConnection(self) -> None:
        self._close("FIN", ConnectionDone())

    def abortConnection(self) -> None:
        self._close("RST", ConnectionLost())

    def _close(self, how: str, why: Exception) -> None:
        if self.closed_by is None:
            self.closed_by = how
            self.protocol.connectionLost(Failure(why))


@implementer(IStreamClientEndpoint)
class Endpoint:
    """An endpoint whose attempts the test completes, fails or leaves hanging by hand."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: list[tuple[IProtocolFactory, Deferred[Any]]] = []
        self.times: list[float] = []
        self.cancelled = 0
        #: When set, each attempt fails at once with it.
        self.refuse: Exception | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.times.append(self.clock.seconds())
        if self.refuse is not None:
            return fail(self.refuse)

        def cancel(_: Deferred[Any]) -> None:
            self.cancelled += 1

        attempt: Deferred[Any] = Deferred(cancel)
        self.attempts.append((factory, attempt))
        return attempt

    def accept(self) -> Transport:
        """Connect the latest attempt; its transport."""
        factory, attempt = self.attempts[-1]
        protocol: Any = factory.buildProtocol(None)
        transport = Transport(protocol)
        protocol.makeConnection(transport)
        attempt.callback(protocol)
        return transport

    def fail_latest(self) -> None:
        self.attempts[-1][1].errback(ConnectionRefusedError())


class Target:
    """A HealthTarget that records marks and the checker's per-check log events."""

    def __init__(self, count: int = 1) -> None:
        self.clock = Clock()
        self.endpoints = [Endpoint(self.clock) for _ in range(count)]
        self.backends = tuple(Backend(f"b{i}", ep) for i, ep in enumerate(self.endpoints))
        self.marks: list[tuple[int, bool, str]] = []
        #: Every check's outcome, as the checker told the target.
        self.outcomes: list[tuple[int, bool]] = []
        self.events: list[LogEvent] = []
        self.log = Logger(observer=self.events.append)
        #: The backends down when a checker starts.
        self.down: set[int] = set()

    def is_up(self, index: int) -> bool:
        return index not in self.down

    def mark(self, index: int, up: bool, reason: str) -> None:
        self.marks.append((index, up, reason))

    def checked(self, index: int, passed: bool) -> None:
        self.outcomes.append((index, passed))

    def checks(self) -> list[tuple[bool, str]]:
        return [(e["passed"], e["why"]) for e in self.events if e.get("event") == "health_check"]


def checker(target: Target, **settings: Any) -> HealthChecker:
    settings = {"interval": 10.0, "timeout": 2.0, "jitter": 0.0} | settings
    made = HealthChecker(target, HealthSettings(**settings), log=target.log, random=Random(15))
    made.start()
    return made


def step(clock: Clock) -> None:
    """Advance to the next timer exactly (small fixed steps would round the times observed)."""
    clock.advance(min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds())


def run_checks(target: Target, count: int, interval: float = 10.0) -> None:
    """Let ``count`` more checks of every backend start (each within one interval)."""
    for _ in range(count):
        target.clock.advance(interval)


class RiseFallTests(SynchronousTestCase):
    """fall failures in a row take a backend down, rise passes in a row bring it back, once each."""

    def test_backends_start_up(self) -> None:
        """No check has run yet and nothing is marked: clients are served from the start."""
        target = Target(2)
        checker(target)
        self.assertEqual(target.marks, [])
        self.assertEqual([ep.times for ep in target.endpoints], [[], []])

    def test_down_after_fall_failures_naming_the_last(self) -> None:
        """The third failure in a row marks the backend down, with that failure's reason."""
        target = Target()
        target.endpoints[0].refuse = ConnectionRefusedError()
        checker(target)
        run_checks(target, 2)
        self.assertEqual(target.marks, [])
        run_checks(target, 1)
        self.assertEqual(target.marks, [(0, False, f"3 health checks failed: {REFUSED}")])

    def test_down_once(self) -> None:
        """More failures of a down backend mark nothing more."""
        target = Target()
        target.endpoints[0].refuse = ConnectionRefusedError()
        checker(target)
        run_checks(target, 10)
        self.assertEqual(len(target.checks()), 10)
        self.assertEqual([up for _, up, _ in target.marks], [False])

    def test_every_outcome_is_told_for_the_counts(self) -> None:
        """Each check's outcome reaches the target, changes or not (``/metrics`` counts the failures)."""
        target = Target()
        checker(target)
        run_checks(target, 1)
        target.endpoints[0].accept()
        target.endpoints[0].refuse = ConnectionRefusedError()
        run_checks(target, 2)
        self.assertEqual(target.outcomes, [(0, True), (0, False), (0, False)])

    def test_up_after_rise_passes_once(self) -> None:
        """Two passes in a row bring a down backend back; more passes mark nothing more."""
        target = Target()
        endpoint = target.endpoints[0]
        endpoint.refuse = ConnectionRefusedError()
        checker(target)
        run_checks(target, 3)
        endpoint.refuse = None
        run_checks(target, 1)
        endpoint.accept()
        self.assertEqual(len(target.marks), 1)
        run_checks(target, 1)
        endpoint.accept()
        self.assertEqual(target.marks[1:], [(0, True, "2 health checks passed")])
        for _ in range(5):
            run_checks(target, 1)
            endpoint.accept()
        self.assertEqual(len(target.marks), 2)

    def test_a_checker_goes_on_from_the_targets_state(self) -> None:
        """A backend down when its checker starts (names resolved again) comes back after rise passes."""
        target = Target()
        target.down.add(0)
        checker(target)
        run_checks(target, 1)
        target.endpoints[0].accept()
        run_checks(target, 1)
        target.endpoints[0].accept()
        self.assertEqual(target.marks, [(0, True, "2 health checks passed")])

    def test_streaks_must_be_unbroken(self) -> None:
        """A pass between failures (or a failure between passes) starts the count again."""
        target = Target()
        endpoint = target.endpoints[0]
        checker(target, fall=2, rise=2)
        for _ in range(3):
            run_checks(target, 1)
            endpoint.fail_latest()
            run_checks(target, 1)
            endpoint.accept()
        self.assertEqual(target.marks, [])
        run_checks(target, 1)
        endpoint.fail_latest()
        run_checks(target, 1)
        endpoint.fail_latest()
        self.assertEqual([up for _, up, _ in target.marks], [False])
        for _ in range(3):
            run_checks(target, 1)
            endpoint.accept()
            run_checks(target, 1)
            endpoint.fail_latest()
        self.assertEqual([up for _, up, _ in target.marks], [False])

    def test_singular_reason(self) -> None:
        """With fall = rise = 1 the reasons say "1 health check"."""
        target = Target()
        endpoint = target.endpoints[0]
        checker(target, fall=1, rise=1)
        run_checks(target, 1)
        endpoint.fail_latest()
        run_checks(target, 1)
        endpoint.accept()
        self.assertEqual(
            target.marks,
            [(0, False, f"1 health check failed: {REFUSED}"), (0, True, "1 health check passed")],
        )

    def test_each_backend_counts_alone(self) -> None:
        """One backend's failures do not take another down."""
        target = Target(2)
        target.endpoints[1].refuse = ConnectionRefusedError()
        checker(target, fall=1)
        run_checks(target, 1)
        target.endpoints[0].accept()
        self.assertEqual([(i, up) for i, up, _ in target.marks], [(1, False)])

    def test_endpoint_raising_is_a_failed_check(self) -> None:
        """An endpoint that raises instead of failing its Deferred fails the check, and checks go on."""
        target = Target()

        def broken(factory: IProtocolFactory) -> Deferred[Any]:
            raise ValueError("no such backend")

        target.endpoints[0].connect = broken
        checker(target, fall=2)
        run_checks(target, 2)
        self.assertEqual(target.marks, [(0, False, "2 health checks failed: no such backend")])

    def test_a_failing_mark_does_not_stop_the_checks(self) -> None:
        """An exception from the target's mark is logged and the checks go on."""
        target = Target()
        target.endpoints[0].refuse = ConnectionRefusedError()

        def mark(index: int, up: bool, reason: str) -> None:
            raise RuntimeError("broken listener")

        target.mark = mark
        checker(target, fall=1)
        run_checks(target, 3)
        self.assertEqual(len(target.checks()), 3)
        [failed] = [e for e in target.events if e.get("event") == "health_mark_failed"]
        self.assertEqual(failed["backend"], "b0")


class ScheduleTests(SynchronousTestCase):
    """Checks are jittered within bounds, spread at start, and one at a time per backend."""

    def test_jitter_bounds(self) -> None:
        """Each delay between checks is interval x (1 +- jitter), and they are not all equal."""
        target = Target()
        target.endpoints[0].refuse = ConnectionRefusedError()
        checker(target, interval=10.0, jitter=0.2)
        for _ in range(20):
            step(target.clock)
        times = target.endpoints[0].times
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.assertEqual(len(gaps), 19)
        self.assertTrue(all(8.0 <= gap <= 12.0 for gap in gaps), gaps)
        self.assertGreater(max(gaps) - min(gaps), 1.0)

    def test_first_checks_spread_over_the_first_interval(self) -> None:
        """Backend i of N is first checked within the i-th N-th of the first interval."""
        target = Target(4)
        checker(target, interval=8.0, timeout=100.0)
        for _ in range(4):
            step(target.clock)
        firsts = [ep.times[0] for ep in target.endpoints]
        for index, first in enumerate(firsts):
            self.assertTrue(2 * index <= first < 2 * (index + 1), firsts)

    def test_first_checks_differ_with_the_random_source(self) -> None:
        """The spreading is random within each share: two seeds give two schedules."""
        delays = []
        for seed in (1, 2):
            made = HealthChecker(
                Target(), HealthSettings(interval=8.0, timeout=1.0), random=Random(seed)
            )
            delays.append([made.first_delay(i, 4) for i in range(4)])
        self.assertNotEqual(delays[0], delays[1])

    def test_timeout_cancels_the_attempt(self) -> None:
        """A connect that does not finish within the timeout is cancelled and fails the check."""
        target = Target()
        endpoint = target.endpoints[0]
        checker(target, timeout=2.0, fall=1)
        run_checks(target, 1)
        self.assertEqual(len(endpoint.attempts), 1)
        target.clock.advance(1.9)
        self.assertEqual(endpoint.cancelled, 0)
        target.clock.advance(0.1)
        self.assertEqual(endpoint.cancelled, 1)
        self.assertEqual(target.marks, [(0, False, "1 health check failed: connect timeout (2 s)")])

    def test_one_check_in_flight(self) -> None:
        """A check longer than the interval delays the next one: never two at once."""
        target = Target()
        endpoint = target.endpoints[0]
        checker(target, interval=1.0, timeout=30.0)
        for _ in range(100):
            target.clock.advance(0.25)
        self.assertEqual(len(endpoint.attempts), 1)
        endpoint.accept()
        target.clock.advance(0.9)
        self.assertEqual(len(endpoint.attempts), 1)
        target.clock.advance(0.1)
        self.assertEqual(len(endpoint.attempts), 2)


class ExchangeTests(SynchronousTestCase):
    """send is written; expect must appear, in any segmentation, within 64 KiB and the timeout."""

    def connected(self, **settings: Any) -> tuple[Target, Transport]:
        target = Target()
        checker(target, **settings)
        run_checks(target, 1)
        return target, target.endpoints[0].accept()

    def test_connect_alone_passes_and_closes_cleanly(self) -> None:
        """Without send/expect, connecting passes; the connection is closed with a FIN."""
        target, transport = self.connected()
        self.assertEqual(target.checks(), [(True, "connected")])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.closed_by, "FIN")

    def test_send_is_written(self) -> None:
        """send alone is written, then the check passes."""
        target, transport = self.connected(send=b"PING\r\n")
        self.assertEqual(transport.value(), b"PING\r\n")
        self.assertEqual(target.checks(), [(True, "connected")])
        self.assertEqual(transport.closed_by, "FIN")

    def test_expect_across_segments(self) -> None:
        """The expected bytes split over several reads still pass the check."""
        target, transport = self.connected(send=b"PING\r\n", expect=b"+PONG")
        protocol = transport.protocol
        for chunk in (b"xx+", b"P", b"ON"):
            protocol.dataReceived(chunk)
        self.assertEqual(target.checks(), [])
        protocol.dataReceived(b"G\r\n")
        self.assertEqual(target.checks(), [(True, "expected response received")])
        self.assertEqual(transport.closed_by, "FIN")

    def test_closed_without_expected_response(self) -> None:
        """A backend that answers something else and closes fails the check, naming the byte count."""
        target, transport = self.connected(expect=b"+PONG", fall=1)
        transport.protocol.dataReceived(b"-ERR")
        transport.loseConnection()
        [(passed, why)] = target.checks()
        self.assertFalse(passed)
        self.assertEqual(
            why,
            "closed after 4 bytes without the expected response: Connection was closed cleanly.",
        )
        self.assertEqual([up for _, up, _ in target.marks], [False])

    def test_expect_timeout_resets(self) -> None:
        """No expected bytes within the timeout: the check fails and the connection is reset."""
        target, transport = self.connected(expect=b"+PONG", timeout=2.0)
        transport.protocol.dataReceived(b"+PO")
        target.clock.advance(2.0)
        self.assertEqual(
            target.checks(), [(False, "no expected response within 2 s (3 bytes received)")]
        )
        self.assertEqual(transport.closed_by, "RST")

    def test_match_ending_at_the_bound_passes(self) -> None:
        """The expected bytes ending exactly at 64 KiB still pass."""
        target, transport = self.connected(expect=b"+PONG")
        transport.protocol.dataReceived(b"x" * (MAX_RESPONSE - 5) + b"+PONG")
        self.assertEqual(target.checks(), [(True, "expected response received")])

    def test_oversized_response_fails(self) -> None:
        """64 KiB without the expected bytes fails the check, even if they come just after."""
        target, transport = self.connected(expect=b"+PONG")
        for _ in range(MAX_RESPONSE // 1000):
            transport.protocol.dataReceived(b"x" * 1000)
        self.assertEqual(target.checks(), [])
        transport.protocol.dataReceived(b"x" * 1000 + b"+PONG")
        self.assertEqual(
            target.checks(), [(False, f"no expected response in the first {MAX_RESPONSE} bytes")]
        )
        self.assertEqual(transport.closed_by, "RST")


class StopTests(SynchronousTestCase):
    """stop() cancels what is in flight and leaves nothing scheduled."""

    def test_stop_while_connecting(self) -> None:
        """The attempt in flight is cancelled, no timer is left, and nothing is logged for it."""
        target = Target(2)
        made = checker(target)
        run_checks(target, 1)
        stopped = made.stop()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([ep.cancelled for ep in target.endpoints], [1, 1])
        self.assertEqual(target.clock.getDelayedCalls(), [])
        self.assertEqual(target.checks(), [])

    def test_stop_while_waiting_for_the_response(self) -> None:
        """A connected check is reset; stop() fires once its connection is closed."""
        target = Target()
        made = checker(target, expect=b"+PONG")
        run_checks(target, 1)
        transport = target.endpoints[0].accept()
        self.successResultOf(made.stop())
        self.assertEqual(transport.closed_by, "RST")
        self.assertEqual(target.clock.getDelayedCalls(), [])
        self.assertEqual(target.checks(), [])

    def test_stop_between_checks(self) -> None:
        """Stopping before the first check or between two cancels the timers."""
        target = Target()
        made = checker(target)
        self.successResultOf(made.stop())
        self.assertEqual(target.clock.getDelayedCalls(), [])
        made.start()
        run_checks(target, 1)
        target.endpoints[0].accept()
        self.successResultOf(made.stop())
        self.assertEqual(target.clock.getDelayedCalls(), [])
        self.assertFalse(made.running)

    def test_stop_from_mark(self) -> None:
        """A target that stops the checker when told of a change leaves nothing scheduled."""
        target = Target()
        target.endpoints[0].refuse = ConnectionRefusedError()
        made = checker(target, fall=1)
        target.mark = lambda index, up, reason: made.stop()
        run_checks(target, 1)
        self.assertEqual(target.clock.getDelayedCalls(), [])

    def test_stop_from_a_log_observer(self) -> None:
        """A log observer that stops the checker on a check's event leaves nothing scheduled or marked."""
        target = Target()
        target.endpoints[0].refuse = ConnectionRefusedError()
        made = HealthChecker(
            target,
            HealthSettings(interval=10.0, timeout=2.0, fall=1),
            log=Logger(observer=lambda event: made.stop()),
        )
        made.start()
        run_checks(target, 1)
        self.assertEqual(target.clock.getDelayedCalls(), [])
        self.assertEqual(target.marks, [])

    def test_start_twice(self) -> None:
        """Starting a running checker is a programming error (it would check twice as often)."""
        made = checker(Target())
        self.assertRaises(RuntimeError, made.start)


class SettingsTests(SynchronousTestCase):
    """Settings that cannot work are refused where they are made."""

    def test_checker_needs_an_interval(self) -> None:
        """interval 0 means no checks: there is no checker for it."""
        settings = HealthSettings(interval=0, timeout=1.0)
        self.assertFalse(settings.enabled)
        self.assertRaises(ValueError, HealthChecker, Target(), settings)

    def test_bad_values(self) -> None:
        """Negative times, zero thresholds, jitter of 1 or more, and empty or huge expect fail."""
        for bad in (
            {"interval": -1.0},
            {"timeout": 0.0},
            {"rise": 0},
            {"fall": 0},
            {"jitter": 1.0},
            {"jitter": -0.1},
            {"expect": b""},
            {"expect": b"x" * (MAX_RESPONSE + 1)},
        ):
            arguments: dict[str, Any] = {"interval": 1.0, "timeout": 1.0} | bad
            with self.assertRaises(ValueError, msg=str(bad)):
                HealthSettings(**arguments)
