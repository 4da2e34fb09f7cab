"""TLS on a client already accepted: ``--mode auto`` terminates TLS once it has seen a ClientHello.

A TLS listener wraps every connection in TLS from its accept
(:class:`~tunnelkit.relay.factory.TunnelFactory` under
:class:`~tunnelkit.tls.transport.RelayTLSFactory`). One port serving SOCKS5,
CONNECT and TLS clients can only tell a TLS client by its first bytes, read
by the client's plain leg; from there, this puts the same TLS layer between
the socket and a new client leg (a :class:`~tunnelkit.tls.leg.HandshakeLeg`,
with its handshake timeout, record details and failure counts), gives it the
bytes already read, and lets the socket's reads go to it. The tunnel,
admitted and counted once at the accept, is the same.
"""

from __future__ import annotations

from collections.abc import Callable

from tunnelkit.relay.tunnel import Tunnel
from tunnelkit.tls.leg import HandshakeLeg
from tunnelkit.tls.server import ServerTLS
from tunnelkit.tls.transport import RelayTLSFactory, RelayTLSProtocol


class TLSUpgrade:
    """Terminates TLS with one listener's certificates on clients it has already read from."""

    def __init__(self, tls: ServerTLS, *, read_size: int, write_through: bool) -> None:
        self.tls = tls
        # The factory RelayTLSProtocol reads its settings from; it builds nothing.
        self.factory = RelayTLSFactory(
            tls, False, None, read_size=read_size, write_through=write_through
        )

    def __call__(self, tunnel: Tunnel, first: bytes, then: Callable[[Tunnel], None]) -> None:
        """Terminate TLS on ``tunnel``'s client, whose ClientHello began with ``first``.

        ``then`` runs with the tunnel once the handshake is done (the phases
        again, over the decrypted stream).
        """
        socket = tunnel.client.transport
        leg = HandshakeLeg(tunnel, self.tls)
        tunnel.client = leg
        tunnel.on_client_connected = then
        protocol = RelayTLSProtocol(self.factory, leg)
        # The socket's reads, EOF and loss go to the TLS layer from now on.
        socket.protocol = protocol
        protocol.makeConnection(socket)
        protocol.dataReceived(first)
