"""``--proxy-protocol v1|v2`` on Twisted's plane: the header each backend gets first.

:class:`Tunnel.join <tunnelkit.relay.tunnel.Tunnel.join>` writes what
:class:`HeaderSender` makes before the first byte of the client's (and
before what was held while the backend connected), on the backend's plain
socket. The engine writes the same bytes itself (``driver.NativeRelay.profile``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport

from tunnelkit.proxy_protocol.build import Address, header
from tunnelkit.relay.tunnel import Tunnel


def address_of(address: Any) -> Address | None:
    """``(host, port)`` of an IP address; ``None`` for others (a UNIX peer)."""
    if isinstance(address, IPv4Address | IPv6Address):
        return address.host, address.port
    return None


class HeaderSender:
    """Makes a tunnel's header: the client (or what a trusted proxy said of it), and where it connected."""

    __slots__ = ("version",)

    def __init__(self, version: int) -> None:
        self.version = version

    def __call__(self, tunnel: Tunnel) -> bytes:
        transport = tunnel.client.transport
        source = address_of(tunnel.client_peer())
        host = tunnel.host_override
        destination = address_of(host if host is not None else transport.getHost())
        tlvs = b""
        if self.version == 2 and ISSLTransport.providedBy(transport):
            from tunnelkit.proxy_protocol.tls import tls_tlvs  # the TLS stack is loaded already

            tlvs = tls_tlvs(transport.getHandle())  # type: ignore[attr-defined]
        return header(self.version, source, destination, (tlvs,))
