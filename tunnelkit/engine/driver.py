"""The native engine: plain forwarding with no Python per connection or per chunk.

On the Twisted path a short connection costs about 165 µs of CPU (accept, a
non-blocking connect, two transports, Deferreds, four closes), against
nginx's 33 µs, and a keep-alive request about 11 µs: the cost is the
interpreter's, spread over many layers. For the common case of plain
forwarding (``--mode forward``, TCP or UNIX listeners, backends given as IP
addresses or UNIX paths, no TLS to backends), :mod:`tunnelkit.engine._engine`, a small C
module, accepts, connects, relays (``splice(2)`` for bulk) and closes the
tunnels itself, with the same rules as :mod:`tunnelkit.relay.tunnel`. It also
terminates TLS (``--tls-cert``) with the connections pyOpenSSL makes
(:mod:`tunnelkit.engine.tls`).

Each listener has a :class:`~tunnelkit.engine._engine.Profile` (its
backends, timeouts, socket options, TLS, logging and client policy; see
:meth:`NativeRelay.profile`), so one engine serves listeners of different
settings, and :meth:`NativeRelay.set_profile` changes a listener's for the
clients that come next. The engine counts per listener
(:meth:`NativeRelay.counters`), without Python per connection.

Python keeps what is configuration or policy: Twisted parses the endpoint
strings and opens the listening sockets (so errors, backlogs, socket
options, ``systemd:`` and ``--workers`` are unchanged), the client policy is
asked through a callable, every tunnel's record comes back for the access
log, and the drain on shutdown is the registry's. On tunnelkit's reactor
the engine does the reactor's waiting (the reactor's epoll descriptor
nested in the engine's, :meth:`NativeRelay.wait`), and comes back to
Python only when Python has work; on another reactor its epoll descriptor
is watched like any socket. One thread, no locks.

``--engine auto`` (the default) uses the engine when the options allow it
and the module is built, ``native`` insists (an error says why it cannot),
``python`` never uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.config.model import Timeouts
from tunnelkit.policy import client_limits
from tunnelkit.relay.counters import ListenerCounters
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.tunnel import CloseKind, Side, TunnelRecord

if TYPE_CHECKING:
    from tunnelkit.backends.group import Backend, BackendGroup
    from tunnelkit.engine._engine import Profile, Record
    from tunnelkit.engine.tls import EngineTLS
    from tunnelkit.policy.client_limits import ClientLimits
    from tunnelkit.relay.factory import TunnelFactory
    from tunnelkit.relay.socket_options import SocketOptions

log = Logger(namespace="tunnelkit.native")

try:
    from tunnelkit.engine import _engine
except ImportError:  # not built (no compiler at install time) or not Linux
    _engine = None  # type: ignore[assignment]

if _engine is not None:
    # The engine's values by name (the relay contract): a name Python does
    # not know fails here, at import, not in a record.
    _SIDES = tuple(map(Side, _engine.SIDES))
    _KINDS = tuple(map(CloseKind, _engine.CLOSE_KINDS))


def built() -> bool:
    """Whether the C module is there (it is compiled when tunnelkit is installed)."""
    return _engine is not None


def listening_sockets() -> int:
    """How many listening sockets one engine takes, across all its listeners."""
    return int(_engine.MAX_LISTENERS) if _engine is not None else 0


def native_backend(backend: Backend) -> tuple[str, str, int] | tuple[str, str] | None:
    """``(name, host, port)`` or ``(name, path)`` for a backend the engine can dial, else ``None``.

    The engine dials IP addresses and UNIX paths (names are resolved at
    start-up into addresses); a name that did not resolve then, and TLS,
    stay on the Twisted path.
    """
    from twisted.internet.endpoints import UNIXClientEndpoint

    from tunnelkit.backends.endpoints import AddressEndpoint

    endpoint = backend.endpoint
    if type(endpoint) is AddressEndpoint:
        # A scoped IPv6 address (fe80::1%eth0) needs the interface index: Twisted's path.
        if "%" in endpoint.host:
            return None
        return (backend.name, endpoint.host, endpoint.port)
    if type(endpoint) is UNIXClientEndpoint:
        path = endpoint._path
        return (backend.name, path) if path.startswith("/") else None
    return None


def why_not_native(
    *,
    mode: str,
    listen: Sequence[str],
    backends: Sequence[Backend],
    terminates_tls: bool,
    backend_tls: bool,
    write_through: bool,
    accepts_proxy_protocol: bool = False,
    via: bool = False,
) -> str | None:
    """Why one listener needs the Twisted path, or ``None`` if the engine can serve it.

    Asked per listener, with its settings: its ``mode``, its ``listen``
    strings, its ``backends``, whether it terminates TLS (the engine does
    when pyOpenSSL lends it OpenSSL) or speaks TLS to its backends, and
    whether its writes go through (``--no-write-through`` is Python's), and
    whether it reaches its backends through an upstream proxy (``--via``).
    """
    if _engine is None:
        return (
            "the native engine is not built (no C compiler at install time?"
            " `pip install -v` shows why)"
        )
    tls_why = _tls_unavailable() if terminates_tls else None
    reasons = [
        (mode != "forward", f"--mode {mode} reads a request first"),
        (via, "--via: Python negotiates with the upstream proxy"),
        (backend_tls, "TLS to backends is relayed by Python"),
        (tls_why is not None, f"TLS is terminated by Python: {tls_why}"),
        (not write_through, "--no-write-through is a diagnostic of the Python path"),
        (accepts_proxy_protocol, "--accept-proxy-protocol reads a PROXY header first"),
        (
            len(listen) > _engine.MAX_LISTENERS,
            f"it takes at most {_engine.MAX_LISTENERS} listeners",
        ),
        (len(backends) > _engine.MAX_BACKENDS, f"it takes at most {_engine.MAX_BACKENDS} backends"),
    ]
    reasons += [
        (text.strip().lower().startswith(("ssl:", "tls:")), f"--listen {text!r} is a TLS listener")
        for text in listen
    ]
    reasons += [
        (
            native_backend(b) is None,
            f"--to {b.name!r} did not resolve at start-up: Twisted resolves it per"
            " connection (the engine dials addresses and UNIX paths)",
        )
        for b in backends
    ]
    return next((why for applies, why in reasons if applies), None)


def _proxy_tlvs() -> Any:
    from tunnelkit.proxy_protocol.tls import tls_tlvs  # a TLS listener has loaded the TLS stack

    return tls_tlvs


def _tls_unavailable() -> str | None:
    from tunnelkit.engine.tls import unavailable

    return unavailable()


def _port_socket(factory: Any, port: IListeningPort) -> int | None:
    """The listening descriptor of a plain TCP or UNIX port serving ``factory`` itself, else ``None``.

    A port whose factory is a wrapper (TLS from an endpoint plugin, say)
    must keep reading through that wrapper.
    """
    from twisted.internet import tcp, unix

    if isinstance(port, unix.Port | tcp.Port) and port.factory is factory:
        fileno: int = port.fileno()
        return fileno
    return None


class NativeRegistry(TunnelRegistry):
    """The registry of an engine's tunnels: it counts and aborts them in C."""

    def __init__(self, clock: Any, max_tunnels: int) -> None:
        super().__init__(clock, max_tunnels)
        self.engine: Any = None

    def live(self) -> int:
        # Tunnels of a listener the engine could not take run on Twisted's
        # path and are counted here too.
        engine = int(self.engine.active) if self.engine is not None else 0
        return engine + super().live()

    def abort_all(self, reason: str) -> None:
        super().abort_all(reason)
        if self.engine is not None:
            self.engine.abort_all(reason)
            # The engine is empty now, and its wait may not come back to say
            # so (nothing else to report without an access log): a drain
            # waiting for it would hang.
            self.emptied()

    def engine_full(self) -> None:
        """The engine refused a client at the cap (it says so once per burst)."""
        self._warned_full = False
        self.warn_full()


@implementer(IReadDescriptor)
class NativeRelay:
    """Drives one :class:`tunnelkit.engine._engine.Engine` from the reactor.

    Each listener it takes (:meth:`start`) keeps its :class:`TunnelFactory`
    and a profile (:meth:`profile`): the engine asks that factory's client
    policy and logs through its access log, so records and refusals read the
    same as on Twisted's path. ``fd_slots`` is the tunnels the descriptor
    limit has room for: the engine's splice pipes count as tunnels against
    it (0: not counted). The cap is the registry's, for the whole process.
    """

    def __init__(self, reactor: Any, *, registry: NativeRegistry, fd_slots: int = 0) -> None:
        self.reactor = reactor
        self.registry = registry
        self._factories: list[TunnelFactory] = []
        self._listening: list[int] = []
        self._tick: IDelayedCall | None = None
        self._closed = False
        self._nested = False
        self.engine: Any = _engine.Engine(max_tunnels=registry.max_tunnels, fd_slots=fd_slots)
        registry.engine = self.engine

    def profile(
        self,
        group: BackendGroup,
        *,
        timeouts: Timeouts,
        connect_timeout: float,
        socket_options: SocketOptions,
        splice: str,
        bulk_read: int,
        log_records: bool,
        restricts_clients: bool,
        tls: EngineTLS | None = None,
        proxy_protocol: int = 0,
        clients: Any = None,
    ) -> Profile:
        """How one listener's tunnels are served, for :meth:`start` or :meth:`set_profile`.

        ``splice`` is ``off``, ``auto`` or ``on``; ``restricts_clients``
        makes the engine ask the listener's factory about each IP client;
        with ``tls`` the listener terminates TLS with that listener's
        certificates (its factory is then the TLS wrapper of its mode's);
        ``proxy_protocol`` (1 or 2) writes a PROXY header to each backend
        before any payload, built in C, with the TLVs of a terminated TLS
        connection asked of Python for version 2 (:mod:`tunnelkit.proxy_protocol.tls`);
        ``clients`` is the listener's per-client limits (:meth:`client_table`).
        """
        options = socket_options
        profile: Profile = _engine.Profile(
            self._pool(group),
            options.read_size,
            bulk_read,
            splice,
            timeouts.idle or 0.0,
            timeouts.fin or 0.0,
            timeouts.close_grace,
            connect_timeout,
            half_close=timeouts.half_close,
            log_records=log_records,
            nodelay=options.nodelay,
            keepalive=-1 if options.keepalive is None else options.keepalive,
            sndbuf=-1 if options.sndbuf is None else options.sndbuf,
            rcvbuf=-1 if options.rcvbuf is None else options.rcvbuf,
            mss=-1 if options.mss is None else options.mss,
            client_check=self._client_allowed if restricts_clients else None,
            tls=tls.argument() if tls is not None else None,
            context=tls,
            proxy_protocol=proxy_protocol,
            proxy_tlvs=_proxy_tlvs() if tls is not None and proxy_protocol == 2 else None,
            clients=clients,
        )
        return profile

    @staticmethod
    def client_table(limits: ClientLimits) -> Any:
        """A listener's per-client limits in C, for each :meth:`profile` made for it (they share its clients)."""
        return _engine.ClientTable(
            max_conn=limits.max_conn,
            rate=limits.rate,
            burst=limits.burst,
            tracked=client_limits.TRACKED,
            log_interval=client_limits.LOG_INTERVAL,
        )

    def _pool(self, group: BackendGroup) -> Any:
        """The engine's copy of ``group``: it picks there, and ``group`` feeds it what Python learns.

        The group's health checks and slow start set the pool's backends up,
        down and their weights (:attr:`BackendGroup.mirror`); the pool's own
        passive ejections are logged by the group, as its own would be. A
        pool made again for new backends (:meth:`BackendGroup.replace`)
        starts from the group's health and weights; its connection counts and
        passive ejections start afresh (the old pool keeps its tunnels').
        """
        specs = [spec for spec in map(native_backend, group.backends) if spec is not None]
        assert len(specs) == len(group.backends), "why_not_native() was not asked"
        balancing = group.balancing
        # This pool's indexes name these states, whatever the group's later backends.
        states = tuple(group.states)
        pool = _engine.Pool(
            specs,
            balance=balancing.strategy,
            weights=[state.load.weight for state in group.states],
            backups=[backend.backup for backend in group.backends],
            max_conn=balancing.max_conn,
            retries=group.attempts - 1,
            eject_after=balancing.eject_after,
            eject_base=balancing.eject_base,
            eject_max=balancing.eject_max,
            on_change=lambda index, up, reason: group.log_change(states[index], up, reason),
        )
        for index, state in enumerate(states):
            if not state.up:
                pool.set(index, up=False)
        group.mirror = pool
        group.close_mirrored = partial(self.engine.close_backend, pool)
        return pool

    # -- listeners ------------------------------------------------------------

    def start(self, listeners: Sequence[tuple[Any, IListeningPort, Profile]]) -> list[int | None]:
        """Accept on these ``(factory, port, profile)`` listeners in the engine from now on.

        Returns each listener's index in the engine (for :meth:`counters`
        and :meth:`set_profile`), or ``None`` for a port the engine cannot
        take (a TLS port): that one goes on accepting through Twisted and its
        factory. Each port taken stops being read by the reactor. With a TLS
        profile, the factory wraps its mode's in TLS: the engine takes the
        wrapped one and does the TLS itself.
        """
        self._nest()
        indexes: list[int | None] = []
        for factory, port, profile in listeners:
            fd = _port_socket(factory, port)
            if fd is None:
                indexes.append(None)
                continue
            mode = factory.wrappedFactory if profile.context is not None else factory
            index = len(self._factories)
            # Registered first: if that fails, the port still reads through Twisted.
            self.engine.add_listener(fd, index, profile)
            port.stopReading()  # type: ignore[attr-defined]
            self._factories.append(mode)
            self._listening.append(fd)
            indexes.append(index)
        return indexes

    def set_profile(self, index: int, profile: Profile) -> None:
        """Serve listener ``index``'s new clients with ``profile``; live tunnels keep theirs."""
        self.engine.set_profile(index, profile)

    def counters(self, index: int) -> ListenerCounters:
        """Listener ``index``'s counts (see :class:`ListenerCounters`), also after :meth:`close`."""
        return ListenerCounters(
            **dict(zip(_engine.COUNTERS, self.engine.counters(index), strict=True))
        )

    def stop_accepting(self) -> None:
        """Stop accepting (before the ports close their sockets); tunnels go on."""
        for fd in self._listening:
            self.engine.remove_listener(fd)
        self._listening.clear()

    def _client_allowed(self, host: str, port: int, listener: int) -> bool:
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        return self._factories[listener].client_allowed(address)

    # -- the reactor's side ---------------------------------------------------

    def fileno(self) -> int:
        fileno: int = self.engine.fileno()
        return fileno

    def _nest(self) -> None:
        """Have the reactor wait in the engine (:meth:`wait`) if it can, else watch the engine's descriptor.

        A reactor waits in one engine at most: another relay in the same
        process (a second service) is watched as a reader.
        """
        nest = getattr(self.reactor, "nest_engine", None)
        fileno = nest(self.wait) if nest is not None else None
        if nest is not None and fileno is not None:
            try:
                self.engine.nest(fileno)
            except OSError:
                log.failure("the reactor cannot wait in the native engine")
                nest(None)
            else:
                self._nested = True
                return
        self.reactor.addReader(self)

    def wait(self, timeout: float | None) -> bool:
        """The reactor's wait: up to ``timeout`` s for events, handled in C; whether the reactor's are ready."""
        try:
            todo = self.engine.wait(timeout)
            if todo & 1:
                self._report()
        except Exception:
            log.failure("the native engine failed to handle its events")
            todo = 2
        # The engine sweeps its own timers while it waits: no tick to schedule.
        if not self.engine.active:
            self.registry.emptied()
        return bool(todo & 2)

    def doRead(self) -> None:
        """Some of the engine's sockets are ready: handle them all in C.

        Nothing may escape: the reactor would stop watching the engine, and
        every listener and tunnel with it.
        """
        try:
            if self.engine.run():
                self._report()
        except Exception:
            log.failure("the native engine failed to handle its events")
        self._after()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor stopped watching the engine: only :meth:`close` should do that."""
        if not self._closed:
            log.critical(
                "the native engine is no longer watched: {reason}",
                event="engine_lost",
                reason=reason.getErrorMessage(),
            )

    def logPrefix(self) -> str:
        return "tunnelkit-engine"

    def close(self) -> None:
        """Reset what is left, log it, and let the descriptors go."""
        self._closed = True
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        self.stop_accepting()
        if self._nested:
            self._nested = False
            self.reactor.nest_engine(None)
        else:
            self.reactor.removeReader(self)
        self.engine.abort_all("shutdown")
        self._report()
        self.engine.close()

    def _timers(self) -> None:
        self._tick = None
        if self.engine.tick():
            self._report()
        self._after()

    def _after(self) -> None:
        if self.engine.active:
            if self._tick is None:
                self._tick = self.reactor.callLater(_engine.TICK, self._timers)
        else:
            self.registry.emptied()

    def _report(self) -> None:
        """Log the engine's notices and records; a record that fails to log costs only itself."""
        notices = self.engine.take_notices()
        for notice in notices:
            self._notice(*notice)
        records: Sequence[Record] = self.engine.take_records()
        for record in records:
            try:
                self._log_record(record)
            except Exception:
                log.failure(
                    "a tunnel record of the native engine could not be logged",
                    event="record_failed",
                )

    def _log_record(self, record: Record) -> None:
        """Log a record of the engine, named by ``RECORD_FIELDS``, as a :class:`TunnelRecord`."""
        fields: dict[str, Any] = dict(zip(_engine.RECORD_FIELDS, record, strict=True))
        factory = self._factories[fields.pop("listener")]
        details: dict[str, object] = {"spliced": True} if fields.pop("spliced") else {}
        tls, profile = fields.pop("tls"), fields.pop("profile")
        fields["closed_by"] = _SIDES[fields["closed_by"]]
        kind = fields["close_kind"] = _KINDS[fields["close_kind"]]
        if tls is not None:
            fields["reason"] = _tls_details(profile.context, tls, kind, fields["reason"], details)
        factory.tunnel_log(TunnelRecord(**fields, details=details), factory.listener)

    def _notice(self, name: str, *values: Any) -> None:
        """A notice of the engine, said in the log once per burst (per client, for its limits)."""
        if name == "client_limited":
            index, client, refusal, table, refused = values
            limits = client_limits.ClientLimits(*table.limits)
            listener = self._factories[index].listener
            client_limits.log_limited(listener, client, refusal, limits, refused)
        elif name == "connection_limit":
            self.registry.engine_full()
        elif name == "accept_failed":
            log.warn(
                "out of file descriptors: new clients are accepted and closed at once",
                event="accept_failed",
            )


def _tls_details(
    tls: EngineTLS,
    connection: tuple[Any, bool],
    kind: CloseKind,
    reason: str,
    details: dict[str, object],
) -> str:
    """Add a TLS tunnel's fields to ``details``; its reason, as Twisted's path words it.

    ``tls`` is the listener's when the tunnel began: its profile's context.
    """
    from tunnelkit.tls.leg import connection_details, failed_handshake

    ssl, handshaken = connection
    if handshaken:
        details.update(connection_details(ssl))
        return reason
    refused, more = failed_handshake(tls.server, ssl)
    details.update(more)
    return refused if refused and kind is CloseKind.ERROR else reason
