"""The set of live tunnels: the connection limit and the drain on shutdown.

A stranger controls how many connections arrive, so admission is capped (a
refused connection is closed at once by the listening port and counted). On
shutdown the service stops listening, waits for the live tunnels to end by
themselves for up to the drain timeout, then aborts the rest.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tunnelkit.relay.tunnel import Tunnel

log = Logger(namespace="tunnelkit.registry")


class TunnelRegistry:
    """Live tunnels, with a cap on how many may exist at once."""

    def __init__(self, clock: IReactorTime, max_tunnels: int) -> None:
        self.clock = clock
        self.max_tunnels = max_tunnels
        self.active: set[Tunnel] = set()
        self.accepted = 0
        self.refused = 0
        self._empty: list[Deferred[None]] = []
        self._warned_full = False

    def admit(self, tunnel: Tunnel) -> bool:
        """Add ``tunnel`` unless the cap is reached (then log once per burst)."""
        if len(self.active) >= self.max_tunnels:
            self.refused += 1
            self.warn_full()
            return False
        self.accepted += 1
        self.active.add(tunnel)
        return True

    def warn_full(self) -> None:
        """The cap refused a client: say so once per burst."""
        if not self._warned_full:
            self._warned_full = True
            log.warn(
                "connection limit of {max_tunnels} tunnels reached; refusing new clients",
                event="connection_limit",
                max_tunnels=self.max_tunnels,
            )

    def live(self) -> int:
        """How many tunnels are live."""
        return len(self.active)

    def abort_all(self, reason: str) -> None:
        """Cut every live tunnel now (the drain deadline)."""
        for tunnel in list(self.active):
            tunnel.abort(reason)

    def discard(self, tunnel: Tunnel) -> None:
        """Forget an ended tunnel; fire :meth:`wait_empty` waiters when none is left."""
        self.active.discard(tunnel)
        if len(self.active) < self.max_tunnels:
            self._warned_full = False
        self.emptied()

    def emptied(self) -> None:
        """Fire the :meth:`wait_empty` waiters if no tunnel is live."""
        if self._empty and not self.live():
            waiters, self._empty = self._empty, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_empty(self) -> Deferred[None]:
        """A Deferred that fires once no tunnel is live."""
        if not self.live():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._empty.append(waiter)
        return waiter

    def drain(self, timeout: float) -> Deferred[None]:
        """Let live tunnels finish for ``timeout`` seconds, then abort the rest."""
        if not self.live():
            return succeed(None)
        log.info(
            "draining {tunnels} for up to {timeout:g} s",
            event="drain_started",
            count=self.live(),
            tunnels=_tunnels(self.live()),
            timeout=timeout,
        )
        done = self.wait_empty()

        def deadline() -> None:
            log.warn(
                "drain deadline reached; aborting {tunnels}",
                event="drain_deadline",
                count=self.live(),
                tunnels=_tunnels(self.live()),
            )
            self.abort_all(f"shutdown: drain deadline ({timeout:g} s)")

        timer = self.clock.callLater(timeout, deadline)

        def finished(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)


def _tunnels(count: int) -> str:
    """``1 tunnel``, ``2 tunnels``: the count as the log text reads it."""
    return f"{count} tunnel" if count == 1 else f"{count} tunnels"
