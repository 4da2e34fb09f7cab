"""Plain forward mode: every client is relayed to the first backend that connects."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from tunnelkit.backends.dialer import BackendsUnavailable, Dialed, Dialer
from tunnelkit.relay.factory import TunnelFactory
from tunnelkit.relay.tunnel import CloseKind, Leg, Tunnel


class _BackendLegFactory(Factory):
    """Builds the backend leg of one tunnel for each connection attempt.

    A TLS backend's connection keeps this factory (as its wrapper's) while it
    lives, and the tunnel keeps that connection's leg: once the dial is over
    the factory lets go of the tunnel, so that no cycle outlives the tunnel.
    """

    noisy = False

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel: Tunnel | None = tunnel

    def buildProtocol(self, addr: IAddress | None) -> Leg:
        assert self.tunnel is not None, "a backend connected after its dial was over"
        return self.tunnel.backend_leg()

    def dial_over(self, result: _T) -> _T:
        self.tunnel = None
        return result


_T = TypeVar("_T")


def dial_backend(tunnel: Tunnel, dialer: Dialer) -> Deferred[Dialed]:
    """Dial a backend leg for ``tunnel``; the client leaving cancels the attempt.

    A dial that fails (not one the client's leaving cancelled) marks the
    tunnel :attr:`~Tunnel.connect_failed`, for its listener's counters.
    """
    legs = _BackendLegFactory(tunnel)
    dialing = dialer.dial(legs)
    dialing.addBoth(legs.dial_over)
    dialing.addErrback(_connect_failed, tunnel)
    tunnel.pending = dialing
    return dialing


def _connect_failed(failure: Failure, tunnel: Tunnel) -> Failure:
    if not failure.check(CancelledError):
        tunnel.connect_failed = True
    return failure


def join_dialed(tunnel: Tunnel, dialed: Dialed) -> None:
    """Relay between the client and the backend leg that ``dialed`` connected."""
    tunnel.backend_name = tunnel.backend_name or dialed.backend.name
    leg: Any = dialed.protocol
    tunnel.join(leg)


def why_not_connected(failure: Failure) -> tuple[str, CloseKind]:
    """The log reason and close kind for a failed dial."""
    error = failure.value
    if isinstance(error, BackendsUnavailable):
        kind = CloseKind.TIMEOUT if error.timed_out else CloseKind.ERROR
        return f"no backend connected: {error}", kind
    return f"backend connect failed: {failure.getErrorMessage()}", CloseKind.ERROR


class ForwardFactory(TunnelFactory):
    """Accepts clients on one listener and forwards each to a backend."""

    def __init__(self, *, dialer: Dialer, **common: Any) -> None:
        super().__init__(**common)
        self.dialer = dialer

    def start(self, tunnel: Tunnel) -> None:
        def failed(failure: Failure) -> None:
            tunnel.fail(*why_not_connected(failure))

        dial_backend(tunnel, self.dialer).addCallbacks(
            lambda dialed: join_dialed(tunnel, dialed), failed
        )
