"""Reaching a backend through an upstream proxy (``--via``): an endpoint that negotiates first.

:class:`ViaEndpoint` connects to the proxy (over TLS for ``https://``),
asks it for the backend (:mod:`tunnelkit.backends.via_handshake`: HTTP
CONNECT or SOCKS5), and only then connects the protocol it was given to the
same transport, with whatever the proxy passed on after its reply: from the
relay's side the connection is a backend connection like any other, so
half-close, backpressure, splice and the timers work unchanged, and the
negotiation is part of the attempt (bounded by ``--connect-timeout``, which
cancels it). A refusal fails the attempt with :class:`ProxyRefused`, whose
message names the proxy (password masked) and carries its HTTP status or
SOCKS5 reply code: the backend group counts it as a failed attempt (retries,
passive ejection, health checks) and the tunnel's record says why.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.backends.via_handshake import Negotiation, Refusal, Send, Through, negotiation
from tunnelkit.backends.via_url import Via


class ProxyRefused(Exception):
    """The upstream proxy did not open the tunnel: the message says which proxy, and why."""


@implementer(IStreamClientEndpoint)
class ViaEndpoint:
    """``host:port`` through the proxy ``via``, reached with the endpoint ``proxy``.

    Connected means the proxy has said yes: the protocol given to
    :meth:`connect` then sits on the proxy's connection itself.
    """

    def __init__(self, proxy: IStreamClientEndpoint, via: Via, host: str, port: int) -> None:
        self.proxy = proxy
        self.via = via
        self.host = host
        self.port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        via = self.via
        attempt = _Attempt(
            protocolFactory,
            negotiation(via.kind, self.host, self.port, via.user, via.password),
            via.shown,
        )
        connecting: Deferred[Any] = self.proxy.connect(_NegotiatorFactory(attempt))
        attempt.connecting = connecting
        connecting.addErrback(attempt.not_connected)
        return attempt.result


class _Attempt:
    """One :meth:`ViaEndpoint.connect`: to the proxy, the negotiation, then the hand-over."""

    def __init__(self, factory: IProtocolFactory, negotiation: Negotiation, shown: str) -> None:
        self.factory: IProtocolFactory | None = factory
        self.negotiation = negotiation
        self.shown = shown
        self.connecting: Deferred[Any] | None = None
        self.negotiator: _Negotiator | None = None
        self.result: Deferred[IProtocol] = Deferred(self._cancel)

    def not_connected(self, failure: Failure) -> None:
        """The proxy could not be reached (refused, TLS failed, timed out).

        A proxy reached through another one that refused it is that one's
        refusal, as it said it.
        """
        if not failure.check(CancelledError, TimeoutError, error.TimeoutError, ProxyRefused):
            failure = Failure(ProxyRefused(f"via {self.shown}: {failure.getErrorMessage()}"))
        self._finish(failure)

    def refused(self, reason: str) -> None:
        self._finish(Failure(ProxyRefused(f"via {self.shown}: {reason}")))

    def through(self, negotiator: _Negotiator, rest: bytes) -> None:
        """The proxy reached the backend: the protocol takes the connection over, ``rest`` first."""
        factory, transport = self.factory, negotiator.transport
        assert factory is not None
        protocol = factory.buildProtocol(transport.getPeer())
        assert protocol is not None, "the relay's factories always build a protocol"
        _hand_over(transport, negotiator, protocol)
        protocol.makeConnection(transport)
        if rest:
            protocol.dataReceived(rest)
        self._finish(protocol)

    def _finish(self, outcome: IProtocol | Failure) -> None:
        result = self.result
        self.factory = self.connecting = self.negotiator = None
        if result.called:
            return  # cancelled already
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    def _cancel(self, _: Deferred[IProtocol]) -> None:
        # Deferred.cancel fails the result with CancelledError once this returns.
        connecting, negotiator = self.connecting, self.negotiator
        self.factory = self.connecting = self.negotiator = None
        if negotiator is not None:
            negotiator.attempt = None
            negotiator.transport.abortConnection()
        elif connecting is not None:
            connecting.cancel()


def _hand_over(transport: Any, old: IProtocol, new: IProtocol) -> None:
    """Make whatever delivers ``transport``'s reads to ``old`` deliver them to ``new``.

    That is the TCP transport itself (tunnelkit's address endpoints), the
    TLS layer (``https://`` proxies) or the ``_WrappingProtocol`` of
    Twisted's ``HostnameEndpoint`` (a proxy given by name): the new protocol
    then gets each read directly, with no wrapper of ours in between.
    """
    for holder in (transport, getattr(transport, "protocol", None)):
        for name in ("protocol", "wrappedProtocol", "_wrappedProtocol"):
            if getattr(holder, name, None) is old:
                setattr(holder, name, new)
                return
    raise RuntimeError(f"cannot hand {transport!r} over: nothing delivers its reads to {old!r}")


@implementer(IHalfCloseableProtocol)
class _Negotiator(Protocol):
    """Speaks to the proxy until it opens the tunnel (or refuses); then steps aside."""

    transport: Any

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt: _Attempt | None = attempt

    def connectionMade(self) -> None:
        attempt = self.attempt
        assert attempt is not None, "connected once, by the attempt that made it"
        attempt.negotiator = self
        self.transport.write(attempt.negotiation.start())

    def dataReceived(self, data: bytes) -> None:
        attempt = self.attempt
        if attempt is None:
            return
        step = attempt.negotiation.feed(data)
        while isinstance(step, Send):
            self.transport.write(step.data)
            step = attempt.negotiation.feed(b"")
        if isinstance(step, Through):
            self.attempt = None
            attempt.through(self, step.rest)
        elif isinstance(step, Refusal):
            self.attempt = None
            self.transport.loseConnection()
            attempt.refused(step.reason)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()
        self._ended()

    def writeConnectionLost(self) -> None:
        """Never asked for: the negotiator does not half-close."""

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._ended()

    def _ended(self) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.refused(attempt.negotiation.closed())


class _NegotiatorFactory(Factory):
    """Builds the negotiator of one attempt (the proxy endpoint connects it)."""

    noisy = False

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _Negotiator(self.attempt)
