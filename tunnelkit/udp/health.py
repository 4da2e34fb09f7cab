"""Health checks of UDP backends: ``health-send`` in one datagram, ``health-expect`` in the reply.

The checks themselves are :class:`tunnelkit.backends.health.HealthChecker`'s
(rise, fall, jitter, timeout, the ``backend_down``/``backend_up`` events):
here a UDP backend's check "connects" a UDP socket to it, sends
``health-send`` as one datagram, and reads the replies as the stream check
reads bytes. ICMP port unreachable fails the check at once (the socket is
lost); a backend that stays silent fails it at the timeout. A UDP backend
says nothing unless asked, so a UDP listener's checks need both
``health-send`` and ``health-expect``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol, Factory, connectionDone
from twisted.internet.protocol import Protocol as StreamProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.backends.group import Backend
from tunnelkit.udp.relay import SessionPort
from tunnelkit.udp.sessions import BackendChoice

log = Logger(namespace="tunnelkit.backends")


class _Datagrams(DatagramProtocol):
    """A check's connected socket: datagrams to the check's protocol, as if they were a stream."""

    noisy = False

    def __init__(self, probe: StreamProtocol) -> None:
        self.probe = probe
        self.port: Any = None
        self.ended = False

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.probe.dataReceived(datagram)

    def connectionRefused(self) -> None:
        self.close(Failure(ConnectionRefusedError("ICMP port unreachable")))

    def stopProtocol(self) -> None:
        # An epoll reactor closes the port on the ICMP error (see tunnelkit.udp.relay).
        self.close(Failure(ConnectionRefusedError("ICMP port unreachable")), closed=True)

    def close(self, reason: Failure, *, closed: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        if not closed:
            self.port.stopListening()
        self.probe.connectionLost(reason)


class _Transport:
    """What the check's protocol writes to and closes: one datagram per write."""

    def __init__(self, datagrams: _Datagrams) -> None:
        self.datagrams = datagrams

    def write(self, data: bytes) -> None:
        self.datagrams.port.write(data)

    def loseConnection(self) -> None:
        self.datagrams.close(Failure(connectionDone))

    abortConnection = loseConnection


class UdpProbeEndpoint:
    """``connect(factory)`` for a health check: a UDP socket connected to one backend."""

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port

    def connect(self, factory: Factory) -> Deferred[StreamProtocol]:
        probe = factory.buildProtocol(None)
        assert isinstance(probe, StreamProtocol)
        datagrams = _Datagrams(probe)
        interface = "::" if ":" in self.host else ""
        try:
            port: Any = SessionPort(datagrams, interface, self.reactor)  # type: ignore[arg-type]
            port.startListening()
            datagrams.port = port
            port.connect(self.host, self.port)
        except OSError as e:
            return fail(e)
        probe.makeConnection(_Transport(datagrams))
        return succeed(probe)


class UdpHealthTarget:
    """A UDP listener's backends as :class:`~tunnelkit.backends.health.HealthChecker` checks them."""

    def __init__(self, choice: BackendChoice, reactor: Any, listener: str) -> None:
        self.choice = choice
        self.clock: IReactorTime = reactor
        self.listener = listener
        self.backends = tuple(
            Backend(b.name, UdpProbeEndpoint(reactor, b.host, b.port), b.weight, b.backup)  # type: ignore[arg-type]
            for b in choice.backends
        )

        #: Failed checks per backend (the admin's metrics do not show UDP listeners yet).
        self.health_failures = [0] * len(self.backends)

    def is_up(self, index: int) -> bool:
        return index not in self.choice.down

    def checked(self, index: int, passed: bool) -> None:
        """A health check of backend ``index`` ended: a failure is counted."""
        self.health_failures[index] += not passed

    def mark(self, index: int, up: bool, reason: str) -> None:
        """Take a backend out of (or back into) the choice for new sessions; live ones go on."""
        self.choice.set_up(index, up)
        (log.info if up else log.warn)(
            "backend {backend} is {state}: {reason}",
            event="backend_up" if up else "backend_down",
            listener=self.listener,
            backend=self.backends[index].name,
            state="up" if up else "down",
            reason=reason,
        )
