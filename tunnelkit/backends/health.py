"""Active health checks: each backend is probed on a timer, and its up/down state follows.

A check goes through the backend's own endpoint, the one real traffic uses:
TCP connect by default, and for a TLS backend the handshake with the same
certificate check (its endpoint only connects once that passed), then
optionally writes ``send`` and reads until ``expect`` shows up. It knows
nothing of what the backend speaks beyond those bytes, and no Python runs per
tunnel: the checker only tells its :class:`HealthTarget` (the backend group)
when a backend goes down or comes back, and the group pushes that to
whichever plane relays.

Backends start up, so clients are served from the first moment; ``fall``
checks failing in a row take one down, ``rise`` passing in a row bring it
back (HAProxy's ``rise``/``fall``). Checks are jittered and the first ones
spread over the first interval, so that many backends (or many tunnelkit
processes) do not probe in lockstep.
"""

from __future__ import annotations

from collections.abc import Callable
from random import Random
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.backends.group import Backend

_log = Logger(namespace="tunnelkit.health")
#: Where each check's ``health_check`` event goes unless a logger is given:
#: nowhere. One line per check and backend every few seconds would flood
#: twistd's log, which does not filter by level; the group logs the changes.
_QUIET = Logger(namespace="tunnelkit.health", observer=lambda event: None)  # type: ignore[arg-type]

#: The most a check reads while looking for ``expect``: a backend that answers
#: with more than this without the expected bytes fails the check, so a
#: misconfigured check against a bulk-data service costs little.
MAX_RESPONSE = 64 * 1024


def _positive(_: Any, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


def _fraction(_: Any, attribute: Any, value: float) -> None:
    # Below 1, so that a jittered delay stays positive.
    if not 0 <= value < 1:
        raise ValueError(f"{attribute.name} must be at least 0 and below 1, not {value!r}")


def _expectable(_: Any, attribute: Any, value: bytes | None) -> None:
    if value is not None and not 0 < len(value) <= MAX_RESPONSE:
        raise ValueError(f"{attribute.name} must be 1 to {MAX_RESPONSE} bytes")


@attrs.frozen
class HealthSettings:
    """How a listener's backends are checked (``--health-*``, ``--rise``, ``--fall``)."""

    #: Seconds between two checks of one backend (from the end of one to the
    #: start of the next); 0 turns checks off.
    interval: float = attrs.field(validator=attrs.validators.ge(0))
    #: Seconds one check may take in all: connect, TLS handshake, send, expect.
    timeout: float = attrs.field(validator=_positive)
    #: Checks passing in a row that bring a down backend back.
    rise: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    #: Checks failing in a row that take an up backend down.
    fall: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    #: Bytes written once connected.
    send: bytes | None = None
    #: Bytes the response must contain (within :data:`MAX_RESPONSE`) for the check to pass.
    expect: bytes | None = attrs.field(default=None, validator=_expectable)
    #: Each delay is ``interval`` times a random factor within ``1 ± jitter``.
    jitter: float = attrs.field(default=0.1, validator=_fraction)

    @property
    def enabled(self) -> bool:
        """Whether backends are checked at all (``--health-interval 0`` turns checks off)."""
        return self.interval > 0


class HealthTarget(Protocol):
    """What a :class:`HealthChecker` checks and tells (a backend group implements it)."""

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends to check, read once at :meth:`HealthChecker.start`."""
        ...

    @property
    def clock(self) -> IReactorTime:
        """Times the checks."""
        ...

    def is_up(self, index: int) -> bool:
        """Whether ``backends[index]`` is up now, read at start: a checker started on backends
        that were checked before (their names resolved again) goes on from their state."""
        ...

    def mark(self, index: int, up: bool, reason: str) -> None:
        """``backends[index]`` went down or came back, for ``reason``; called on changes only."""
        ...

    def checked(self, index: int, passed: bool) -> None:
        """A check of ``backends[index]`` ended: every outcome, for the counts (``/metrics``)."""
        ...


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class HealthChecker:
    """Checks every backend of a target on a jittered timer and marks it down or up.

    The backends are read once, at :meth:`start`: a target whose backends
    change stops its checker and starts a new one.
    """

    def __init__(
        self,
        target: HealthTarget,
        settings: HealthSettings,
        *,
        log: Logger | None = None,
        random: Random | None = None,
    ) -> None:
        if not settings.enabled:
            raise ValueError("health checks need an interval > 0")
        self.target = target
        self.settings = settings
        #: Each check's event (by default, nowhere), and a failing ``mark``.
        self.log = log if log is not None else _QUIET
        self.errors = log if log is not None else _log
        self.random = random if random is not None else Random()
        self._monitors: list[_Monitor] = []
        #: Check connections still open, the closing ones included: stop() waits for them.
        self._probes: set[_Probe] = set()

    @property
    def running(self) -> bool:
        """Between :meth:`start` and :meth:`stop`."""
        return bool(self._monitors)

    def start(self) -> None:
        """Schedule each backend's first check, spread over the first interval."""
        if self.running:
            raise RuntimeError("the health checker is already running")
        backends = self.target.backends
        self._monitors = [_Monitor(self, index, backend) for index, backend in enumerate(backends)]
        for monitor in self._monitors:
            monitor.schedule(self.first_delay(monitor.index, len(backends)))

    def stop(self) -> Deferred[None]:
        """Cancel the timers and the checks in flight; fires once their connections are closed."""
        monitors, self._monitors = self._monitors, []
        for monitor in monitors:
            monitor.stop()
        probes = list(self._probes)
        for probe in probes:
            probe.close(clean=False)
        if not probes:
            return succeed(None)
        closed = gatherResults([probe.closed for probe in probes])
        return closed.addCallback(lambda _: None)

    def first_delay(self, index: int, count: int) -> float:
        """When backend ``index`` of ``count`` is first checked: somewhere in its share of one interval.

        Each backend gets its own slice of the first interval, so N backends
        never connect at once when the checker starts (a random time each
        would still let some coincide).
        """
        return (index + self.random.random()) * self.settings.interval / count

    def next_delay(self) -> float:
        """The time from the end of one check to the start of the next: ``interval``, jittered."""
        jitter = self.settings.jitter
        return self.settings.interval * (1 + self.random.uniform(-jitter, jitter))

    def _opened(self, probe: _Probe) -> None:
        self._probes.add(probe)
        probe.closed.addCallback(lambda _: self._probes.discard(probe))


class _Monitor:
    """One backend's checks: one at a time, and the streak that decides up or down."""

    def __init__(self, checker: HealthChecker, index: int, backend: Backend) -> None:
        self.checker = checker
        self.index = index
        self.backend = backend
        self.up = checker.target.is_up(index)
        #: Checks in a row that disagree with ``up`` (failures while up, passes while down).
        self.streak = 0
        self.timer: IDelayedCall | None = None
        self.check: _Check | None = None
        self.started = 0.0
        self.stopped = False

    def schedule(self, delay: float) -> None:
        self.timer = self.checker.target.clock.callLater(delay, self._run)

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        check, self.check = self.check, None
        if check is not None:
            check.cancel()

    def _run(self) -> None:
        self.timer = None
        self.started = self.checker.target.clock.seconds()
        # Assigned before it starts: an endpoint may fail at once, which ends it within start().
        check = self.check = _Check(self.checker, self.backend, self._done)
        check.start()

    def _done(self, passed: bool, why: str) -> None:
        self.check = None
        checker = self.checker
        # The next check is due before anyone hears of this one: a log
        # observer or the target may stop the checker meanwhile.
        self.schedule(checker.next_delay())
        checker.log.debug(
            "health check of {backend} {outcome}: {why}",
            event="health_check",
            backend=self.backend.name,
            index=self.index,
            passed=passed,
            outcome="passed" if passed else "failed",
            why=why,
            duration=checker.target.clock.seconds() - self.started,
        )
        if not self.stopped:
            checker.target.checked(self.index, passed)
            self._count(passed, why)

    def _count(self, passed: bool, why: str) -> None:
        if passed == self.up:
            self.streak = 0
            return
        self.streak += 1
        settings = self.checker.settings
        if passed and self.streak >= settings.rise:
            self._change(True, f"{_plural(settings.rise, 'health check')} passed")
        elif not passed and self.streak >= settings.fall:
            self._change(False, f"{_plural(settings.fall, 'health check')} failed: {why}")

    def _change(self, up: bool, reason: str) -> None:
        self.up = up
        self.streak = 0
        try:
            self.checker.target.mark(self.index, up, reason)
        except Exception:
            # The checks go on: a broken listener of changes must not stop them.
            self.checker.errors.failure(
                "health: marking {backend} failed",
                event="health_mark_failed",
                backend=self.backend.name,
            )


class _Check:
    """One check of one backend: connect, send, expect, all within the timeout.

    It ends exactly once, with ``done(passed, why)``, unless cancelled; its
    connection is closed when it ends: cleanly after a pass, by a reset
    otherwise (nothing more is owed to a backend that failed).
    """

    def __init__(
        self, checker: HealthChecker, backend: Backend, done: Callable[[bool, str], None]
    ) -> None:
        self.checker = checker
        self.settings = checker.settings
        self.backend = backend
        self.done = done
        self.connecting: Deferred[Any] | None = None
        self.probe: _Probe | None = None
        self.timer: IDelayedCall | None = None
        self.finished = False
        #: Response bytes seen so far, and the end of them a match may start in.
        self.seen = 0
        self.tail = b""

    def start(self) -> None:
        self.timer = self.checker.target.clock.callLater(self.settings.timeout, self._deadline)
        connecting = self.connecting = maybeDeferred(
            self.backend.endpoint.connect, _ProbeFactory(self)
        )
        connecting.addCallbacks(self._connected, self._failed)

    def cancel(self) -> None:
        """End without a verdict: the checker is stopping."""
        self._end(passed=False)

    def _connected(self, probe: _Probe) -> None:
        self.connecting = None
        self.probe = probe
        self.checker._opened(probe)
        if self.settings.send is not None:
            probe.write(self.settings.send)
        if self.settings.expect is None:
            self._finish(True, "connected")

    def _failed(self, failure: Failure) -> None:
        self.connecting = None
        # A cancellation of ours (deadline, stop) has ended the check already.
        if not self.finished:
            self._finish(False, failure.getErrorMessage())

    def received(self, data: bytes) -> None:
        """Response bytes: a match of ``expect`` passes, :data:`MAX_RESPONSE` without one fails."""
        expect = self.settings.expect
        if self.finished or expect is None:
            return
        room = MAX_RESPONSE - self.seen
        window = self.tail + data[:room]
        self.seen += min(len(data), room)
        if expect in window:
            self._finish(True, "expected response received")
        elif self.seen >= MAX_RESPONSE:
            self._finish(False, f"no expected response in the first {MAX_RESPONSE} bytes")
        else:
            # A match may straddle segments: keep what could be its start.
            self.tail = window[max(0, len(window) - len(expect) + 1) :]

    def lost(self, reason: Failure) -> None:
        """The connection closed before the check ended: the expected response never came."""
        if not self.finished:
            why = f"closed after {self.seen} bytes without the expected response: {reason.getErrorMessage()}"
            self._finish(False, why)

    def _deadline(self) -> None:
        self.timer = None
        timeout = self.settings.timeout
        if self.probe is None:
            self._finish(False, f"connect timeout ({timeout:g} s)")
        else:
            why = f"no expected response within {timeout:g} s ({self.seen} bytes received)"
            self._finish(False, why)

    def _finish(self, passed: bool, why: str) -> None:
        self._end(passed)
        self.done(passed, why)

    def _end(self, passed: bool) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            # Closes the attempt's socket (and a TLS handshake in progress).
            connecting.cancel()
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.close(clean=passed)


class _Probe(TwistedProtocol):
    """A check's connection: hands what it reads to the check, and says when it is closed."""

    def __init__(self, check: _Check) -> None:
        self.check: _Check | None = check
        #: Fires once the connection is closed.
        self.closed: Deferred[None] = Deferred()

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self, *, clean: bool) -> None:
        """Close the connection: with a FIN (and TLS close_notify) if ``clean``, else with a reset."""
        if clean:
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.check is not None:
            self.check.received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        check, self.check = self.check, None
        if check is not None:
            check.lost(reason)
        self.closed.callback(None)


class _ProbeFactory(Factory):
    """Builds the probe of one check (quietly: a check every few seconds would log twice each)."""

    noisy = False

    def __init__(self, check: _Check) -> None:
        self.check = check

    def buildProtocol(self, addr: IAddress | None) -> _Probe:
        return _Probe(self.check)
