"""Client endpoints for backends given as a host and port: direct for an address, resolving for a name."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IProtocol,
    IProtocolFactory,
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
    backend group's (:mod:`tunnelkit.backends.group`).
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
