"""``--workers N``: N processes accept on the same listening sockets, one supervises.

One Python process uses one core. With ``--workers N`` the ``twistd`` process
still parses the command line and opens every listener itself, before it
daemonizes (so a port in use is still a one-line error in the shell), but it
never accepts: it starts N worker processes (``python -m tunnelkit.app.worker``)
that inherit the listening descriptors and adopt them
(``reactor.adoptStreamPort``), as nginx's workers share its listeners. The
kernel hands each new connection to one of them.

The supervisor (:class:`Workers`):

* re-publishes every worker's log events in its own log (``--logfile``, the
  JSON observer), each with a ``worker`` field, so the access log and the
  operational events stay one stream (text lines show it after the
  namespace: ``[tunnelkit.tunnel#info worker 1]``) (with ``--access-log`` each worker
  appends its records to that file itself);
* restarts a worker that died, after a pause that grows while workers keep
  dying young (``worker_exited``, ``worker_started``);
* forwards SIGHUP (TLS reload, ``--access-log`` reopen) to every worker; on
  SIGTERM/SIGINT it stops them with SIGTERM, waits while they drain
  (``--drain-timeout`` plus a margin, then SIGKILL) and exits;
* is the process systemd watches: it says READY=1 once every worker is up,
  RELOADING=1 then READY=1 once every worker has logged ``reloaded``, and
  STOPPING=1 (:mod:`tunnelkit.app.systemd`); workers get none of systemd's
  variables.

A worker exits on its own if the supervisor disappears (see
:mod:`tunnelkit.app.worker`), so no orphan keeps serving a port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from tunnelkit.admin.snapshot import Snapshot
from tunnelkit.admin.workers import Channel, Scrapes
from tunnelkit.app.service import STOP_MARGIN, claim_unix_lock
from tunnelkit.app.systemd import Notifier, manager_free

log = Logger(namespace="tunnelkit.workers")

#: Seconds a worker must live to count as healthy (its restart is then immediate).
HEALTHY_AFTER = 10.0
#: The longest pause before restarting a worker that keeps dying young.
MAX_RESTART_DELAY = 30.0
#: A worker's log line longer than this is cut (a worker is ours, but bounded anyway).
MAX_LINE = 1 << 20


def worker_argv(arguments: Sequence[str], fds: Sequence[int]) -> list[str]:
    """The command line of a worker: this Python, this process's pid, the adopted descriptors, the plugin's options.

    ``--workers 1`` comes last so that it wins over the one given.
    """
    return [
        sys.executable,
        "-m",
        "tunnelkit.app.worker",
        str(os.getpid()),
        ",".join(str(fd) for fd in fds),
        *arguments,
        "--workers",
        "1",
    ]


class _WorkerProtocol(ProcessProtocol):
    """One worker process: its JSON log lines become events in the supervisor's log."""

    def __init__(self, supervisor: Workers, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.started = 0.0
        #: Set by the worker's ``worker_ready`` event: its signal handlers are in place.
        self.ready = False
        #: A SIGHUP came while the worker was starting: it gets one once ready.
        self.reload_pending = False
        self.ended: Deferred[None] = Deferred()
        self._partial = b""
        #: Its scrape pipes, with ``--admin``.
        self.scrapes: Channel | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        scrapes = self.supervisor.scrapes
        if scrapes is not None and self.scrapes is not None and childFD == scrapes.answers:
            self.scrapes.received(data)
        else:
            super().childDataReceived(childFD, data)

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b""
        for line in lines:
            self._publish(line.strip(b"\x1e \r"))

    def errReceived(self, data: bytes) -> None:
        # Tracebacks and anything else written outside the logging system.
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.warn(
                    "worker {worker}: {line}", event="worker_stderr", worker=self.number, line=line
                )

    def _publish(self, line: bytes) -> None:
        if not line:
            return
        try:
            event = eventFromJSON(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.warn(
                "worker {worker}: {line!r}", event="worker_output", worker=self.number, line=line
            )
            return
        tag_worker(event, self.number)
        globalLogPublisher(event)
        if event.get("event") == "worker_ready":
            self.ready = True
            if self.reload_pending:
                _signal(self, signal.SIGHUP)
            self.supervisor.worker_ready()
        elif event.get("event") == "reloaded":
            self.supervisor.worker_reloaded(self.number)

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._publish(self._partial)
            self._partial = b""
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


def tag_worker(event: dict[str, Any], number: int) -> None:
    """Mark a worker's event as that worker's: a ``worker`` field, and in text lines its system.

    A text log shows ``[tunnelkit.tunnel#info worker 1]`` where the worker
    itself would show ``[tunnelkit.tunnel#info]`` (twisted.logger prints
    ``log_system`` there when an event has one).
    """
    event["worker"] = number
    level = event.get("log_level")
    system = event.get("log_system") or (
        f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
    )
    event["log_system"] = f"{system} worker {number}"


def _worker_fd(port: IListeningPort, fd: int, number: int) -> int:
    """The descriptor worker ``number`` gets at ``fd``: the port's, or its own socket of a UDP listener (tunnelkit.udp.relay)."""
    own = getattr(port, "worker_fileno", None)
    return fd if own is None else int(own(number))


class Workers(Service):
    """Starts, watches and stops the worker processes (see the module docstring)."""

    def __init__(
        self,
        count: int,
        arguments: Sequence[str],
        ports: Sequence[IListeningPort],
        drain_timeout: float,
        reactor: Any,
        *,
        notifier: Notifier | None = None,
        scraped: bool = False,
    ) -> None:
        self.count = count
        self.arguments = list(arguments)
        self.ports = list(ports)
        self.drain_timeout = drain_timeout
        self.reactor = reactor
        #: The live workers by number; each protocol's ``transport`` is its process.
        self._protocols: dict[int, _WorkerProtocol] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False
        self._previous_sighup: Any = None
        #: systemd's notification socket, if it started us.
        self.notifier = notifier
        #: READY=1 was sent: every worker came up once.
        self._serving = False
        #: The workers whose ``reloaded`` the current reload waits for.
        self._reloading: set[int] = set()
        self.fds = []
        for port in self.ports:
            # The supervisor keeps the socket open but never accepts on it.
            port.stopReading()  # type: ignore[attr-defined]
            self.fds.append(port.fileno())  # type: ignore[attr-defined]
        #: With ``--admin``: the workers' scrape pipes (tunnelkit.admin.workers).
        self.scrapes = Scrapes(reactor, self.fds, count) if scraped else None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for port in self.ports:
            claim_unix_lock(port)
        self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        for number in range(self.count):
            self.start_worker(number)

    def start_worker(self, number: int) -> None:
        """Spawn worker ``number`` with the listening descriptors at the same numbers."""
        if self._stopping:
            return
        protocol = _WorkerProtocol(self, number)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        child_fds.update(
            {
                fd: _worker_fd(port, fd, number)
                for port, fd in zip(self.ports, self.fds, strict=True)
            }
        )
        env = manager_free(os.environ)
        if self.scrapes is not None:
            child_fds.update(self.scrapes.child_fds())
            env.update(self.scrapes.environment())
            protocol.scrapes = Channel(
                self.reactor, partial(_write, protocol, self.scrapes.requests)
            )
        try:
            process = self.reactor.spawnProcess(
                protocol,
                sys.executable,
                worker_argv(self.arguments, self.fds),
                env=env,
                childFDs=child_fds,
            )
        except OSError as e:  # out of processes, memory or descriptors: try again later
            self._restart_later(number, 0.0, f"could not start: {e}")
            return
        protocol.started = self.reactor.seconds()
        self._protocols[number] = protocol
        log.info(
            "worker {worker} started (pid {pid})",
            event="worker_started",
            worker=number,
            pid=process.pid,
        )

    def worker_ended(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        number = protocol.number
        self._protocols.pop(number, None)
        if self.scrapes is not None and protocol.scrapes is not None:
            self.scrapes.retire(protocol.scrapes)
        if self._stopping:
            return
        self.worker_reloaded(number)
        status = "exited normally" if reason.check(ProcessDone) else reason.getErrorMessage()
        self._restart_later(number, self.reactor.seconds() - protocol.started, status)

    def _restart_later(self, number: int, lived: float, status: str) -> None:
        """Start worker ``number`` again: at once if it had lived long, else after a growing pause."""
        delay = 0.0 if lived >= HEALTHY_AFTER else max(1.0, 2 * self._delays.get(number, 0.5))
        self._delays[number] = min(delay, MAX_RESTART_DELAY)
        log.warn(
            "worker {worker} ended ({status}); restarting in {delay:g} s",
            event="worker_exited",
            worker=number,
            status=status,
            delay=self._delays[number],
        )
        self.reactor.callLater(self._delays[number], self.start_worker, number)

    def worker_ready(self) -> None:
        """A worker logged ``worker_ready``: once all are, systemd hears READY=1 (once)."""
        ready = sum(protocol.ready for protocol in self._protocols.values())
        if self.notifier is not None and not self._serving and ready >= self.count:
            self._serving = True
            self.notifier.ready(f"serving with {self.count} workers")

    def worker_reloaded(self, number: int) -> None:
        """Worker ``number`` reloaded (or ended): the reload is done when none is left."""
        if number not in self._reloading:
            return
        self._reloading.discard(number)
        if not self._reloading:
            self._reload_done()

    def _reload_done(self) -> None:
        log.info("SIGHUP: every worker reloaded", event="reloaded")
        if self.notifier is not None:
            self.notifier.ready(f"serving with {self.count} workers (reloaded)")

    def _sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between bytecodes: hand the work to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP to every worker that is ready for it, and to the others once they are.

        One still starting would die of it (the default action), yet it may
        have opened its files before they changed (the access log before
        logrotate renamed it, certificates before their renewal). The
        reload is done when each has logged ``reloaded`` (or ended).
        """
        if self.notifier is not None:
            self.notifier.reloading(f"reloading {len(self._protocols)} workers (SIGHUP)")
        self._reloading = set(self._protocols)
        if not self._reloading:
            self._reload_done()
        for protocol in list(self._protocols.values()):
            if protocol.ready:
                _signal(protocol, signal.SIGHUP)
            else:
                protocol.reload_pending = True

    def accepting(self) -> bool:
        """Started and not stopping (``/healthz``)."""
        return bool(self.running) and not self._stopping

    def snapshot(self) -> Deferred[Snapshot]:
        """Every ready worker's numbers now, added up (``--admin``)."""
        assert self.scrapes is not None
        channels = [
            p.scrapes for p in self._protocols.values() if p.ready and p.scrapes is not None
        ]
        return self.scrapes.snapshot(channels, self.accepting())

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every live worker."""
        for protocol in list(self._protocols.values()):
            _signal(protocol, signum)

    def stopService(self) -> Deferred[None]:
        """SIGTERM every worker, wait for their drains (bounded), then close the listeners."""
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self.notifier is not None:
            self.notifier.stopping(
                f"draining {len(self._protocols)} workers for up to {self.drain_timeout:g} s",
                self.drain_timeout + STOP_MARGIN,
            )
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        ended = [p.ended for p in self._protocols.values()]
        self.signal_all(signal.SIGTERM)
        killer = self.reactor.callLater(
            self.drain_timeout + STOP_MARGIN, self.signal_all, signal.SIGKILL
        )

        def all_ended(result: object) -> Deferred[Any]:
            if killer.active():
                killer.cancel()
            # As TunnelService does: a stop that ran its course exits with status 0.
            if getattr(self.reactor, "_exitSignal", None) is not None:
                self.reactor._exitSignal = None
            # Waited for: a unix: listener removes its socket file and lock then.
            closed: Deferred[Any] = gatherResults(
                [maybeDeferred(port.stopListening) for port in self.ports]
            )
            return closed

        done: Deferred[Any] = gatherResults(ended)
        return done.addCallback(all_ended)


def _write(protocol: _WorkerProtocol, fd: int, data: bytes) -> None:
    # One that ended meanwhile has its processEnded on the way.
    process = protocol.transport
    if process is not None:
        with contextlib.suppress(OSError, ProcessExitedAlready):
            process.writeToChild(fd, data)


def _signal(protocol: _WorkerProtocol, signum: int) -> None:
    # One that ended meanwhile has its processEnded on the way.
    process = protocol.transport
    if process is not None:
        with contextlib.suppress(OSError, ProcessExitedAlready):
            process.signalProcess(signum)
