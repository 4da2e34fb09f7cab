"""A listener's backends, their state, and how one connection reaches one of them.

A :class:`BackendGroup` owns what the connect phase needs: which backends
there are and which of them may take a connection now (health, passive
ejection, ``--max-conn-per-backend``, backups), the strategy that picks one
(:mod:`tunnelkit.backends.balance`), the connect timeout of each attempt,
and the retries. Each attempt is bounded by the connect timeout (the group
cancels the endpoint's attempt, which closes its socket), and cancelling the
whole dial cancels the attempt in flight: a client that leaves while its
backend is still connecting leaves nothing behind.

The rules are the engine's too (``_engine.c``'s ``Pool``): when a listener
runs on the engine, the group keeps its configuration and pushes what Python
learns (health checks, slow start) to the engine's pool through
:attr:`BackendGroup.mirror`, and logs the pool's passive transitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.backends import balance
from tunnelkit.backends.balance import WEIGHT_SCALE, Load

if TYPE_CHECKING:
    from tunnelkit.relay.tunnel import Tunnel

log = Logger(namespace="tunnelkit.backends")

#: The most a backend's configured weight may be (HAProxy's limit).
MAX_WEIGHT = 256


@attrs.frozen
class Backend:
    """A configured backend: what the user wrote, the endpoint it became, its weight, whether it is a backup."""

    name: str
    endpoint: IStreamClientEndpoint
    weight: int = 1
    backup: bool = False


@attrs.frozen
class Balancing:
    """How a group shares connections and reacts to failures (see docs/balancing.md).

    The defaults are a bare group's (a CONNECT target's addresses): each tried
    once in order, nothing remembered. Listeners get ``--balance`` and the
    other keys from their settings.
    """

    strategy: str = "first"
    #: Attempts after the first; ``None``: each backend once.
    retries: int | None = None
    #: Connections per backend at most (0: no limit); the next backend takes the rest.
    max_conn: int = 0
    #: Consecutive connect failures that eject a backend (0: never).
    eject_after: int = 0
    #: The first ejection's length, doubled on each one after it, up to ``eject_max``.
    eject_base: float = 1.0
    eject_max: float = 60.0
    #: Seconds a backend that comes back up takes to reach its full weight.
    slow_start: float = 0.0
    #: Abort a backend's live tunnels when it goes down (health checks).
    close_on_down: bool = False


@attrs.frozen
class Dialed:
    """A connected backend, the protocol its connection was given, and the attempts it took."""

    backend: Backend
    protocol: IProtocol
    attempts: int = 1
    #: The backend's state in its group, for the group's :meth:`~BackendGroup.release`:
    #: the object itself, not an index, so a :meth:`~BackendGroup.replace` cannot misdirect it.
    state: BackendState | None = None
    group: BackendGroup | None = None


class BackendsUnavailable(Exception):
    """No backend accepted the connection; ``errors`` says why, per backend.

    No errors at all means no backend was available to try (all down).
    ``cause`` is the last attempt's error (``None`` if it timed out or none
    was tried): a SOCKS5 client is told whether it was refused or unreachable.
    """

    def __init__(
        self, errors: Sequence[tuple[Backend, str]], cause: BaseException | None = None
    ) -> None:
        self.errors = list(errors)
        self.cause = cause
        message = "; ".join(f"{backend.name}: {why}" for backend, why in self.errors)
        super().__init__(message or "no backend available")

    @property
    def timed_out(self) -> bool:
        """True when the last backend tried did not answer in time."""
        return bool(self.errors) and self.errors[-1][1].startswith("connect timeout")


def _why(failure: Failure, timeout: float, timed_out: bool) -> str:
    # Endpoints fail a cancelled attempt with ConnectingCancelledError, which
    # addTimeout does not turn into a TimeoutError: the group's own flag
    # says whether its deadline did the cancelling.
    if timed_out or failure.check(TimeoutError, error.TimeoutError):
        return f"connect timeout ({timeout:g} s)"
    return failure.getErrorMessage()


class Mirror(Protocol):
    """Where a group's health and weights also go: the engine's ``Pool`` of the same backends."""

    def set(self, index: int, *, up: bool | None = None, weight: int | None = None) -> None: ...


@attrs.define(eq=False)
class BackendState:
    """What a group knows of one backend now (kept across a :meth:`~BackendGroup.replace` by name)."""

    backend: Backend
    load: Load
    #: As the health checks last said.
    up: bool = True
    #: Consecutive failed connects, and the ejections in a row they caused.
    failures: int = 0
    ejections: int = 0
    #: The clock's time until which a passive ejection lasts (0: none).
    ejected_until: float = 0.0
    #: When it came back up (a slow start ramps its weight from then).
    up_since: float = 0.0
    #: Its live tunnels, kept only with ``close_on_down``.
    tunnels: set[Tunnel] = attrs.field(factory=set)
    #: Since it joined the group (for ``/metrics``): connects that succeeded and
    #: failed (on Twisted's plane; the engine's pool counts its own), failed health checks.
    connections: int = 0
    connect_failures: int = 0
    health_failures: int = 0


class BackendGroup:
    """A listener's backends: one connection reaches one of them, as the strategy picks."""

    def __init__(
        self,
        backends: Sequence[Backend],
        clock: IReactorTime,
        connect_timeout: float,
        balancing: Balancing = Balancing(),
        *,
        listener: str = "",
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.balancing = balancing
        self.listener = listener
        self.strategy = balance.strategy(balancing.strategy)
        #: Whether the strategy needs the client's address (only the source hash reads it).
        self.by_client = isinstance(self.strategy, balance.SourceHash)
        self._take([_fresh_state(backend) for backend in backends], backends)
        #: The engine's pool of the same backends, when the listener runs there.
        self.mirror: Mirror | None = None
        #: Called with ``(index, reason)`` to abort a backend's engine tunnels (``close_on_down``).
        self.close_mirrored: Callable[[int, str], object] | None = None
        self._ramp: IDelayedCall | None = None

    def _take(self, states: list[BackendState], backends: Sequence[Backend]) -> None:
        self.backends = tuple(backends)
        self.states = states
        self.loads = [state.load for state in states]
        retries = self.balancing.retries
        self.attempts = len(backends) if retries is None else 1 + retries

    def replace(self, backends: Sequence[Backend]) -> None:
        """Serve with ``backends`` from now on (names resolved again); log what changed.

        A backend whose name persists keeps its state (health, connections,
        ejection, the round-robin's place), new ones start up at full weight,
        and removed ones are dropped. Dials in flight and live tunnels hold
        their backend's state itself, so they end on the right one, also on
        a removed one.
        """
        if not backends:
            raise ValueError("at least one backend is needed")
        previous = {state.backend.name: state for state in self.states}
        added = [backend.name for backend in backends if backend.name not in previous]
        states = [
            previous.pop(backend.name) if backend.name in previous else _fresh_state(backend)
            for backend in backends
        ]
        for state, backend in zip(states, backends, strict=True):
            state.backend = backend
        self._take(states, backends)
        # The engine's pool was of the old backends: the engine's plane makes a new one.
        self.mirror = self.close_mirrored = None
        log.info(
            "backends of {listener} changed: added {added}, removed {removed}",
            event="backends_changed",
            listener=self.listener,
            added=added,
            removed=list(previous),
        )

    # -- picking -----------------------------------------------------------

    def _usable(self, i: int, now: float, *, ejected_too: bool = False) -> bool:
        state = self.states[i]
        max_conn = self.balancing.max_conn
        return (
            state.up
            and state.load.weight > 0
            and (ejected_too or state.ejected_until <= now)
            and (max_conn == 0 or state.load.active < max_conn)
        )

    def candidates(self, tried: Collection[BackendState] = ()) -> list[int]:
        """Who may take the next attempt: available primaries, else backups, else ejected ones.

        The last tier ("panic") tries backends that are up but passively
        ejected rather than refuse a client while one might answer.
        """
        now = self.clock.seconds()
        fresh = [i for i, state in enumerate(self.states) if state not in tried]
        for tier in (False, True):
            found = [i for i in fresh if self.backends[i].backup is tier and self._usable(i, now)]
            if found:
                return found
        return [i for i in fresh if self._usable(i, now, ejected_too=True)]

    def pick(self, client: int, tried: Collection[BackendState] = ()) -> int | None:
        """The backend for the next attempt, or ``None`` if none may be tried."""
        candidates = self.candidates(tried)
        if not candidates:
            return None
        return self.strategy.pick(self.loads, candidates, client)

    def dial(self, factory: IProtocolFactory, client: IAddress | None = None) -> Deferred[Dialed]:
        """Connect to a backend for ``client``; fail with :class:`BackendsUnavailable`."""
        dialing = _Dialing(self, factory, balance.client_key(getattr(client, "host", None)))
        result = dialing.result
        dialing.attempt_next()
        return result

    # -- what attempts and tunnels report --------------------------------------

    def connected(self, state: BackendState) -> None:
        """An attempt connected: the backend's failures are forgiven, and an ejection ends."""
        state.connections += 1
        state.failures = 0
        if state.ejections:
            state.ejections = 0
            state.ejected_until = 0.0
            self.log_change(state, True, "connected again")

    def failed(self, state: BackendState, why: str) -> None:
        """An attempt failed: count it, and eject the backend after ``eject_after`` in a row."""
        state.load.active -= 1
        state.failures += 1
        state.connect_failures += 1
        settings = self.balancing
        if not settings.eject_after or state.failures < settings.eject_after:
            return
        if state.ejected_until > self.clock.seconds():
            return  # attempts begun before the ejection, failing after it
        backoff = min(settings.eject_base * 2**state.ejections, settings.eject_max)
        state.ejected_until = self.clock.seconds() + backoff
        state.ejections += 1
        if state.ejections == 1:
            self.log_change(
                state,
                False,
                f"{state.failures} connect failures in a row: {why}; next try in {backoff:g} s",
            )

    def attach(self, dialed: Dialed, tunnel: Tunnel) -> None:
        """``tunnel`` relays to ``dialed``'s backend (kept to close it on a health failure)."""
        assert dialed.state is not None
        if self.balancing.close_on_down:
            dialed.state.tunnels.add(tunnel)

    def release(self, dialed: Dialed, tunnel: Tunnel) -> None:
        """``tunnel``, which ``dialed`` connected, has ended."""
        state = dialed.state
        assert state is not None
        state.load.active -= 1
        state.tunnels.discard(tunnel)

    # -- health ----------------------------------------------------------------

    def is_up(self, index: int) -> bool:
        """Whether the health checks last said backend ``index`` is up."""
        return self.states[index].up

    def checked(self, index: int, passed: bool) -> None:
        """A health check of backend ``index`` ended: a failure is counted."""
        self.states[index].health_failures += not passed

    def mark(self, index: int, up: bool, reason: str) -> None:
        """The health checks changed their mind about a backend: log it once and act on it."""
        state = self.states[index]
        if state.up == up:
            return
        state.up = up
        self.log_change(state, up, reason)
        if up:
            state.failures = state.ejections = 0
            state.ejected_until = 0.0
            state.up_since = self.clock.seconds()
            if self.balancing.slow_start > 0:
                full = self.backends[index].weight * WEIGHT_SCALE
                self._set_weight(index, max(1, full // 10))
                self._schedule_ramp()
        if self.mirror is not None:
            self.mirror.set(index, up=up)
        if not up and self.balancing.close_on_down:
            self._close(index, f"backend {self.backends[index].name} went down: {reason}")

    def log_change(self, state: BackendState, up: bool, reason: str) -> None:
        """Log a backend's change of state, once (from the group, its checks or the engine's pool)."""
        (log.info if up else log.warn)(
            "backend {backend} is {state}: {reason}",
            event="backend_up" if up else "backend_down",
            listener=self.listener,
            backend=state.backend.name,
            state="up" if up else "down",
            reason=reason,
        )
        # Passive ejection and full backends still leave the panic tier: only
        # health and weights (which both planes share) turn every client away.
        if not up and not any(s.up and s.load.weight > 0 for s in self.states):
            log.error(
                "no backend of {listener} is available: clients are turned away",
                event="no_backend_available",
                listener=self.listener,
            )

    def _close(self, index: int, reason: str) -> None:
        from tunnelkit.relay.tunnel import CloseKind

        for tunnel in list(self.states[index].tunnels):
            tunnel.abort(reason, CloseKind.SHUTDOWN)
        if self.close_mirrored is not None:
            self.close_mirrored(index, reason)

    # -- slow start ------------------------------------------------------------

    def _set_weight(self, index: int, weight: int) -> None:
        self.states[index].load.weight = weight
        if self.mirror is not None:
            self.mirror.set(index, weight=weight)

    def _schedule_ramp(self) -> None:
        if self._ramp is None or not self._ramp.active():
            self._ramp = self.clock.callLater(self.balancing.slow_start / 10, self._ramp_weights)

    def _ramp_weights(self) -> None:
        """Raise the weights of backends in their slow start, by tenths, to the configured one."""
        self._ramp = None
        now, period = self.clock.seconds(), self.balancing.slow_start
        ramping = False
        for i, state in enumerate(self.states):
            full = self.backends[i].weight * WEIGHT_SCALE
            if not state.up or state.load.weight >= full:
                continue
            share = min(1.0, (now - state.up_since) / period)
            self._set_weight(i, max(1, math.floor(full * share)))
            ramping = ramping or share < 1.0
        if ramping:
            self._schedule_ramp()

    def stop(self) -> None:
        """Cancel the slow start's timer (the service is stopping)."""
        if self._ramp is not None and self._ramp.active():
            self._ramp.cancel()
        self._ramp = None


def _fresh_state(backend: Backend) -> BackendState:
    """A backend's state when it joins a group: up, at its full weight."""
    return BackendState(
        backend, Load(backend.weight * WEIGHT_SCALE, balance.fnv1a64(backend.name.encode()))
    )


class _Dialing:
    """One :meth:`BackendGroup.dial`: attempts on the strategy's picks, until one connects.

    A plain object rather than nested closures: a closure that calls itself
    for the next attempt is a reference cycle, which kept the whole tunnel
    (legs, transports, buffers) alive until the garbage collector ran.
    Everything is let go once the result fires.
    """

    def __init__(self, group: BackendGroup, factory: IProtocolFactory, client: int) -> None:
        self.group = group
        self.factory: IProtocolFactory | None = factory
        self.client = client
        #: The states of the backends tried: stable across a replace of the group's backends.
        self.tried: set[BackendState] = set()
        self.errors: list[tuple[Backend, str]] = []
        self.cause: BaseException | None = None
        self.current: Deferred[IProtocol] | None = None
        self.timer: IDelayedCall | None = None
        self.timed_out = False
        self.cancelled = False
        self.result: Deferred[Dialed] = Deferred(self._cancel)

    def attempt_next(self) -> None:
        group = self.group
        index = group.pick(self.client, self.tried) if len(self.tried) < group.attempts else None
        if index is None:
            self._finish().errback(BackendsUnavailable(self.errors, self.cause))
            return
        assert self.factory is not None
        state = group.states[index]
        self.tried.add(state)
        state.load.active += 1
        self.timed_out = False
        connecting = self.current = state.backend.endpoint.connect(self.factory)
        self.timer = group.clock.callLater(group.connect_timeout, self._deadline)
        connecting.addCallbacks(
            self._connected, self._failed, callbackArgs=(state,), errbackArgs=(state,)
        )

    def _deadline(self) -> None:
        self.timed_out = True
        self.timer = None
        assert self.current is not None
        self.current.cancel()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _connected(self, protocol: IProtocol, state: BackendState) -> None:
        self._stop_timer()
        self.group.connected(state)
        dialed = Dialed(state.backend, protocol, len(self.tried), state, self.group)
        self._finish().callback(dialed)

    def _failed(self, failure: Failure, state: BackendState) -> None:
        self._stop_timer()
        group = self.group
        if self.cancelled:
            state.load.active -= 1
            return
        why = _why(failure, group.connect_timeout, self.timed_out)
        group.failed(state, why)
        self.errors.append((state.backend, why))
        self.cause = None if self.timed_out else failure.value
        self.attempt_next()

    def _cancel(self, _: Deferred[Dialed]) -> None:
        self.cancelled = True
        if self.current is not None:
            self.current.cancel()

    def _finish(self) -> Deferred[Dialed]:
        self.factory = None
        self.current = None
        return self.result
