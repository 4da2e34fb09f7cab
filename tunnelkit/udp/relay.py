"""The sockets of UDP forwarding: the listening socket, and a connected one per session.

Thin protocols around :class:`~tunnelkit.udp.sessions.SessionTable`: the
listening socket hands each datagram and its sender's address to the
table, and sends the backend's replies back from the listening address;
each session's socket is connected to its backend, so the kernel accepts
only that backend's datagrams on it and reports ICMP port unreachable as
``ECONNREFUSED`` (Twisted's ``connectionRefused``). Datagrams are read
whole (up to 64 KiB, larger than any UDP payload) and sent one ``send``
each.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import base, udp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import DatagramProtocol

from tunnelkit.udp.sessions import Address, Oversized, Session, SessionTable

#: recvfrom's buffer: no UDP payload is larger, so none is ever truncated.
MAX_DATAGRAM = 65536


class BackendProtocol(DatagramProtocol):
    """A session's connected socket towards its backend."""

    #: No "starting on"/"stopping" lines per session: the record says it.
    noisy = False

    def __init__(self, session: Session) -> None:
        self.session = session
        self.closing = False
        #: The port, kept: Twisted forgets ``transport`` before ``stopProtocol``.
        self.port: Any = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.session.from_backend(datagram)

    def connectionRefused(self) -> None:
        """ICMP port unreachable, read as ``ECONNREFUSED`` (reactors that poll for reading)."""
        self.session.refused()

    def stopProtocol(self) -> None:
        """The socket closed: by the session, or by an epoll reactor on the ICMP error.

        An epoll reactor sees the pending ICMP error as ``EPOLLERR`` without
        ``EPOLLIN`` and closes the port as lost, never reading the error; the
        socket is still open here, so ``SO_ERROR`` tells what it was.
        """
        if self.closing:
            return
        error = self.port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error == errno.ECONNREFUSED:
            self.session.refused()
        else:
            self.session.end(f"backend socket lost: {os.strerror(error) if error else 'closed'}")

    def send(self, datagram: bytes) -> None:
        try:
            self.transport.write(datagram)  # type: ignore[union-attr, call-arg]
        except MessageLengthError:
            raise Oversized() from None

    def close(self) -> None:
        self.closing = True
        self.port.stopListening()


class SessionPort(udp.Port):
    """A session's socket: Twisted's UDP port without its two log lines per socket.

    Twisted logs "... starting on PORT" and "(UDP Port PORT Closed)" for
    every UDP port, unconditionally: two lines per DNS query with
    ``--udp-replies 1``, where the session's record says all of it.
    """

    def __init__(self, protocol: BackendProtocol, interface: str, reactor: Any) -> None:
        super().__init__(0, protocol, interface, MAX_DATAGRAM, reactor)  # type: ignore[no-untyped-call]

    def _bindSocket(self) -> None:
        sock = self.createInternetSocket()
        try:
            sock.bind((self.interface, self.port))
        except OSError:
            sock.close()
            raise
        self._realPortNumber = sock.getsockname()[1]
        self.connected = 1
        self.socket = sock
        self.fileno = sock.fileno  # type: ignore[method-assign]

    def connectionLost(self, reason: Any = None) -> None:
        self._realPortNumber = None
        self.maxThroughput = -1
        base.BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno


def backend_opener(reactor: Any) -> Callable[[Session], BackendProtocol]:
    """Opens a session's socket: bound to an ephemeral port, connected to its backend."""

    def open_backend(session: Session) -> BackendProtocol:
        backend = session.backend
        protocol = BackendProtocol(session)
        interface = "::" if ":" in backend.host else ""
        port: Any = SessionPort(protocol, interface, reactor)
        port.startListening()
        protocol.port = port
        try:
            port.connect(backend.host, backend.port)
        except Exception:
            port.stopListening()
            raise
        return protocol

    return open_backend


class ListeningProtocol(DatagramProtocol):
    """A ``udp:`` listening socket: datagrams to the session table, replies back to clients."""

    #: The service's ``listening`` line says it.
    noisy = False

    def __init__(
        self, make_table: Callable[[Callable[[bytes, Address], None]], SessionTable]
    ) -> None:
        self.table = make_table(self.reply)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.table.datagram(datagram, addr)

    def reply(self, datagram: bytes, client: Address) -> None:
        try:
            self.transport.write(datagram, client)  # type: ignore[union-attr]
        except MessageLengthError:
            raise Oversized() from None


class UdpPort:
    """A listening UDP port as the service sees a listener's: its address, and a stop that ends its sessions.

    With ``--workers N`` it holds N sockets bound to the same address with
    ``SO_REUSEPORT``: the supervisor keeps them all open and never reads,
    and worker ``i`` reads socket ``i``. The kernel hashes each client's
    address to one socket of the group, and the group never changes while
    the process runs (a worker that restarts reads the same socket, whose
    datagrams waited meanwhile), so a client's session stays in one worker.
    """

    def __init__(
        self, port: Any, protocol: ListeningProtocol, spares: list[socket.socket] | None = None
    ) -> None:
        self.port = port
        self.protocol = protocol
        #: The sockets of workers 1 to N-1 (worker 0 reads ``port``'s).
        self.spares = spares or []

    def getHost(self) -> IAddress:
        host: IAddress = self.port.getHost()
        return host

    def fileno(self) -> int:
        return int(self.port.fileno())

    def worker_fileno(self, number: int) -> int:
        """The descriptor worker ``number`` reads (see the class docstring)."""
        return self.fileno() if number == 0 else self.spares[number - 1].fileno()

    def stopReading(self) -> None:
        """The supervisor of ``--workers`` reads none of the sockets."""
        self.port.stopReading()

    def startListening(self) -> None:
        """Listening starts when the port is made."""

    def stopListening(self) -> Deferred[None] | None:
        self.protocol.table.end_all("shutdown")
        for spare in self.spares:
            spare.close()
        stopped: Deferred[None] | None = self.port.stopListening()
        return stopped


class UdpEndpoint:
    """``listen(protocol)`` on one UDP address, as :class:`~tunnelkit.app.service.TunnelService` calls it.

    ``workers`` sockets are bound (``SO_REUSEPORT`` when more than one: see :class:`UdpPort`).
    """

    def __init__(self, reactor: Any, interface: str, port: int, workers: int = 1) -> None:
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.workers = workers

    def listen(self, protocol: ListeningProtocol) -> Deferred[UdpPort]:
        try:
            sockets = self._bind()
        except OSError as e:
            return fail(e)
        first = sockets[0]
        try:
            return succeed(
                UdpPort(adopt_udp(self.reactor, first.fileno(), protocol), protocol, sockets[1:])
            )
        finally:
            first.close()  # the port reads a duplicate

    def _bind(self) -> list[socket.socket]:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sockets: list[socket.socket] = []
        port = self.port
        try:
            for _ in range(self.workers):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sockets.append(sock)
                if self.workers > 1:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((self.interface, port))
                sock.setblocking(False)
                port = sock.getsockname()[1]  # port 0: the others take the one given to the first
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return sockets


def adopt_udp(reactor: Any, fd: int, protocol: ListeningProtocol) -> Any:
    """Read the bound UDP socket ``fd`` (a duplicate of it) with ``protocol``."""
    probe = socket.socket(fileno=fd)
    family = probe.family
    probe.detach()
    return reactor.adoptDatagramPort(fd, family, protocol, maxPacketSize=MAX_DATAGRAM)
