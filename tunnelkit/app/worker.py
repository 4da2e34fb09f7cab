"""A worker process of ``--workers N``: ``python -m tunnelkit.app.worker PID FDS OPTIONS...``.

Started by :class:`tunnelkit.app.supervisor.Workers` (process ``PID``) with its
listening sockets at the descriptor numbers ``FDS`` (comma-separated, in ``--listen``
order) and the same plugin options. It builds the same service, adopts the
sockets instead of listening, and writes its log as JSON lines on standard
output for the supervisor to re-publish. SIGTERM/SIGINT drain it as they
would a single process; SIGHUP reloads TLS files and reopens ``--access-log``
(or is ignored). It exits
if its supervisor goes away.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver

log = Logger(namespace="tunnelkit.worker")

#: Seconds between checks that the supervisor is still there.
ORPHAN_CHECK = 1.0


def adopt(reactor: Any, fd: int, factory: Any) -> Any:
    """Accept on the inherited listening socket ``fd`` with ``factory``."""
    probe = socket.socket(fileno=fd)
    family = probe.family
    probe.detach()
    port: Any
    if probe.type == socket.SOCK_DGRAM:
        from tunnelkit.udp.relay import UdpPort, adopt_udp

        port = UdpPort(adopt_udp(reactor, fd, factory), factory)
    elif family == socket.AF_UNIX:
        from tunnelkit.app.shared_port import SharedUNIXPort

        port = SharedUNIXPort.adopt(reactor, fd, factory)
    else:
        port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)  # the port listens on a duplicate
    return port


def main(argv: list[str]) -> None:
    from tunnelkit.cli.plugin import Options

    supervisor = int(argv[0])
    fds = [int(fd) for fd in argv[1].split(",")]
    # The supervisor forwards SIGHUP; with nothing to reload it must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stdout)], redirectStandardIO=False, discardBuffer=True
    )
    # Parsed before the reactor is imported: a worker without TLS loads no TLS stack.
    config = Options()
    config.parseOptions(argv[2:])
    from tunnelkit.cli.plugin import installed_reactor

    reactor = installed_reactor()
    from tunnelkit.app.build import build_service, prepare

    assert config.settings is not None
    service = build_service(prepare(config.settings, reactor, adopting=True))
    for listening, fd in zip(service.listeners, fds, strict=True):
        factory = listening.factory()
        service.add_port(listening, factory, adopt(reactor, fd, factory))
    if service.observer is not None:
        from tunnelkit.admin.workers import answer_scrapes

        answer_scrapes(reactor, service.observer)

    def orphaned() -> None:
        if os.getppid() != supervisor:
            watch.stop()
            reactor.stop()

    watch = LoopingCall(orphaned)
    reactor.callWhenRunning(service.startService)
    reactor.callWhenRunning(
        log.info, "worker ready (pid {pid})", event="worker_ready", pid=os.getpid()
    )
    # Checked at once too: the supervisor may have died while this one started.
    reactor.callWhenRunning(watch.start, ORPHAN_CHECK)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
