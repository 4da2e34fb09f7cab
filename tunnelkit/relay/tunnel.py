"""The relay: two connected transports joined into one full-duplex tunnel.

A :class:`Tunnel` owns two :class:`Leg` protocols, the client's and the
backend's. It knows nothing of modes: a mode builds the client leg, opens the
backend however it likes and hands the connected backend leg to
:meth:`Tunnel.join`. From then on the relay promises:

* **Backpressure both ways.** Each transport is the other's streaming
  producer, so a slow reader pauses the fast writer's socket and user-space
  memory stays near two read sizes per direction.
* **Half-close.** Both legs provide ``IHalfCloseableProtocol``: EOF from one
  side becomes ``loseWriteConnection`` on the other, whose reply still flows
  back; the tunnel closes when both directions are done or the fin timer fires.
* **Abortive closes stay abortive.** A reset on one leg aborts the other (RST),
  unless that leg had already finished sending, in which case its data is
  complete and the other side gets a clean close instead.
* **Clean closes stay clean.** A leg closed while its peer may still send
  gets a FIN and is read (what it sends dropped) until it closes too: closing
  a socket with unread input would make the kernel reset it and drop the end
  of what was sent to it. A reader that still reads is not cut by the close
  grace; the record never counts bytes a reset dropped.
* **Nothing left open.** A client that leaves while the backend connect is
  pending cancels it; timers are cancelled when the tunnel ends; each tunnel
  ends exactly once and reports one :class:`TunnelRecord`.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.config.model import Timeouts
from tunnelkit.relay.idle_watch import IdleWatch, count_writes
from tunnelkit.relay.reset_watch import reset_watch
from tunnelkit.relay.send_queue import unsent
from tunnelkit.relay.splice import PipePool, Splicer, start_splicing
from tunnelkit.relay.tcp_tuning import peer_sent_fin, send_with_fin
from tunnelkit.relay.write_through import takes_views, writer_for

if TYPE_CHECKING:
    from tunnelkit.backends.group import Dialed


class Side(enum.Enum):
    """Which end of the tunnel a leg faces."""

    CLIENT = "client"
    BACKEND = "backend"
    PROXY = "proxy"


class CloseKind(enum.Enum):
    """How the tunnel started to close."""

    FIN = "FIN"
    RST = "RST"
    TIMEOUT = "timeout"
    ERROR = "error"
    SHUTDOWN = "shutdown"


@attrs.frozen
class TunnelRecord:
    """What one tunnel did; logged once when it ends (see docs/logging.md)."""

    client: str
    backend: str
    backend_address: str | None
    #: Connect attempts made (0: none, e.g. no backend was available).
    attempts: int = attrs.field(default=0, kw_only=True)
    bytes_up: int
    bytes_down: int
    duration: float
    connect_time: float | None
    closed_by: Side
    close_kind: CloseKind
    reason: str
    details: dict[str, object] = attrs.field(factory=dict)


def describe(address: Any) -> str:
    """``host:port`` (``[v6]:port``) for IP addresses, the path for UNIX ones."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if hasattr(address, "name"):
        # A UNIX peer: its path, empty for the unnamed sockets most clients use.
        name = address.name or ""
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address)


@implementer(IHalfCloseableProtocol)
class Leg(Protocol):
    """One connection of a tunnel; moves what it reads to the other leg.

    Before the tunnel is joined, bytes read here are held, and the leg pauses
    once it holds a read size: memory stays bounded, yet the socket is still
    watched while the backend connects, so a client that resets is noticed at
    once and its pending connect cancelled (a paused socket is not polled at
    all), and its FIN is kept for the backend. Held bytes are written first
    once joined.
    """

    # A TCP/UNIX transport or a TLS wrapper: all provide the producer/consumer
    # and half-close methods the relay calls, which ITransport does not declare.
    transport: Any

    #: True once the tunnel closes while this side may still send: what it
    #: sends is dropped until it closes too (see :meth:`Tunnel.close_leg`).
    lingering = False
    #: True once a TLS client left without completing its handshake (see tunnelkit.tls.leg).
    handshake_failed = False

    def __init__(self, tunnel: Tunnel, side: Side) -> None:
        self.tunnel = tunnel
        self.side = side
        self.received = 0
        self.read_done = False
        self.lost = False
        # Created on first use: most legs never hold anything.
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._forward: Callable[[bytes], None] = self.hold

    def connectionMade(self) -> None:
        self.transport.bufferSize = self.tunnel.read_size
        self.tunnel.leg_connected(self)

    @property
    def address(self) -> str:
        """The peer's address for the log record, ``-`` if never connected.

        Described when asked (once, when the tunnel ends) rather than kept:
        the string would cost every idle tunnel 64 bytes per leg. Twisted's
        transports answer ``getPeer`` from what they kept, also once closed.
        """
        transport = self.transport
        return "-" if transport is None else describe(transport.getPeer())

    def dataReceived(self, data: bytes) -> None:
        if self.lingering:
            return
        self.received += len(data)
        tunnel = self.tunnel
        tunnel.last_moved = tunnel.now()
        self._forward(data)
        pipes = tunnel.pipes
        if pipes is not None and len(data) >= pipes.bulk_read and tunnel.backend:
            # A read of bulk size: worth splicing from now on.
            tunnel.splice()

    def takes_views(self) -> bool:
        """True once what this leg reads is sent on at once by a writer that copies what it keeps.

        A TLS leg may then hand over views of its reused scratch buffer
        instead of a fresh bytes object per read (:mod:`tunnelkit.tls.direct`).
        """
        return takes_views(self._forward)

    def intercept(self, handler: Callable[[bytes], None] | None) -> None:
        """Until the tunnel is joined, give what is read to ``handler`` instead of holding it.

        A mode that must read a request first (CONNECT, SOCKS) parses it here,
        then passes whatever followed the request to :meth:`hold` for the
        backend and calls ``intercept(None)`` to hold what comes next.
        """
        self._forward = handler or self.hold

    def replay(self, data: bytes) -> None:
        """Give ``data``, read earlier, to whoever reads now (a handler, or the hold).

        ``--mode auto`` peeks at a client's first bytes, hands the connection
        to the mode they name, and replays them to that mode's reader.
        """
        if data:
            self._forward(data)

    def hold(self, data: bytes) -> None:
        """Keep ``data`` for the backend (sent first, once joined); pause when a read size is held."""
        if data:
            if self._held is None:
                self._held = []
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size >= self.tunnel.read_size:
                self.transport.pauseProducing()

    def start_forwarding(self, write: Callable[[bytes], None]) -> None:
        """Send what was held, then send everything read from now on to ``write``.

        From here on :attr:`received` counts relayed bytes only: a request a
        mode consumed before the join is not part of the tunnel's traffic.
        """
        self.received = self._held_size
        held, self._held = self._held, None
        for chunk in held or ():
            write(chunk)
        self._held_size = 0
        self._forward = write

    def readConnectionLost(self) -> None:
        # Twisted may report EOF again if the socket is resumed after it: once.
        if not self.read_done:
            self.read_done = True
            self.tunnel.leg_eof(self)

    def writeConnectionLost(self) -> None:
        """Our FIN towards this side has been sent; nothing more to do."""

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost = True
        self.tunnel.leg_lost(self, reason)


class Tunnel:
    """The state of one client-backend pair and the rules that close it.

    ``clock`` drives every timer (a ``Clock`` in tests); ``on_end`` receives the
    :class:`TunnelRecord` exactly once; ``write_through`` sends straight to an
    idle socket (see :mod:`tunnelkit.relay.write_through`); ``client_leg`` makes a
    client leg of another kind (a TLS listener's waits for its handshake);
    ``idle_watch`` is the listener's shared idle timer (by default the tunnel
    gets one of its own); with ``pipes``, a plain tunnel is relayed with
    ``splice(2)`` once joined (``pipes.eager``) or once one of its reads is
    of bulk size (``pipes.bulk_read``; see :mod:`tunnelkit.relay.splice`).
    """

    #: The client's socket while :mod:`tunnelkit.relay.reset_watch` watches it (set on the instance then).
    _reset_fd = -1
    #: True once no backend connected (every attempt failed): set on the instance then.
    connect_failed = False
    #: Connect attempts made (set on the instance by the connect phase).
    attempts = 0
    #: The balanced backend it relays to, until the record phase releases it.
    dialed: Dialed | None = None
    #: The client's address as a trusted proxy's PROXY header said it (set on
    #: the instance then): it stands for the socket's peer in the client
    #: policy, balancing, the record and the PROXY header sent on.
    peer_override: Any = None
    #: The address the client connected to, as that header said it (set with ``peer_override``).
    host_override: Any = None
    #: The client address its listener's per-client limits count this tunnel under
    #: (set on the instance then), released when it ends.
    client_key: str | None = None
    #: Makes the PROXY header written to the backend before any byte of the
    #: client's (``--proxy-protocol``; set on the instance then).
    proxy_header: Callable[[Tunnel], bytes] | None = None

    def __init__(
        self,
        clock: IReactorTime,
        timeouts: Timeouts,
        on_end: Callable[[Tunnel, TunnelRecord], None],
        read_size: int,
        backend_name: str = "",
        *,
        write_through: bool = True,
        client_leg: Callable[[Tunnel], Leg] | None = None,
        idle_watch: IdleWatch | None = None,
        pipes: PipePool | None = None,
    ) -> None:
        self.clock = clock
        self.write_through = write_through
        self.timeouts = timeouts
        self.read_size = read_size
        self.backend_name = backend_name
        self.client = client_leg(self) if client_leg is not None else Leg(self, Side.CLIENT)
        self.backend: Leg | None = None
        self.started = clock.seconds()
        self.last_moved = self.started
        self.connect_time: float | None = None
        self.pending: Deferred[Any] | None = None
        self.on_client_connected: Callable[[Tunnel], None] | None = None
        self._details: dict[str, object] | None = None
        self._on_end = on_end
        self._first: tuple[Side, CloseKind, str] | None = None
        # Created by the first timer armed: idle tunnels have none.
        self._timers: dict[str, IDelayedCall] | None = None
        #: The clock's ``seconds``, read on every chunk relayed (for the idle watch).
        self.now = clock.seconds
        self._ended = False
        if idle_watch is None and timeouts.idle:
            idle_watch = IdleWatch(clock, timeouts.idle)
        self.idle_watch = idle_watch
        self.pipes = pipes
        self.splicer: Splicer | None = None

    @property
    def details(self) -> dict[str, object]:
        """Mode-specific facts for the log record (CONNECT target, user, status; TLS).

        Made on first use: a plain forwarded tunnel has none, and an empty
        dict would cost each idle one 64 bytes.
        """
        if self._details is None:
            self._details = {}
        return self._details

    def client_peer(self) -> Any:
        """The client's address: a trusted proxy's word for it, else the socket's peer."""
        override = self.peer_override
        return override if override is not None else self.client.transport.getPeer()

    # -- set-up ------------------------------------------------------------

    def leg_connected(self, leg: Leg) -> None:
        """A new client: the mode opens its backend (or first reads its request)."""
        if leg is self.client and self.on_client_connected is not None:
            self.on_client_connected(self)

    def backend_leg(self) -> Leg:
        """A fresh backend leg for the mode's outbound connection attempt."""
        return Leg(self, Side.BACKEND)

    def join(self, backend: Leg) -> None:
        """Start relaying between the client leg and a connected backend leg."""
        self.pending = None
        self._forget_reset()
        if self.client.lost:
            backend.transport.loseConnection()
            return
        self.backend = backend
        self.connect_time = self.clock.seconds() - self.started
        client_transport = self.client.transport
        backend_transport = backend.transport
        client_transport.registerProducer(backend_transport, True)
        backend_transport.registerProducer(client_transport, True)
        if self.client.read_done or peer_sent_fin(client_transport):
            # What the client sent is all it will send: with its FIN, in one segment.
            send_with_fin(backend_transport)
        backend.start_forwarding(writer_for(client_transport, self.write_through))
        to_backend = writer_for(backend_transport, self.write_through)
        if self.proxy_header is not None:
            to_backend(self.proxy_header(self))  # before any byte of the client's
        self.client.start_forwarding(to_backend)
        if self.pipes is not None and self.pipes.eager:
            self.splice()
        self.last_moved = self.clock.seconds()
        if self.idle_watch is not None:
            self.idle_watch.add(self)
            count_writes(client_transport)
            count_writes(backend_transport)
        if self.client.read_done:
            self._pass_eof(self.client, backend)
        else:
            client_transport.resumeProducing()

    def splice(self) -> None:
        """Relay with ``splice(2)`` from now on if both legs are plain sockets (tried once)."""
        pipes, self.pipes = self.pipes, None
        if pipes is not None and self.backend is not None:
            self.splicer = start_splicing(pipes, self, self.client, self.backend)

    def fail(self, reason: str, kind: CloseKind = CloseKind.ERROR) -> None:
        """The backend could not be opened: close the client and say why."""
        self.pending = None
        self.note(Side.PROXY, kind, reason)
        if not self.client.lost:
            self.client.transport.loseConnection()

    # -- closing -----------------------------------------------------------

    def _peer(self, leg: Leg) -> Leg | None:
        return self.backend if leg is self.client else self.client

    def note(self, side: Side, kind: CloseKind, reason: str) -> None:
        """Record how the tunnel started to close, unless that is known already."""
        if self._first is None:
            self._first = (side, kind, reason)

    def leg_eof(self, leg: Leg) -> None:
        """EOF from ``leg``: pass it on as a half-close and keep the other way open.

        A client's EOF while its backend is still connecting is passed on
        after the join, behind the bytes it sent first.
        """
        self.note(leg.side, CloseKind.FIN, f"{leg.side.value} sent FIN")
        if leg.lingering:
            # It closes after our FIN: nothing is left unread, so no reset.
            leg.transport.loseConnection()
            return
        peer = self._peer(leg)
        if peer is None and self.pending is not None:
            self._watch_for_reset()
            return
        if peer is None or peer.lost:
            leg.transport.loseConnection()
            return
        self._pass_eof(leg, peer)

    def _watch_for_reset(self) -> None:
        """The client's FIN came while its backend connects: its reset must still end the attempt at once."""
        watch = reset_watch()
        fileno = getattr(self.client.transport, "fileno", None)
        fd = fileno() if watch is not None and fileno is not None else -1
        if watch is not None and fd >= 0:
            self._reset_fd = fd
            watch.watch(fd, self._client_reset)

    def _forget_reset(self) -> None:
        fd = self._reset_fd
        if fd >= 0:
            del self._reset_fd  # back to the class's -1
            watch = reset_watch()
            if watch is not None:
                watch.forget(fd)

    def _client_reset(self) -> None:
        """The client reset after its FIN, its backend still connecting: end the tunnel now."""
        del self._reset_fd
        transport = self.client.transport
        err = transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        # The reset, not the FIN that never reached a backend, is how it ended (as on the engine).
        self._first = None
        self.note(
            Side.CLIENT, CloseKind.RST, f"client reset: {os.strerror(err or errno.ECONNRESET)}"
        )
        transport.abortConnection()

    def _pass_eof(self, leg: Leg, peer: Leg) -> None:
        if peer.read_done or not self.timeouts.half_close:
            # Both directions are done (or --no-half-close ends both at the
            # first EOF): one close sends the FIN, without a shutdown() and
            # its writeConnectionLost event first.
            self._close_both()
            return
        peer_transport = peer.transport
        peer_transport.unregisterProducer()
        peer_transport.loseWriteConnection()
        if self.timeouts.fin:
            self.arm("fin", self.timeouts.fin, self._fin_expired)

    def leg_lost(self, leg: Leg, reason: Failure) -> None:
        """``leg`` is closed: close the other one the same way, then end."""
        if reason.check(ConnectionDone):
            self.note(leg.side, CloseKind.FIN, f"{leg.side.value} closed")
        elif not reason.check(ConnectionAborted):
            if not leg.read_done and self._first is not None and self._first[1] is CloseKind.FIN:
                # A side that had not sent its FIN cut the tunnel short: its
                # reset, not the other side's half-close noted before, ended it.
                self._first = None
            self.note(
                leg.side, CloseKind.RST, f"{leg.side.value} reset: {reason.getErrorMessage()}"
            )
            self._uncount_undelivered(leg)
        if leg is self.client:
            self._forget_reset()
        if leg is self.client and self.pending is not None:
            pending, self.pending = self.pending, None
            self.note(Side.CLIENT, CloseKind.FIN, "client left before the backend connected")
            pending.cancel()
        peer = self._peer(leg)
        if peer is not None and not peer.lost:
            if leg.read_done or reason.check(ConnectionDone):
                self.close_leg(peer)
                self._arm_grace()
            else:
                self._abort_leg(peer)
        if self.pending is None and (peer is None or peer.lost):
            self._end()

    def _close_both(self) -> None:
        for leg in (self.client, self.backend):
            if leg is not None and not leg.lost:
                self.close_leg(leg)
        self._arm_grace()

    def close_leg(self, leg: Leg) -> None:
        """Close ``leg`` once what it is owed is sent, lingering first if it may still send.

        Closing a socket with unread input makes the kernel send an RST and
        drop what it had not sent yet (the end of a reply). So a leg whose EOF
        was not read gets our FIN (``loseWriteConnection``) and is read, what
        it sends dropped, until it closes too (:meth:`leg_eof`), within the
        close grace: the lingering close of nginx and HAProxy.
        """
        transport = leg.transport
        # A registered producer would make Twisted resume it rather than close.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        if leg.read_done:
            transport.loseConnection()
        elif not leg.lingering:
            leg.lingering = True
            transport.loseWriteConnection()
            transport.resumeProducing()

    def _abort_both(self) -> None:
        for leg in (self.client, self.backend):
            if leg is not None and not leg.lost:
                self._abort_leg(leg)

    def _abort_leg(self, leg: Leg) -> None:
        """Reset ``leg``, which drops what it was owed and has not taken."""
        self._uncount_undelivered(leg)
        leg.transport.abortConnection()

    def _uncount_undelivered(self, leg: Leg) -> None:
        """``leg`` is reset: the record stops counting what it was owed and has not taken."""
        peer = self._peer(leg)
        if peer is not None:
            peer.received -= min(peer.received, self._owed(leg))

    def _owed(self, leg: Leg) -> int:
        """Bytes relayed to ``leg`` that its reader has not taken (:mod:`tunnelkit.relay.send_queue`)."""
        splicer = self.splicer
        transport = leg.transport
        return unsent(transport, splicer.held_for(transport) if splicer is not None else 0)

    def _arm_grace(self, owed: int | None = None) -> None:
        self.arm("grace", self.timeouts.close_grace, lambda: self._grace_expired(owed))

    def _grace_expired(self, before: int | None) -> None:
        """The close grace passed: legs whose readers still take bytes get another one.

        A tunnel whose readers took nothing since the last check is reset; one
        owing nothing more (a lingering peer that did not close after our
        FIN) is closed without a reset.
        """
        legs = [leg for leg in (self.client, self.backend) if leg is not None and not leg.lost]
        owed = sum(self._owed(leg) for leg in legs)
        if owed and (before is None or owed < before):
            self._arm_grace(owed)
        elif owed:
            self._abort_both()
        else:
            for leg in legs:
                leg.transport.loseConnection()

    def abort(self, reason: str, kind: CloseKind = CloseKind.SHUTDOWN) -> None:
        """Cut the tunnel now (RST both ways): its data may be incomplete."""
        self.note(Side.PROXY, kind, reason)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        self._abort_both()

    # -- timers ------------------------------------------------------------

    def arm(self, name: str, seconds: float, action: Callable[[], None]) -> None:
        """Call ``action`` in ``seconds`` unless the tunnel ends first (or ``name`` is armed).

        Modes arm their own deadlines here (CONNECT's header timeout), so that
        every timer of a tunnel is cancelled when it ends.
        """
        if self._timers is None:
            self._timers = {}
        timers = self._timers
        if self._ended or name in timers:
            return

        def fire() -> None:
            del timers[name]
            action()

        timers[name] = self.clock.callLater(seconds, fire)

    def disarm(self, name: str) -> None:
        """Cancel the timer ``name`` if it is armed."""
        timer = self._timers.pop(name, None) if self._timers else None
        if timer is not None and timer.active():
            timer.cancel()

    def idle_expired(self) -> None:
        """No byte moved for the idle timeout (the :class:`IdleWatch` says): close both legs."""
        idle = self.timeouts.idle
        self.note(Side.PROXY, CloseKind.TIMEOUT, f"idle timeout ({idle:g} s without data)")
        self._close_both()

    def _fin_expired(self) -> None:
        fin = self.timeouts.fin
        self.note(Side.PROXY, CloseKind.TIMEOUT, f"fin timeout ({fin:g} s half-closed)")
        self._abort_both()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._forget_reset()
        if self.idle_watch is not None:
            self.idle_watch.discard(self)
        for timer in (self._timers or {}).values():
            if timer.active():
                timer.cancel()
        self._timers = None
        if self.splicer is not None:
            self.details["spliced"] = True
            # Also cuts the splicer's link back to the tunnel.
            self.splicer.close()
            self.splicer = None
        side, kind, reason = self._first or (Side.PROXY, CloseKind.ERROR, "unknown")
        backend = self.backend
        self._on_end(
            self,
            TunnelRecord(
                client=self.client.address
                if self.peer_override is None
                else describe(self.peer_override),
                backend=self.backend_name,
                backend_address=backend.address if backend is not None else None,
                # What reached a backend: bytes held for one that never
                # connected were not relayed (the engine leaves them unread).
                bytes_up=self.client.received if backend is not None else 0,
                bytes_down=backend.received if backend is not None else 0,
                duration=self.clock.seconds() - self.started,
                connect_time=self.connect_time,
                closed_by=side,
                close_kind=kind,
                reason=reason,
                details=self._details if self._details is not None else {},
                attempts=self.attempts,
            ),
        )
        # Each leg points at the tunnel and the tunnel at each leg: a cycle
        # that only the garbage collector could free, and with two transports,
        # a connector and their buffers behind it, collecting them cost about
        # 10 % of the CPU of a short connection. A leg hears nothing more once
        # its connection is lost, so the links are cut and all is freed now.
        for leg in (self.client, backend):
            if leg is not None and leg.lost:
                del leg.tunnel
