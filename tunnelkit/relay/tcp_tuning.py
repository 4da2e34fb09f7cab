"""TCP socket options for both legs of a tunnel, set once where they count.

Linux copies a listening socket's options (TCP_NODELAY, SO_KEEPALIVE and its
idle time, SO_SNDBUF, SO_RCVBUF, TCP_MAXSEG) to every socket it accepts, so
the inbound leg is tuned once per listener instead of once per connection.
The outbound leg must be tuned *before* ``connect()``: the MSS is announced in
the SYN and the receive window scale is fixed from SO_RCVBUF at that moment.
Twisted's endpoints create their sockets internally, so :func:`tuned_reactor`
hands them a reactor whose ``connectTCP`` makes pre-tuned sockets; everything
else (name resolution, timers, ``tls:`` wrapping) is the real reactor's.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IConnector
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from zope.interface import directlyProvides, providedBy

from tunnelkit.relay.socket_options import SocketOptions


def _tuned_client_class(options: SocketOptions) -> type[tcp.Client]:
    class TunedClient(tcp.Client):
        """A TCP client transport whose socket is tuned before it connects."""

        def createInternetSocket(self) -> socket.socket:
            sock: socket.socket = super().createInternetSocket()  # type: ignore[no-untyped-call]
            options.apply(sock)
            return sock

    return TunedClient


class _TunedConnector(tcp.Connector):
    client_class: type[tcp.Client] = tcp.Client

    def _makeTransport(self) -> tcp.Client:
        return self.client_class(self.host, self.port, self.bindAddress, self, self.reactor)

    def connectionLost(self, reason: Any) -> None:
        # The connector and its transport point at each other; Twisted leaves
        # the cycle to the garbage collector, with the socket's buffers in it.
        super().connectionLost(reason)
        self.transport = None


class _TunedReactor:
    """The real reactor, except that ``connectTCP`` tunes sockets before connecting.

    It provides every interface the real reactor provides, so
    ``HostnameEndpoint`` and the ``tls:`` parser accept it as they are.
    """

    def __init__(self, reactor: PosixReactorBase, options: SocketOptions) -> None:
        self._reactor = reactor
        self._client_class = _tuned_client_class(options)
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> IConnector:
        # One outbound connection is not worth two "Starting/Stopping factory"
        # log lines (they cost about 40 % of twistd portforward's connect rate).
        factory.noisy = False
        # No connector timeout: every attempt goes through a BackendGroup, whose
        # own deadline cancels it; a second timer per connection is waste.
        connector = _TunedConnector(
            host,
            port,
            factory,
            None,  # type: ignore[arg-type]  # BaseConnector accepts None: no timer
            bindAddress,
            self._reactor,
        )
        connector.client_class = self._client_class
        connector.connect()
        return connector


def tuned_reactor(reactor: Any, options: SocketOptions) -> Any:
    """Return a reactor for outbound endpoints that applies ``options`` pre-connect.

    Reactors that are not socket-based (test doubles) are returned unchanged.
    """
    if isinstance(reactor, PosixReactorBase):
        return _TunedReactor(reactor, options)
    return reactor


def send_with_fin(transport: Any) -> None:
    """Keep what is written to ``transport`` in the kernel until its FIN, to leave in one segment.

    For a backend leg whose client has already sent its FIN: the bytes held
    for it are its last, and sent with their FIN they cannot be split by a
    backend that completes connections with SYN cookies and drops their first
    segments on a full accept queue. Such a backend checks the cookie again
    in the next segment, which passes only if it starts at the first byte: a
    lone FIN behind the dropped bytes fails the check and is answered with a
    reset. ``TCP_CORK`` holds partial segments (at most 200 ms) and the FIN
    (``shutdown`` or ``close``) pushes them out with it; the socket sends
    nothing after its FIN, so the cork is never taken off. The engine sends
    such bytes with ``MSG_MORE`` for the same merge, as HAProxy does before
    a shutdown. Other transports (UNIX, TLS) are left alone: only a plain TCP
    transport's FIN is sure to follow its last bytes at once.
    """
    if isinstance(transport, tcp.Connection):
        sock = transport.socket
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)


#: ``tcpi_state`` (the first byte of ``TCP_INFO``) of a socket whose peer has sent its FIN.
_TCP_CLOSE_WAIT = 8


def peer_sent_fin(transport: Any) -> bool:
    """Whether the peer of a TCP ``transport`` has sent its FIN, read or not.

    Twisted reads a FIN only after the bytes before it, one read later: a
    backend that connects in between would be sent them alone, without
    :func:`send_with_fin`. The kernel knows at once (the socket is in
    ``CLOSE_WAIT``). False for other transports.
    """
    if not isinstance(transport, tcp.Connection):
        return False
    sock = transport.socket
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE_WAIT
