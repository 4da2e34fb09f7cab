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
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.config.model import Timeouts
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.tunnel import CloseKind, Side, TunnelRecord

if TYPE_CHECKING:
    from tunnelkit.backends.group import Backend
    from tunnelkit.config.model import ListenerSettings
    from tunnelkit.engine._engine import Record
    from tunnelkit.engine.tls import EngineTLS
    from tunnelkit.relay.factory import TunnelFactory
    from tunnelkit.relay.socket_options import SocketOptions

log = Logger(namespace="tunnelkit.native")

try:
    from tunnelkit.engine import _engine
except ImportError:  # not built (no compiler at install time) or not Linux
    _engine = None  # type: ignore[assignment]

_SIDES = (Side.CLIENT, Side.BACKEND, Side.PROXY)
_KINDS = (CloseKind.FIN, CloseKind.RST, CloseKind.TIMEOUT, CloseKind.ERROR, CloseKind.SHUTDOWN)


def built() -> bool:
    """Whether the C module is there (it is compiled when tunnelkit is installed)."""
    return _engine is not None


def native_backend(backend: Backend) -> tuple[str, str, int] | tuple[str, str] | None:
    """``(name, host, port)`` or ``(name, path)`` for a backend the engine can dial, else ``None``.

    The engine dials IP addresses and UNIX paths; names (resolved per
    connection, happy eyeballs) and TLS stay on the Twisted path.
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
    listener: ListenerSettings, backends: Sequence[Backend], write_through: bool
) -> str | None:
    """Why ``listener`` needs the Twisted path, or ``None`` if the engine can serve it."""
    if _engine is None:
        return (
            "the native engine is not built (no C compiler at install time?"
            " `pip install -v` shows why)"
        )
    tls_why = _tls_unavailable() if listener.tls is not None else None
    reasons = [
        (listener.mode != "forward", f"--mode {listener.mode} reads a request first"),
        (listener.backend_tls is not None, "TLS to backends is relayed by Python"),
        (tls_why is not None, f"TLS is terminated by Python: {tls_why}"),
        (not write_through, "--no-write-through is a diagnostic of the Python path"),
        (
            len(listener.listen) > _engine.MAX_LISTENERS,
            f"it takes at most {_engine.MAX_LISTENERS} listeners",
        ),
        (
            len(backends) > _engine.MAX_BACKENDS,
            f"it takes at most {_engine.MAX_BACKENDS} backends",
        ),
    ]
    reasons += [
        (text.strip().lower().startswith(("ssl:", "tls:")), f"--listen {text!r} is a TLS listener")
        for text in listener.listen
    ]
    reasons += [
        (
            native_backend(b) is None,
            f"--to {b.name!r} is not an IP address or a UNIX path: the engine does not"
            " resolve names (Twisted resolves them per connection)",
        )
        for b in backends
    ]
    return next((why for applies, why in reasons if applies), None)


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

    Each listener it takes (:meth:`start`) keeps its :class:`TunnelFactory`:
    the engine asks that factory's client policy and logs through its access
    log, so records and refusals read the same as on Twisted's path.
    ``fd_slots`` is the tunnels the descriptor limit has room for: the
    engine's splice pipes count as tunnels against it (0: not counted).
    """

    def __init__(self, reactor: Any, *, registry: NativeRegistry, fd_slots: int = 0) -> None:
        self.reactor = reactor
        self.registry = registry
        self.fd_slots = fd_slots
        self.tls: EngineTLS | None = None
        self.engine: Any = None
        self._profile: dict[str, Any] | None = None
        self._factories: list[TunnelFactory] = []
        self._listening: list[int] = []
        self._tick: IDelayedCall | None = None
        self._closed = False
        self._nested = False

    def profile(
        self,
        backends: Sequence[Backend],
        *,
        timeouts: Timeouts,
        connect_timeout: float,
        socket_options: SocketOptions,
        splice: str,
        bulk_read: int,
        log_records: bool,
        restricts_clients: bool,
        tls: EngineTLS | None = None,
    ) -> dict[str, Any]:
        """What the engine needs to serve one listener's tunnels."""
        specs = [spec for spec in map(native_backend, backends) if spec is not None]
        assert len(specs) == len(backends), "why_not_native() was not asked"
        return {
            "specs": specs,
            "timeouts": timeouts,
            "connect_timeout": connect_timeout,
            "options": socket_options,
            "splice": splice,
            "bulk_read": bulk_read,
            "log_records": log_records,
            "restricts_clients": restricts_clients,
            "tls": tls,
        }

    def _make_engine(self, profile: dict[str, Any]) -> None:
        options, timeouts, tls = profile["options"], profile["timeouts"], profile["tls"]
        self.tls = tls
        self._profile = profile
        self.engine = _engine.Engine(
            profile["specs"],
            options.read_size,
            profile["bulk_read"],
            {"off": 0, "auto": 1, "on": 2}[profile["splice"]],
            timeouts.idle or 0.0,
            timeouts.fin or 0.0,
            timeouts.close_grace,
            profile["connect_timeout"],
            half_close=timeouts.half_close,
            max_tunnels=self.registry.max_tunnels,
            log_records=profile["log_records"],
            nodelay=options.nodelay,
            keepalive=-1 if options.keepalive is None else options.keepalive,
            sndbuf=-1 if options.sndbuf is None else options.sndbuf,
            rcvbuf=-1 if options.rcvbuf is None else options.rcvbuf,
            mss=-1 if options.mss is None else options.mss,
            client_check=self._client_allowed if profile["restricts_clients"] else None,
            tls=tls.argument() if tls is not None else None,
            fd_slots=self.fd_slots,
        )
        self.registry.engine = self.engine

    # -- listeners ------------------------------------------------------------

    def start(self, listeners: Sequence[tuple[Any, IListeningPort, dict[str, Any]]]) -> None:
        """Accept on these ``(factory, port, profile)`` triples in the engine from now on.

        Each port stops being read by the reactor; a port the engine cannot
        take (a TLS port) goes on accepting through Twisted and its factory.
        With :attr:`tls`, each factory wraps its mode's in TLS: the engine
        takes the wrapped one and does the TLS itself (a port it cannot
        take still terminates TLS through Twisted).
        """
        if not listeners:
            return
        self._make_engine(listeners[0][2])
        self._nest()
        for factory, port, profile in listeners:
            fd = _port_socket(factory, port)
            if fd is None or profile is not self._profile:
                continue
            mode = factory.wrappedFactory if self.tls is not None else factory
            # Registered first: if that fails, the port still reads through Twisted.
            self.engine.add_listener(fd, len(self._factories))
            port.stopReading()  # type: ignore[attr-defined]
            self._factories.append(mode)
            self._listening.append(fd)

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
        if self.engine is None:  # never started (the supervisor of --workers)
            return
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
        listener, fields, side, kind, why, spliced, tls = record
        factory = self._factories[listener]
        details: dict[str, object] = {"spliced": True} if spliced else {}
        reason = why if tls is None else self._tls_details(tls, kind, why, details)
        closed = TunnelRecord(*fields, _SIDES[side], _KINDS[kind], reason, details)
        factory.tunnel_log(closed, factory.listener)

    def _tls_details(
        self, tls: tuple[Any, bool], kind: int, reason: str, details: dict[str, object]
    ) -> str:
        """Add a TLS tunnel's fields to ``details``; its reason, as Twisted's path words it."""
        from tunnelkit.tls.leg import connection_details, failed_handshake

        connection, handshaken = tls
        if handshaken:
            details.update(connection_details(connection))
            return reason
        assert self.tls is not None
        refused, more = failed_handshake(self.tls.server, connection)
        details.update(more)
        return refused if refused and _KINDS[kind] is CloseKind.ERROR else reason

    def _notice(self, name: str, value: int) -> None:
        if name == "connection_limit":
            self.registry.engine_full()
        elif name == "accept_failed":
            log.warn(
                "out of file descriptors: new clients are accepted and closed at once",
                event="accept_failed",
            )
