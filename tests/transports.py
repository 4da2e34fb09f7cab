"""In-memory transports for protocol tests: no sockets, no reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tunnelkit.config.model import Timeouts
from tunnelkit.relay.factory import TunnelFactory
from tunnelkit.relay.phases import Mode
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.tunnel import TunnelRecord


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records ``loseWriteConnection``."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class MemoryListener:
    """A listener of ``mode`` on a memory reactor: its factory, its records, clients made in memory."""

    def __init__(self, mode: Mode, reactor: MemoryReactorClock) -> None:
        self.records: list[TunnelRecord] = []
        self.registry = TunnelRegistry(reactor, 10)
        self.factory = TunnelFactory(
            mode=mode,
            listener="test",
            registry=self.registry,
            clock=reactor,
            timeouts=Timeouts(idle=None, fin=None),
            read_size=65536,
        )
        self.factory._on_ended = self._ended

    def _ended(self, tunnel: Any, record: TunnelRecord) -> None:
        self.registry.discard(tunnel)
        self.records.append(record)

    def client(self) -> tuple[Any, HalfCloseTransport]:
        """A client accepted and connected: its leg and its transport."""
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "198.51.100.5", 5000))
        leg: Any = self.factory.buildProtocol(transport.getPeer())
        leg.makeConnection(transport)
        return leg, transport
