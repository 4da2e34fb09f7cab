"""Opening the backend: the listed backends in order, the first that connects.

Each attempt is bounded by the connect timeout (the dialer cancels the
endpoint's attempt, which closes its socket), and cancelling the
whole dial cancels the attempt in flight: a client that leaves while its
backend is still connecting leaves nothing behind.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import implementer


def host_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP endpoint for ``host:port``: direct for an IP address, resolving for a name.

    ``HostnameEndpoint`` runs ``getaddrinfo`` in a thread for every
    connection, even for an address literal; that hop cost a third of the
    new-connection rate, so addresses get a :class:`AddressEndpoint`.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    return AddressEndpoint(reactor, host, port)


class _Attempt(ClientFactory):
    """One ``connectTCP`` of an :class:`AddressEndpoint`; its protocol sits on the transport itself."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self.factory: IProtocolFactory | None = factory
        self.connector: IConnector | None = None
        self.result: Deferred[IProtocol] | None = Deferred(self._cancel)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        assert self.factory is not None
        protocol: Any = self.factory.buildProtocol(addr)  # type: ignore[arg-type]
        if protocol is None:
            return None
        result = self.result
        assert result is not None
        make = protocol.makeConnection

        def made(transport: Any) -> None:
            # The endpoint contract: fire once the protocol is connected.
            # Twisted calls nothing after makeConnection, so it is wrapped for
            # this one call (and unwrapped), instead of a wrapper protocol
            # forwarding every read for the life of the connection. The
            # transport keeps this factory (as its connector's) as long as it
            # lives: what it no longer needs is let go.
            del protocol.makeConnection
            self.factory = self.connector = self.result = None
            make(transport)
            result.callback(protocol)

        protocol.makeConnection = made
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        result, self.result = self.result, None
        self.factory = self.connector = None
        if result is not None and not result.called:
            result.errback(reason)

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        # As Twisted's endpoints do: the attempt is still connecting (else the
        # Deferred would have fired), so stopping it closes its socket.
        connector = self.connector
        assert connector is not None
        result.errback(error.ConnectingCancelledError(connector.getDestination()))
        connector.stopConnecting()


@implementer(IStreamClientEndpoint)
class AddressEndpoint:
    """TCP to an IP address, without the per-connection wrappers of Twisted's TCP endpoints.

    ``TCP4ClientEndpoint`` puts a ``_WrappingProtocol`` between the transport
    and the protocol, which forwards every read and lives as long as the
    connection, and a ``_WrappingFactory`` and its Deferred behind it. Here
    the backend leg is the transport's protocol; the connect timeout is the
    Dialer's.
    """

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = _Attempt(protocolFactory)
        result = attempt.result
        assert result is not None
        attempt.connector = self.reactor.connectTCP(self.host, self.port, attempt)
        return result


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
    # addTimeout does not turn into a TimeoutError: the dialer's own flag
    # says whether its deadline did the cancelling.
    if timed_out or failure.check(TimeoutError, error.TimeoutError):
        return f"connect timeout ({timeout:g} s)"
    return failure.getErrorMessage()


class Dialer:
    """Connects to the first reachable backend of an ordered list."""

    def __init__(
        self, backends: Sequence[Backend], clock: IReactorTime, connect_timeout: float
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = tuple(backends)
        self.clock = clock
        self.connect_timeout = connect_timeout

    def dial(self, factory: IProtocolFactory) -> Deferred[Dialed]:
        """Try each backend in turn; fail with :class:`BackendsUnavailable`."""
        dialing = _Dialing(self, factory)
        result = dialing.result
        dialing.attempt_next()
        return result


class _Dialing:
    """One :meth:`Dialer.dial`: the backends in order, until one connects.

    A plain object rather than nested closures: a closure that calls itself
    for the next attempt is a reference cycle, which kept the whole tunnel
    (legs, transports, buffers) alive until the garbage collector ran.
    Everything is let go once the result fires.
    """

    def __init__(self, dialer: Dialer, factory: IProtocolFactory) -> None:
        self.dialer = dialer
        self.factory: IProtocolFactory | None = factory
        self.index = -1
        self.errors: list[tuple[Backend, str]] = []
        self.current: Deferred[IProtocol] | None = None
        self.timer: IDelayedCall | None = None
        self.timed_out = False
        self.cancelled = False
        self.result: Deferred[Dialed] = Deferred(self._cancel)

    def attempt_next(self) -> None:
        self.index += 1
        backends = self.dialer.backends
        if self.index == len(backends):
            self._finish().errback(BackendsUnavailable(self.errors))
            return
        backend = backends[self.index]
        assert self.factory is not None
        self.timed_out = False
        connecting = self.current = backend.endpoint.connect(self.factory)
        self.timer = self.dialer.clock.callLater(self.dialer.connect_timeout, self._deadline)
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
        timeout = self.dialer.connect_timeout
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
