"""One timer for the idle timeout of every tunnel, instead of one per tunnel.

A per-tunnel ``DelayedCall`` for a timeout that almost never fires costs
about 800 bytes per idle connection (the call, its arguments, the closure)
and a heap push and pop per tunnel; and while thousands of them are pending,
Twisted never compacts the cancelled connect deadlines either. An
:class:`IdleWatch` holds the joined tunnels in a set and looks at them every
``idle / 16`` seconds: a tunnel that moved no byte for ``idle`` seconds is
closed at most one sixteenth of the timeout late. The set costs a slot per
tunnel; the timer runs only while the set is not empty.

Bytes sent count as movement as bytes read do: a tunnel draining a held
read to a slow reader is not idle, though it reads nothing until the
reader catches up. Relayed bytes that Twisted queues leave in its
``doWrite``; :func:`count_writes` has that method stamp the tunnel's clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

if TYPE_CHECKING:
    from twisted.internet import tcp

    from tunnelkit.relay.tunnel import Tunnel

#: Sweeps per idle period: the worst lateness is ``idle / SLICES``.
SLICES = 16


class IdleWatch:
    """Closes the tunnels that moved no byte for ``idle`` seconds."""

    def __init__(self, clock: IReactorTime, idle: float) -> None:
        self.clock = clock
        self.idle = idle
        self.tick = idle / SLICES
        self.tunnels: set[Tunnel] = set()
        self._timer: IDelayedCall | None = None
        self._next = 0.0

    def add(self, tunnel: Tunnel) -> None:
        """Watch ``tunnel`` from now on (it measures quiet time from ``last_moved``)."""
        self.tunnels.add(tunnel)
        if self._timer is None:
            self._next = self.clock.seconds() + self.tick
            self._timer = self.clock.callLater(self.tick, self._sweep)

    def discard(self, tunnel: Tunnel) -> None:
        """Stop watching ``tunnel``; stop the timer when nothing is left to watch."""
        self.tunnels.discard(tunnel)
        if not self.tunnels and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        now = self.clock.seconds()
        deadline = now - self.idle
        expired = [tunnel for tunnel in self.tunnels if tunnel.last_moved <= deadline]
        self.tunnels.difference_update(expired)
        self._timer = None
        if self.tunnels:
            # Sweeps keep their cadence (the next multiple of the tick from the
            # first) even when the reactor ran this one late.
            self._next += self.tick * (math.floor((now - self._next) / self.tick) + 1)
            self._timer = self.clock.callLater(self._next - now, self._sweep)
        for tunnel in expired:
            tunnel.idle_expired()


_counting_classes: dict[type[tcp.Connection], type] = {}


def _tunnel_of(transport: Any) -> Tunnel | None:
    """The tunnel of a transport's leg (behind the ``_WrappingProtocol`` of Twisted's unix: endpoint)."""
    protocol = transport.protocol
    leg = getattr(protocol, "wrappedProtocol", protocol)
    tunnel: Tunnel | None = getattr(leg, "tunnel", None)
    return tunnel


def _counting_class(kind: type[tcp.Connection]) -> type:
    """``kind`` with a ``doWrite`` that marks its tunnel as moving."""
    counting = _counting_classes.get(kind)
    if counting is not None:
        return counting
    base_write: Callable[[Any], object] = kind.doWrite

    def doWrite(self: Any) -> object:
        tunnel = _tunnel_of(self)
        if tunnel is not None:
            tunnel.last_moved = tunnel.now()
        return base_write(self)

    counting = type(f"Counted{kind.__name__}", (kind,), {"doWrite": doWrite})
    _counting_classes[kind] = counting
    return counting


def count_writes(transport: Any) -> None:
    """Let the bytes Twisted's TCP/UNIX ``transport`` (or the one under a TLS leg) sends from its queue count as its tunnel moving.

    Its class is swapped for a subclass (as :mod:`tunnelkit.relay.splice` does):
    no memory per tunnel, and transports of tunnels without an idle timeout
    pay nothing. ``doWrite`` runs only when Twisted queued bytes.
    """
    from tunnelkit.relay.write_through import has_fast_path

    # A TLS leg's bytes leave through the TCP transport under its TLS protocol.
    if not has_fast_path(transport):
        transport = getattr(transport, "transport", None)
    if transport is not None and has_fast_path(transport):
        transport.__class__ = _counting_class(type(transport))
