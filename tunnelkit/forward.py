"""Plain forward mode: every client is relayed to the first backend that connects."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tunnelkit.dialer import BackendsUnavailable, Dialed, Dialer
from tunnelkit.registry import TunnelRegistry
from tunnelkit.relay import CloseKind, Leg, Timeouts, Tunnel, TunnelRecord
from tunnelkit.tunnel_log import log_tunnel_closed


class _BackendLegFactory(Factory):
    """Builds the backend leg of one tunnel for each connection attempt."""

    noisy = False

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr: IAddress | None) -> Leg:
        return self.tunnel.backend_leg()


class ForwardFactory(Factory):
    """Accepts clients on one listener and forwards each to a backend."""

    noisy = False

    def __init__(
        self,
        *,
        listener: str,
        dialer: Dialer,
        registry: TunnelRegistry,
        clock: IReactorTime,
        timeouts: Timeouts,
        read_size: int,
    ) -> None:
        self.listener = listener
        self.dialer = dialer
        self.registry = registry
        self.clock = clock
        self.timeouts = timeouts
        self.read_size = read_size

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        """A new client leg, or ``None`` (the port closes the socket) when full."""
        tunnel = Tunnel(self.clock, self.timeouts, self._ended, self.read_size)
        if not self.registry.admit(tunnel):
            return None
        tunnel.on_client_connected = self._open_backend
        return tunnel.client

    def _open_backend(self, tunnel: Tunnel) -> None:
        dialing = self.dialer.dial(_BackendLegFactory(tunnel))
        tunnel.pending = dialing

        def connected(dialed: Dialed) -> None:
            tunnel.backend_name = dialed.backend.name
            leg: Any = dialed.protocol
            tunnel.join(leg)

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, BackendsUnavailable):
                kind = CloseKind.TIMEOUT if error.timed_out else CloseKind.ERROR
                tunnel.fail(f"no backend connected: {error}", kind)
            else:
                tunnel.fail(f"backend connect failed: {failure.getErrorMessage()}")

        dialing.addCallbacks(connected, failed)

    def _ended(self, tunnel: Tunnel, record: TunnelRecord) -> None:
        self.registry.discard(tunnel)
        log_tunnel_closed(record, self.listener)
