"""``ssl:`` listeners: Twisted's endpoint syntax, served by tunnelkit's TLS transport.

A ``--listen ssl:PORT:privateKey=...:certKey=...`` string is parsed by
Twisted into an ``SSL4ServerEndpoint``, whose ``CertificateOptions`` hold
the certificate, key and Twisted's TLS settings. Listening on it as it is
brings two of Twisted's TLS faults into every tunnel:

* **ALPN.** ``CertificateOptions`` puts an ALPN callback on its context
  that answers a client's offer with ``b""`` when the factory names no
  protocols (ours never does). pyOpenSSL hands that to OpenSSL as a chosen
  protocol of length zero, which OpenSSL 3 refuses with an
  ``internal_error`` alert: every client offering ALPN (curl by default,
  browsers) failed its handshake.
* **Half-close.** Twisted's ``TLSMemoryBIOProtocol`` cannot half-close:
  a backend's FIN became a bare TCP FIN to the client (no close_notify),
  and the client's close_notify then raised an ``AttributeError`` inside
  Twisted; a client's close_notify closed the whole tunnel.

So the endpoint's own options are kept (certificate, key, chain, DH
parameters, method) and the connection is served as ``--tls-cert``'s are,
over TCP with :class:`~tunnelkit.tls.transport.RelayTLSFactory`; the ALPN
callback is replaced by one that declines every offer, as RFC 7301 allows
and as a ``--tls-cert`` listener without ``--alpn`` does. It reads
``SSL4ServerEndpoint``'s private attributes (``_reactor``, ``_port``,
``_backlog``, ``_interface``, ``_sslContextFactory``), unchanged since
Twisted 10.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

from tunnelkit.tls.transport import RelayTLSFactory


def _decline_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IStreamServerEndpoint)
class SSLListener:
    """An ``ssl:`` endpoint's port and TLS options, relayed like a ``--tls-cert`` listener."""

    def __init__(self, endpoint: SSL4ServerEndpoint, *, read_size: int, write_through: bool):
        self.tcp = TCP4ServerEndpoint(
            endpoint._reactor, endpoint._port, endpoint._backlog, endpoint._interface
        )
        self.options = endpoint._sslContextFactory
        # getContext makes the context once and every connection reuses it.
        self.options.getContext().set_alpn_select_callback(_decline_alpn)
        self.read_size = read_size
        self.write_through = write_through

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen on the TCP port, with TLS from the endpoint's options around each connection."""
        wrapped = RelayTLSFactory(
            self.options,
            False,
            protocolFactory,
            read_size=self.read_size,
            write_through=self.write_through,
        )
        listening: Deferred[IListeningPort] = self.tcp.listen(wrapped)
        return listening
