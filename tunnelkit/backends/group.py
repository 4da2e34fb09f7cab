"""A listener's backends, and how one connection reaches one of them.

A :class:`BackendGroup` owns what the connect phase needs: which backends
there are, the order a connection tries them in (its :class:`Strategy`;
today's ordered failover is :class:`InOrder`, and balancing strategies
plug in the same way), the connect timeout of each attempt, and the
retries. Each attempt is bounded by the connect timeout (the group cancels
the endpoint's attempt, which closes its socket), and cancelling the whole
dial cancels the attempt in flight: a client that leaves while its backend
is still connecting leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure


@attrs.frozen
class Backend:
    """A configured backend: what the user wrote and the endpoint it became."""

    name: str
    endpoint: IStreamClientEndpoint


@attrs.frozen
class Dialed:
    """A connected backend and the protocol its connection was given."""

    backend: Backend
    protocol: IProtocol


class BackendsUnavailable(Exception):
    """No backend accepted the connection; ``errors`` says why, per backend."""

    def __init__(self, errors: Sequence[tuple[Backend, str]]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{backend.name}: {why}" for backend, why in self.errors))

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


class Strategy(Protocol):
    """Chooses, for one connection, the order in which it tries the group's backends."""

    def order(self, backends: tuple[Backend, ...]) -> Iterator[Backend]:
        """The backends to try, best first; the dial stops at the first that connects."""
        ...


class InOrder:
    """The backends in the order given: the first that connects (ordered failover)."""

    def order(self, backends: tuple[Backend, ...]) -> Iterator[Backend]:
        return iter(backends)


#: The strategy of a group that is given none.
IN_ORDER = InOrder()


class BackendGroup:
    """A listener's backends: one connection reaches one of them, in the strategy's order."""

    def __init__(
        self,
        backends: Sequence[Backend],
        clock: IReactorTime,
        connect_timeout: float,
        strategy: Strategy = IN_ORDER,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = tuple(backends)
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.strategy = strategy

    def dial(self, factory: IProtocolFactory) -> Deferred[Dialed]:
        """Try the backends in the strategy's order; fail with :class:`BackendsUnavailable`."""
        dialing = _Dialing(self, factory)
        result = dialing.result
        dialing.attempt_next()
        return result


class _Dialing:
    """One :meth:`BackendGroup.dial`: the backends in the strategy's order, until one connects.

    A plain object rather than nested closures: a closure that calls itself
    for the next attempt is a reference cycle, which kept the whole tunnel
    (legs, transports, buffers) alive until the garbage collector ran.
    Everything is let go once the result fires.
    """

    def __init__(self, group: BackendGroup, factory: IProtocolFactory) -> None:
        self.group = group
        self.factory: IProtocolFactory | None = factory
        self.order = group.strategy.order(group.backends)
        self.errors: list[tuple[Backend, str]] = []
        self.current: Deferred[IProtocol] | None = None
        self.timer: IDelayedCall | None = None
        self.timed_out = False
        self.cancelled = False
        self.result: Deferred[Dialed] = Deferred(self._cancel)

    def attempt_next(self) -> None:
        backend = next(self.order, None)
        if backend is None:
            self._finish().errback(BackendsUnavailable(self.errors))
            return
        assert self.factory is not None
        self.timed_out = False
        connecting = self.current = backend.endpoint.connect(self.factory)
        self.timer = self.group.clock.callLater(self.group.connect_timeout, self._deadline)
        connecting.addCallbacks(
            self._connected, self._failed, callbackArgs=(backend,), errbackArgs=(backend,)
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

    def _connected(self, protocol: IProtocol, backend: Backend) -> None:
        self._stop_timer()
        self._finish().callback(Dialed(backend, protocol))

    def _failed(self, failure: Failure, backend: Backend) -> None:
        self._stop_timer()
        if self.cancelled:
            return
        timeout = self.group.connect_timeout
        self.errors.append((backend, _why(failure, timeout, self.timed_out)))
        self.attempt_next()

    def _cancel(self, _: Deferred[Dialed]) -> None:
        self.cancelled = True
        if self.current is not None:
            self.current.cancel()

    def _finish(self) -> Deferred[Dialed]:
        self.factory = None
        self.current = None
        return self.result
