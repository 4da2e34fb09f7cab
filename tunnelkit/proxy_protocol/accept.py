"""``--accept-proxy-protocol``: read a trusted proxy's PROXY header before the mode speaks.

Only ``--trusted-proxies`` may connect to such a listener (the factory
refuses anyone else at admission: a header from them is never read, let
alone believed; UNIX peers pass, as file modes guard them). From a trusted
proxy the header is required, first, whole within the listener's header
deadline (shared with what the mode reads next: :func:`time_left`), and
strictly valid (:mod:`.parse`); on a listener that terminates TLS it is read
in clear before the handshake. The client address it carries then stands
for the socket's: the client policy and the per-client limits
(:mod:`tunnelkit.policy.client_limits`) are applied to it here, and balancing,
the record and an onward PROXY header use it (``Tunnel.peer_override``, and
the destination it carries ``Tunnel.host_override``, as HAProxy passes both on);
the record keeps the proxy's own address as ``proxied_by``. A ``LOCAL``
header (the proxy's health check) or one without an IP address leaves the
socket's address in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress

from tunnelkit.proxy_protocol.build import Address
from tunnelkit.proxy_protocol.parse import HeaderError, HeaderReader, ProxyHeader
from tunnelkit.relay.phases import Refused, time_left
from tunnelkit.relay.tunnel import CloseKind, Leg, Side, Tunnel


class AcceptProxyHeader:
    """Reads each client's header: as a listener's preamble, or before its TLS handshake.

    ``client_allowed`` is the listener's client policy (the factory's, which
    logs a refusal), asked of the address the header carries. A plain
    listener reads the header as its :data:`~tunnelkit.relay.phases.Preamble`
    (``__call__``); a listener that terminates TLS reads it in clear before
    the handshake, as HAProxy's ``accept-proxy`` on an ``ssl`` bind does
    (:meth:`before_tls`), so a refused client gets no handshake at all.
    """

    def __init__(
        self,
        header_timeout: float,
        client_allowed: Callable[[IAddress], bool],
        limit: Callable[[Tunnel], Refused | None] | None = None,
    ) -> None:
        self.header_timeout = header_timeout
        self.client_allowed = client_allowed
        #: The listener's per-client limits, asked of the tunnel once its client is the carried one.
        self.limit = limit

    def __call__(self, tunnel: Tunnel) -> Deferred[None]:
        return _Preamble(self, tunnel).done

    def before_tls(self, leg: Leg) -> Callable[[bytes], bytes | None]:
        """The reader of a TLS client leg's raw bytes: ``None`` while it reads, then what follows."""
        return _BeforeTLS(self, leg.tunnel).received


class _Reading:
    """One client's header being read, under the listener's header deadline."""

    def __init__(self, accept: AcceptProxyHeader, tunnel: Tunnel) -> None:
        self.accept = accept
        self.tunnel = tunnel
        self.reader = HeaderReader()
        tunnel.arm("header", time_left(tunnel, accept.header_timeout), self.timed_out)

    def read(self, data: bytes) -> tuple[bool, Refused | None]:
        """Whether the header is over, and the refusal it ended in, if any."""
        try:
            header = self.reader.feed(data)
        except HeaderError as e:
            return True, Refused(f"bad PROXY header: {e}", CloseKind.ERROR, status=400)
        if header is None:
            return False, None
        self.tunnel.disarm("header")
        return True, self.believe(header)

    def believe(self, header: ProxyHeader) -> Refused | None:
        """Stand the header's client address for the socket's, if the client policy lets it in."""
        if header.source is None:
            return None
        carried, host = (_address(pair) for pair in (header.source, header.destination))
        tunnel = self.tunnel
        tunnel.details["proxied_by"] = tunnel.client.address
        tunnel.peer_override, tunnel.host_override = carried, host
        if not self.accept.client_allowed(carried):
            return Refused("client refused by the client policy", CloseKind.ERROR, status=403)
        return self.accept.limit(tunnel) if self.accept.limit is not None else None

    def timed_out(self) -> None:
        timeout = self.accept.header_timeout
        self.refuse(Refused(f"PROXY header timeout ({timeout:g} s)", CloseKind.TIMEOUT, status=408))

    def refuse(self, refused: Refused) -> None:
        raise NotImplementedError


class _Preamble(_Reading):
    """A plain client's header: read through the client leg, then its mode reads on."""

    def __init__(self, accept: AcceptProxyHeader, tunnel: Tunnel) -> None:
        super().__init__(accept, tunnel)
        self.done: Deferred[None] = Deferred()
        tunnel.client.intercept(self.received)

    def received(self, data: bytes) -> None:
        over, refused = self.read(data)
        if not over:
            return
        if refused is not None:
            self.refuse(refused)
            return
        self.tunnel.client.intercept(None)
        self.done.callback(None)
        # The mode's identify has begun to read (or holds for the backend): what followed is its.
        self.tunnel.client.replay(self.reader.rest)

    def refuse(self, refused: Refused) -> None:
        self.tunnel.disarm("header")
        self.tunnel.client.intercept(None)
        self.done.errback(refused)  # the mode answers, the tunnel ends with the reason


class _BeforeTLS(_Reading):
    """A TLS client's header, read in clear before the handshake; what follows is TLS's."""

    def received(self, data: bytes) -> bytes | None:
        over, refused = self.read(data)
        if not over:
            return None
        if refused is not None:
            self.refuse(refused)
            return None
        return self.reader.rest

    def refuse(self, refused: Refused) -> None:
        """Close before any handshake: the record says why (the first reason noted stands)."""
        tunnel = self.tunnel
        tunnel.disarm("header")
        tunnel.note(Side.PROXY, refused.kind, refused.reason)
        tunnel.client.transport.abortConnection()


def _address(pair: Address | None) -> Any:
    """A header's ``(host, port)`` as Twisted's address of a TCP peer."""
    assert pair is not None  # a header with a source has a destination
    host, port = pair
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
