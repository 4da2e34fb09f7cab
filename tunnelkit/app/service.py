"""Listening, and stopping gracefully.

Listening happens when the service is made, before ``twistd`` daemonizes, so a
port already in use is a one-line error and a non-zero exit in the shell that
started it rather than a traceback in a log file. On stop (SIGTERM, SIGINT)
the service stops accepting at once and drains live tunnels (see
:meth:`TunnelRegistry.drain`); ``twistd`` waits for that before it exits.
SIGHUP calls ``on_reload`` (TLS certificates are read again, ``--access-log``
reopened) and never stops the process, even with nothing to reload; the
``reloaded`` line says when it is done (the supervisor of ``--workers`` waits
for each worker's). ``on_stopped`` runs once the drain is over (the last
access-log events are emitted). With a :class:`~tunnelkit.app.systemd.Notifier`
(``NOTIFY_SOCKET``) the service tells systemd when it serves, reloads and
stops.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.config.addresses import wildcard_scope
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.socket_options import SocketOptions
from tunnelkit.relay.tunnel import describe

if TYPE_CHECKING:
    from tunnelkit.admin.observe import Observer
    from tunnelkit.app.systemd import Notifier
    from tunnelkit.engine.driver import NativeRelay

log = Logger(namespace="tunnelkit.service")

#: File descriptors kept back from the tunnel budget for listeners, logs and
#: Twisted's own use (its EMFILE accept guard reserves one).
FD_RESERVE = 64

#: Seconds allowed beyond --drain-timeout for the drain to end and the process to exit.
STOP_MARGIN = 5.0


class ListenError(Exception):
    """A listener could not be started; the message is for the command line."""


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as HAProxy does; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def claim_unix_lock(port: IListeningPort) -> None:
    """Make a ``unix:`` listener's lock file name this process.

    tunnelkit listens before ``twistd`` daemonizes, so that errors reach the
    shell, but Twisted's lock file then holds the pid of the process that
    exits at the fork: the lock looks stale to a second instance, which would
    take the path of a live daemon, and our own unlock on stop would refuse a
    lock that is not ours. The link is replaced atomically (rename), so there
    is no moment without a lock.
    """
    lock = getattr(port, "lockFile", None)
    if lock is None:
        return
    name = os.fsencode(lock.name)
    pid = str(os.getpid()).encode()
    if os.readlink(name) == pid:
        return
    temporary = name + b"." + pid
    os.symlink(pid, temporary)
    os.replace(temporary, name)


def default_max_tunnels(fd_limit: int) -> int:
    """Every tunnel holds two descriptors; keep :data:`FD_RESERVE` for the rest."""
    return max(1, (fd_limit - FD_RESERVE) // 2)


def fd_slots() -> int:
    """The tunnels the descriptor limit has room for now (splice pipes count as tunnels)."""
    return default_max_tunnels(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


@attrs.frozen
class Listening:
    """One endpoint to listen on, and how to serve it."""

    #: The ``listen`` value as written: logs and records name the listener by it.
    name: str
    endpoint: IStreamServerEndpoint
    #: A new factory for a port of this endpoint (a worker makes its own).
    make_factory: Callable[[str], IProtocolFactory]
    socket_options: SocketOptions
    #: The native engine's profile for this listener; ``None``: Twisted serves it.
    profile: Any = None

    def factory(self) -> IProtocolFactory:
        return self.make_factory(self.name)


class Monitor(Protocol):
    """Something that runs while the service does: a listener's health checks, say.

    Started with the service (in each worker, never in the supervisor of
    ``--workers``), stopped as soon as it stops accepting.
    """

    def start(self) -> None: ...

    def stop(self) -> object: ...


class TunnelService(Service):
    """Owns the listening ports and the registry of the tunnels they accept."""

    def __init__(
        self,
        listeners: Sequence[Listening],
        registry: TunnelRegistry,
        drain_timeout: float,
        *,
        reactor: Any = None,
        on_reload: Callable[[], object] | None = None,
        on_stopped: Callable[[], object] | None = None,
        native: NativeRelay | None = None,
        monitors: Sequence[Monitor] = (),
        observer: Observer | None = None,
    ) -> None:
        self.listeners = list(listeners)
        #: What ``--admin`` reads of this service (its listeners' counters and backends).
        self.observer = observer
        self.monitors = list(monitors)
        self.registry = registry
        self.drain_timeout = drain_timeout
        self.ports: list[IListeningPort] = []
        self.factories: list[IProtocolFactory] = []
        self.profiles: list[Any] = []
        self.native = native
        self.reactor = reactor
        self.on_reload = on_reload
        self.on_stopped = on_stopped
        #: ``(profile it started with, index in the engine)`` of each port the engine took.
        self._engine_indexes: list[tuple[Any, int]] = []
        self._previous_sighup: Any = None
        self._handling_sighup = False
        #: systemd's notification socket: set on the process systemd watches.
        self.notifier: Notifier | None = None

    def listen(self) -> None:
        """Start every listener now; raise :class:`ListenError` on the first failure."""
        for listening in self.listeners:
            name = listening.name
            outcome: list[Any] = []
            factory = listening.factory()
            listening.endpoint.listen(factory).addBoth(outcome.append)
            if not outcome:
                raise ListenError(f"listener {name!r} did not start synchronously")
            if isinstance(outcome[0], Failure):
                self._close_ports()
                raise ListenError(f"cannot listen on {name}: {outcome[0].getErrorMessage()}")
            port: IListeningPort = outcome[0]
            self.add_port(listening, factory, port)
            sock = getattr(port, "socket", None)
            if sock is not None:
                try:
                    listening.socket_options.apply(sock)
                except OSError as e:
                    self._close_ports()
                    raise ListenError(f"cannot set socket options on {name}: {e}") from None
            self._handle_sighup()
            bound = port.getHost()
            log.info(
                "listening on {address} ({listener}{scope})",
                event="listening",
                listener=name,
                address=describe(bound),
                scope=wildcard_scope(getattr(bound, "host", None)),
            )

    def add_port(
        self, listening: Listening, factory: IProtocolFactory, port: IListeningPort
    ) -> None:
        """Serve ``port`` (listening, or adopted by a worker) with ``factory``."""
        self.ports.append(port)
        self.factories.append(factory)
        self.profiles.append(listening.profile)

    def _close_ports(self) -> None:
        for port in self.ports:
            port.stopListening()
        self.ports.clear()
        self.factories.clear()
        self.profiles.clear()

    def startService(self) -> None:
        """Runs after ``twistd`` has daemonized: claim the UNIX socket locks."""
        super().startService()  # type: ignore[no-untyped-call]
        for port in self.ports:
            claim_unix_lock(port)
        if self.native is not None:
            # Here, not at listen(): the supervisor of --workers listens but
            # never starts this service, and must not accept.
            served = zip(self.factories, self.ports, self.profiles, strict=True)
            engine = [entry for entry in served if entry[2] is not None]
            indexes = self.native.start(engine)
            self._engine_indexes = [
                (profile, index)
                for (_, _, profile), index in zip(engine, indexes, strict=True)
                if index is not None
            ]
        for monitor in self.monitors:
            monitor.start()
        self._handle_sighup()
        if self.notifier is not None:
            serving = ", ".join(describe(port.getHost()) for port in self.ports)
            self.reactor.callWhenRunning(self.notifier.ready, f"serving {serving}")

    def engine_indexes(self, profile: Any) -> list[int]:
        """The engine's indexes of the ports that started with ``profile`` (one listener's).

        For :meth:`NativeRelay.set_profile`, when the listener's backends change.
        """
        return [index for started, index in self._engine_indexes if started is profile]

    def _handle_sighup(self) -> None:
        """From the first listener on: SIGHUP's default action would end the process."""
        if self.reactor is not None and not self._handling_sighup:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            self._handling_sighup = True

    def _sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between bytecodes: hand the work to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """SIGHUP's work: ``on_reload``, between systemd's RELOADING=1 and READY=1, then ``reloaded``."""
        if self.notifier is not None:
            self.notifier.reloading("reloading (SIGHUP)")
        done = maybeDeferred(self.on_reload) if self.on_reload is not None else succeed(None)
        done.addErrback(lambda f: log.failure("SIGHUP: reload failed", f, event="reload_failed"))
        return done.addCallback(self._reloaded)

    def _reloaded(self, _: object) -> None:
        log.info("SIGHUP: reload done", event="reloaded")
        if self.notifier is not None:
            self.notifier.ready("serving (reloaded)")

    def stopService(self) -> Deferred[None]:
        """Stop accepting, drain (see :meth:`TunnelRegistry.drain`), exit 0.

        ``twistd`` and ``twist`` re-raise the signal that stopped them once
        shutdown is done, so the parent sees "killed by SIGTERM". A drain that
        ran its course is a successful stop, as for nginx and HAProxy, so the
        remembered signal is cleared and the process exits with status 0.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self.notifier is not None:
            self.notifier.stopping(
                f"draining for up to {self.drain_timeout:g} s", self.drain_timeout + STOP_MARGIN
            )
        for monitor in self.monitors:
            monitor.stop()
        if self.native is not None:
            self.native.stop_accepting()
        stopping = [maybeDeferred(port.stopListening) for port in self.ports]
        self.ports.clear()
        self.factories.clear()
        self.profiles.clear()
        done: Deferred[Any] = gatherResults(stopping)
        done.addBoth(lambda _: self.registry.drain(self.drain_timeout))
        done.addCallback(self._forget_exit_signal)
        done.addBoth(self._stopped)
        return done

    def _stopped(self, result: object) -> object:
        # SIGHUP stays handled until the drain is over: logrotate may rotate
        # the access log of a process that is still draining.
        if self._handling_sighup:
            signal.signal(signal.SIGHUP, self._previous_sighup or signal.SIG_DFL)
            self._handling_sighup = False
        if self.on_stopped is not None:
            self.on_stopped()
        return result

    def _forget_exit_signal(self, result: None) -> None:
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None
        return result
