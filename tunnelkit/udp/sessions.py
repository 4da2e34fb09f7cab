"""The sessions of one UDP listener: who talks to which backend, until when, and the record.

A session is one client address (on one listening socket) and the backend
chosen for it; its first datagram opens it, and with it a connected socket
towards the backend (:mod:`tunnelkit.udp.relay`). Each datagram is passed
on whole and in order, never merged or split: one ``send`` per datagram.
A session ends after ``idle_timeout`` without a datagram either way, after
``replies`` datagrams from the backend when set, when the backend's host
answers with ICMP port unreachable, or on shutdown; it then logs one
``udp_session_closed`` record. Everything here is driven by a clock and
plain callables, so tests need no sockets.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Protocol, cast

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tunnelkit.backends import balance
from tunnelkit.policy.targets import ClientPolicy
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.tunnel import Tunnel
from tunnelkit.udp.limits import SourceLimits
from tunnelkit.udp.settings import UdpSettings

log = Logger(namespace="tunnelkit.udp")

#: A UDP address as Twisted gives it: (host, port).
Address = tuple[str, int]


class Oversized(Exception):
    """A datagram larger than the path to its destination allows (EMSGSIZE)."""


class BackendSocket(Protocol):
    """A session's socket towards its backend."""

    def send(self, datagram: bytes) -> None:
        """Send one datagram; raise :class:`Oversized`, or ``OSError`` for other failures."""

    def close(self) -> None: ...


@attrs.frozen
class UdpBackend:
    """One ``to`` address of a UDP listener (names are resolved at start)."""

    name: str
    host: str
    port: int
    weight: int = 1
    #: Takes sessions only while every other backend is down (health checks).
    backup: bool = False


class BackendChoice:
    """Spreads sessions over backends with ``--balance``'s strategies (:mod:`tunnelkit.backends.balance`).

    A session counts as one connection of its backend while it lives, so
    least-conn sees sessions; source-hash keeps a client address on one backend.
    Backends the health checks took down are left out, and backups take
    sessions only while no other backend is up.
    """

    def __init__(self, backends: tuple[UdpBackend, ...], strategy: str) -> None:
        self.backends = backends
        self.strategy = balance.strategy(strategy)
        self.loads = [
            balance.Load(b.weight * balance.WEIGHT_SCALE, balance.fnv1a64(b.name.encode()))
            for b in backends
        ]
        #: The backends the health checks took down.
        self.down: set[int] = set()
        self._candidates = self._choose()

    def _choose(self) -> list[int]:
        up = [i for i, b in enumerate(self.backends) if b.weight > 0 and i not in self.down]
        primaries = [i for i in up if not self.backends[i].backup]
        return primaries or up

    def set_up(self, index: int, up: bool) -> None:
        """The health checks' verdict on backend ``index``."""
        (self.down.discard if up else self.down.add)(index)
        self._candidates = self._choose()

    def pick(self, client_host: str) -> int | None:
        """A backend for a new session of ``client_host``; ``None`` when every backend is down."""
        if not self._candidates:
            return None
        index = self.strategy.pick(self.loads, self._candidates, balance.client_key(client_host))
        self.loads[index].active += 1
        return index

    def release(self, index: int) -> None:
        self.loads[index].active -= 1


@attrs.define
class UdpCounters:
    """A UDP listener's counts since start, read without the log (for metrics)."""

    sessions: int = 0
    active: int = 0
    #: Datagrams that opened no session, by reason (``client_policy``,
    #: ``connection_limit``, ``sessions_per_source``, ``session_rate``, ``no_backend``, ``socket``).
    refused: dict[str, int] = attrs.field(factory=dict)
    datagrams_up: int = 0
    datagrams_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    #: Datagrams dropped because the path could not take them (EMSGSIZE).
    oversized: int = 0
    #: Sessions ended by ICMP port unreachable from the backend.
    backend_refused: int = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


@attrs.frozen
class SessionRecord:
    """What ``udp_session_closed`` says of one session (docs/logging.md)."""

    client: str
    backend: str
    backend_address: str
    datagrams_up: int
    bytes_up: int
    datagrams_down: int
    bytes_down: int
    oversized: int
    duration: float
    reason: str


def log_session_closed(record: SessionRecord, listener: str) -> None:
    """The default record sink: one twisted.logger event."""
    log.info(
        "{client} -> {backend} ({backend_address}) after {duration:.3f}s: up {datagrams_up}"
        " datagrams {bytes_up} B, down {datagrams_down} datagrams {bytes_down} B; {reason}",
        event="udp_session_closed",
        listener=listener,
        **attrs.asdict(record),
    )


#: Send errors that lose one datagram (a full buffer), as UDP may, and end nothing.
_LOST = frozenset({errno.EAGAIN, errno.ENOBUFS})


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Session:
    """One client address and its backend; counts both ways and ends once."""

    def __init__(self, table: SessionTable, client: Address, index: int) -> None:
        self.table = table
        self.client = client
        self.index = index
        self.started = table.clock.seconds()
        self.socket: BackendSocket | None = None
        self.up = [0, 0]  # datagrams, bytes
        self.down = [0, 0]
        self.oversized = 0
        self.ended = False
        self._timer: IDelayedCall = table.clock.callLater(
            table.settings.idle_timeout, self.end, "idle timeout"
        )

    @property
    def backend(self) -> UdpBackend:
        return self.table.choice.backends[self.index]

    def from_client(self, datagram: bytes) -> None:
        assert self.socket is not None
        try:
            self.socket.send(datagram)
        except Oversized:
            self._dropped(len(datagram), "to the backend")
            return
        except OSError as e:
            if e.errno not in _LOST:
                self.end(f"send to the backend failed: {e.strerror or e}")
            return
        if not self.ended:  # a send can learn of an ICMP error, which ends the session
            self._count(self.up, datagram, "datagrams_up", "bytes_up")

    def from_backend(self, datagram: bytes) -> None:
        if self.ended:
            return
        try:
            self.table.reply(datagram, self.client)
        except Oversized:
            self._dropped(len(datagram), "to the client")
            return
        except OSError:
            return  # the client's side is the listening socket's: a lost datagram
        self._count(self.down, datagram, "datagrams_down", "bytes_down")
        replies = self.table.settings.replies
        if replies is not None and self.down[0] >= replies:
            self.end(f"{replies} {'reply' if replies == 1 else 'replies'}")

    def refused(self) -> None:
        """ICMP port unreachable from the backend's host: nothing listens there."""
        if not self.ended:
            self.table.counters.backend_refused += 1
            self.end("backend refused (ICMP port unreachable)")

    def abort(self, reason: str) -> None:
        """The registry's drain deadline."""
        self.end(reason)

    def end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self._timer.active():
            self._timer.cancel()
        if self.socket is not None:
            self.socket.close()
        self.table.ended(self, reason)

    def _count(self, way: list[int], datagram: bytes, datagrams: str, size: str) -> None:
        way[0] += 1
        way[1] += len(datagram)
        counters = self.table.counters
        setattr(counters, datagrams, getattr(counters, datagrams) + 1)
        setattr(counters, size, getattr(counters, size) + len(datagram))
        self._timer.reset(self.table.settings.idle_timeout)

    def _dropped(self, size: int, where: str) -> None:
        """One log line per session for its first oversized datagram; every one is counted."""
        self.oversized += 1
        self.table.counters.oversized += 1
        if self.oversized == 1:
            log.warn(
                "{client}: a {size}-byte datagram {where} is larger than the path allows;"
                " dropped (each is counted in the session's record)",
                event="udp_datagram_oversized",
                listener=self.table.listener,
                client=_address(*self.client),
                size=size,
                where=where,
            )

    def record(self, reason: str) -> SessionRecord:
        backend = self.backend
        return SessionRecord(
            client=_address(*self.client),
            backend=backend.name,
            backend_address=_address(backend.host, backend.port),
            datagrams_up=self.up[0],
            bytes_up=self.up[1],
            datagrams_down=self.down[0],
            bytes_down=self.down[1],
            oversized=self.oversized,
            duration=self.table.clock.seconds() - self.started,
            reason=reason,
        )


#: Opens a session's socket towards its backend (a connected UDP socket).
OpenBackend = Callable[[Session], BackendSocket]


class SessionTable:
    """The sessions of one listening socket, by client address: admit, deliver, expire, record."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        settings: UdpSettings,
        choice: BackendChoice,
        open_backend: OpenBackend,
        reply: Callable[[bytes, Address], None],
        registry: TunnelRegistry,
        clients: ClientPolicy,
        listener: str,
        record: Callable[[SessionRecord, str], None] | None = log_session_closed,
        counters: UdpCounters | None = None,
        limits: SourceLimits | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.choice = choice
        self.open_backend = open_backend
        self.reply = reply
        self.registry = registry
        self.clients = clients
        self.listener = listener
        self.record = record
        self.counters = counters if counters is not None else UdpCounters()
        self.limits = limits or SourceLimits(
            clock, settings.sessions_per_source, settings.session_rate
        )
        self.sessions: dict[Address, Session] = {}

    def datagram(self, datagram: bytes, client: Address) -> None:
        """A datagram from ``client``: to its session's backend, opening the session first."""
        session = self.sessions.get(client)
        if session is None:
            session = self._open(client)
            if session is None:
                return
        session.from_client(datagram)

    def _open(self, client: Address) -> Session | None:
        host = client[0]
        why = None if self.clients.allows(host) else "client_policy"
        why = why or self.limits.refusal(host)
        if why is not None:
            self.counters.refuse(why)
            return None
        index = self.choice.pick(host)
        if index is None:
            self.limits.released(host)
            self.counters.refuse("no_backend")
            return None
        session = Session(self, client, index)
        # The registry holds tunnels and sessions alike: it only counts them and calls abort().
        if not self.registry.admit(cast(Tunnel, session)):
            self._forget(session)
            self.counters.refuse("connection_limit")
            return None
        try:
            session.socket = self.open_backend(session)
        except OSError as e:
            self.registry.discard(cast(Tunnel, session))
            self._forget(session)
            self.counters.refuse("socket")
            log.warn(
                "cannot open a socket towards {backend}: {error}",
                event="udp_socket_failed",
                listener=self.listener,
                backend=session.backend.name,
                error=e.strerror or str(e),
            )
            return None
        self.sessions[client] = session
        self.counters.sessions += 1
        self.counters.active += 1
        return session

    def _forget(self, session: Session) -> None:
        """Undo what opening ``session`` took: its pick, its source slot, its timer."""
        session.ended = True
        session._timer.cancel()
        self.choice.release(session.index)
        self.limits.released(session.client[0])

    def ended(self, session: Session, reason: str) -> None:
        del self.sessions[session.client]
        self.counters.active -= 1
        self.choice.release(session.index)
        self.limits.released(session.client[0])
        self.registry.discard(cast(Tunnel, session))
        if self.record is not None:
            self.record(session.record(reason), self.listener)

    def end_all(self, reason: str) -> None:
        """End every session now (the listening socket closes)."""
        for session in list(self.sessions.values()):
            session.end(reason)
