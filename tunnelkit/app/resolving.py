"""Backend names, resolved at start and again every ``--resolve-interval``.

A name given as a backend is resolved when tunnelkit starts, not per
connection, and each of its addresses becomes a backend of its own (nginx's
``server`` and HAProxy's ``server`` do the same), so balancing and health see
every address and the listener relays on the engine. With
``--resolve-interval`` a :class:`Refresher` resolves the names again while
tunnelkit runs (nginx's ``resolve``, HAProxy's ``resolvers``), without
blocking the reactor, and swaps a changed set of addresses into the
listener's :class:`~tunnelkit.backends.group.BackendGroup` (and from there
into the engine's pool and the health checks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from random import Random

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.backends import resolver
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.backends.health import HealthChecker, HealthSettings
from tunnelkit.cli import preflight
from tunnelkit.config.addresses import HostPort
from tunnelkit.config.model import BackendSpec

log = Logger(namespace="tunnelkit.backends")

#: The backends one ``--to`` value became: ``(name, spec of one address)`` each.
Addresses = tuple[tuple[str, BackendSpec], ...]

#: Each delay is the interval times a random factor within ``1 ± JITTER``.
JITTER = 0.1


def resolvable(spec: BackendSpec) -> bool:
    """Whether ``spec`` names a host to resolve: not an address, a UNIX path, or TLS.

    A TLS backend keeps its name, which its certificate is checked against,
    and Twisted resolves it per connection.
    """
    address = spec.address
    return not spec.tls and isinstance(address, HostPort) and not preflight.is_ip(address.host)


def named(spec: BackendSpec, found: Sequence[resolver.IPAddress]) -> Addresses:
    """The backends of ``spec``'s name at the addresses ``found``.

    One address keeps the name as written; several are each named
    ``NAME:PORT (ADDRESS)``.
    """
    assert isinstance(spec.address, HostPort)
    port = spec.address.port
    each = [(ip, attrs.evolve(spec, address=HostPort(str(ip), port))) for ip in found]
    if len(each) == 1:
        return ((spec.text, each[0][1]),)
    return tuple((f"{spec.text} ({ip})", one) for ip, one in each)


def at_start(spec: BackendSpec) -> Addresses:
    """``spec``'s backends now (``getaddrinfo`` blocks: only before the reactor serves).

    A name that does not resolve stays as written: Twisted resolves it per
    connection, in case DNS comes later.
    """
    if not resolvable(spec):
        return ((spec.text, spec),)
    assert isinstance(spec.address, HostPort)
    try:
        found = resolver.lookup(spec.address.host, spec.address.port)
    except resolver.ResolveError as e:
        log.warn(
            "--to {backend}: {error}; clients are dropped until it resolves",
            event="backend_unresolved",
            backend=spec.text,
            error=str(e),
        )
        return ((spec.text, spec),)
    return named(spec, found)


class Unservable(Exception):
    """A new set of backends the listener's plane cannot serve (the engine's limits); the message says why."""


class Refresher:
    """One listener's backend names, resolved again every interval; a changed set is swapped in.

    A name that fails to resolve keeps the addresses it had (warned once per
    streak of failures). ``swap`` serves with the new backends: by default
    :meth:`BackendGroup.replace` (the names that persist keep their state);
    the engine's plane also makes a new pool and profile, and raises
    :class:`Unservable` for a set it cannot take (the old one stays, and the
    next round tries again). Then the health checks restart on the new set:
    a checker reads its backends when it starts, so the checks are this
    object's to start and stop when names are resolved again.
    """

    def __init__(
        self,
        group: BackendGroup,
        resolved: Sequence[tuple[BackendSpec, Addresses]],
        interval: float,
        *,
        resolve: resolver.Resolve,
        make_backend: Callable[[str, BackendSpec], Backend],
        swap: Callable[[list[Backend]], object] | None = None,
        health: HealthSettings | None = None,
        random: Random | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError("names are resolved again only with an interval > 0")
        self.group = group
        self.clock: IReactorTime = group.clock
        #: Each ``--to`` value, and the backends it is now.
        self.resolved = list(resolved)
        self.interval = interval
        self.resolve = resolve
        self.make_backend = make_backend
        self.swap = swap if swap is not None else group.replace
        self.health = health
        self.random = random if random is not None else Random()
        self.checker: HealthChecker | None = None
        #: The specs whose last resolution failed (each warned about once).
        self.failing: set[int] = set()
        #: Why the last new set could not be served (warned about once).
        self.unservable: str | None = None
        self._timer: IDelayedCall | None = None
        self._running = False

    def start(self) -> None:
        self._running = True
        self._start_checks()
        self._schedule()

    def stop(self) -> Deferred[None] | None:
        """Stop resolving (a resolution in flight is ignored) and the health checks."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        checker, self.checker = self.checker, None
        return checker.stop() if checker is not None else None

    def _start_checks(self) -> None:
        if self.health is not None:
            self.checker = HealthChecker(self.group, self.health)
            self.checker.start()

    def _schedule(self) -> None:
        delay = self.interval * (1 + self.random.uniform(-JITTER, JITTER))
        self._timer = self.clock.callLater(delay, self.refresh)

    def refresh(self) -> Deferred[None]:
        """Resolve every name now; swap in the new backends if their set changed."""
        self._timer = None
        asked = [i for i, (spec, _) in enumerate(self.resolved) if resolvable(spec)]
        answers = [self._resolve(self.resolved[i][0]) for i in asked]
        done: Deferred[None] = DeferredList(answers, consumeErrors=True).addCallback(
            lambda results: self._answered(dict(zip(asked, results, strict=True)))
        )
        done.addErrback(self._broken)
        done.addCallback(lambda _: self._schedule() if self._running else None)
        return done

    def _broken(self, failure: Failure) -> None:
        # Logged, and the next round comes all the same.
        log.failure(
            "resolving the backends of {listener} again failed",
            failure,
            event="resolve_failed",
            listener=self.group.listener,
        )

    def _resolve(self, spec: BackendSpec) -> Deferred[list[resolver.IPAddress]]:
        assert isinstance(spec.address, HostPort)
        return self.resolve(spec.address.host, spec.address.port)

    def _answered(self, results: dict[int, tuple[bool, object]]) -> None:
        if not self._running:
            return
        resolved = list(self.resolved)
        for i, (ok, answer) in results.items():
            spec = resolved[i][0]
            if ok:
                assert isinstance(answer, list)
                resolved[i] = (spec, named(spec, answer))
                self.failing.discard(i)
            elif i not in self.failing:
                self.failing.add(i)
                self._warn(spec, answer)
        before = [entry for _, addresses in self.resolved for entry in addresses]
        entries = [entry for _, addresses in resolved for entry in addresses]
        if entries != before and self._swapped(entries):
            self.resolved = resolved

    def _warn(self, spec: BackendSpec, failure: object) -> None:
        error = failure.getErrorMessage() if isinstance(failure, Failure) else str(failure)
        log.warn(
            "--to {backend}: {error}; its addresses stay as they were",
            event="backend_unresolved",
            backend=spec.text,
            error=error,
            listener=self.group.listener,
        )

    def _swapped(self, entries: list[tuple[str, BackendSpec]]) -> bool:
        """Serve with the backends of ``entries``; whether that was done."""
        try:
            self.swap([self.make_backend(name, spec) for name, spec in entries])
        except Unservable as e:
            if self.unservable != str(e):
                self.unservable = str(e)
                log.warn(
                    "the new addresses of {listener}'s backends are not used: {error}",
                    event="backends_unchanged",
                    listener=self.group.listener,
                    error=str(e),
                )
            return False
        self.unservable = None
        checker, self.checker = self.checker, None
        if checker is not None:
            checker.stop()
        self._start_checks()
        return True
