"""A snapshot of one process, read from its live objects when asked.

Nothing here runs per connection but :meth:`ListenerView.factory`'s record
hook, which feeds the tunnel-duration histogram from the record each tunnel
already produces on either plane (Twisted's factory, or the engine's record
coming back through the driver). The counters are the ones both planes keep
anyway (:class:`~tunnelkit.relay.counters.ListenerCounters`, the backend
groups' states, the engine's ``Pool.states()``): a scrape reads them, it
does not make the process count more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory

from tunnelkit.admin.snapshot import (
    BackendSnapshot,
    DurationHistogram,
    ListenerSnapshot,
    ProcessSnapshot,
    Snapshot,
    durations,
)
from tunnelkit.relay.counters import ListenerCounters

if TYPE_CHECKING:
    from tunnelkit.app.service import TunnelService
    from tunnelkit.backends.group import BackendGroup
    from tunnelkit.relay.factory import TunnelFactory
    from tunnelkit.relay.tunnel import TunnelRecord


class ListenerView:
    """What one listener's snapshot is read from: its factories, engine ports and backend groups.

    ``groups`` are ``(label, group)``: ``""`` for ``to``, the route for an
    SNI route's. ``profile`` is the engine profile the listener started
    with (it names the listener's ports in the engine), ``None`` on Twisted's plane.
    """

    def __init__(
        self,
        name: str,
        groups: Sequence[tuple[str, BackendGroup]],
        profile: Any = None,
        *,
        timed: bool = True,
    ) -> None:
        self.name = name
        self.groups = list(groups)
        self.profile = profile
        self.timed = timed
        self._factories: list[TunnelFactory] = []
        self._histograms: list[DurationHistogram] = []

    def factory(self, make: Callable[[str], IProtocolFactory]) -> Callable[[str], IProtocolFactory]:
        """``make``, keeping each factory it makes (one per port) to read its counters and records."""

        def made(name: str) -> IProtocolFactory:
            outer = make(name)
            # A TLS listener's factory wraps its mode's: the TunnelFactory counts.
            factory: Any = getattr(outer, "wrappedFactory", outer)
            self._factories.append(factory)
            if self.timed:
                factory.tunnel_log = self._timed(factory.tunnel_log)
            return outer

        return made

    def _timed(
        self, log: Callable[[TunnelRecord, str], None]
    ) -> Callable[[TunnelRecord, str], None]:
        histogram = DurationHistogram()
        self._histograms.append(histogram)
        observe = histogram.observe

        def timed(record: TunnelRecord, listener: str) -> None:
            observe(record.duration)
            log(record, listener)

        return timed

    def snapshot(self, service: TunnelService) -> ListenerSnapshot:
        counters = ListenerCounters()
        for factory in self._factories:
            # The engine's ports leave their factory's counts at 0: it counts them itself.
            counters += factory.counters
        native = service.native
        if native is not None and self.profile is not None:
            for index in service.engine_indexes(self.profile):
                counters += native.counters(index)
        return ListenerSnapshot(
            self.name,
            "engine" if self.profile is not None else "twisted",
            counters,
            durations(self._histograms),
            tuple(b for label, group in self.groups for b in backends(label, group)),
        )


def backends(label: str, group: BackendGroup) -> list[BackendSnapshot]:
    """The group's backends now; on the engine's plane its pool says what the engine counts."""
    pool: Any = group.mirror
    engine = pool.states() if pool is not None else None
    now = group.clock.seconds()
    found = []
    for index, state in enumerate(group.states):
        if engine is not None:
            active, _, ejected_for, _, _, connections, failures = engine[index]
            ejected = ejected_for > 0
        else:
            active, connections, failures = (
                state.load.active,
                state.connections,
                state.connect_failures,
            )
            ejected = state.ejected_until > now
        found.append(
            BackendSnapshot(
                name=state.backend.name,
                group=label,
                up=state.up and state.load.weight > 0,
                ejected=ejected,
                active=active,
                weight=state.backend.weight,
                connections=connections,
                connect_failures=failures,
                health_failures=state.health_failures,
            )
        )
    return found


class ProcessSource:
    """The admin endpoint's numbers in a process that serves its own listeners."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def accepting(self) -> bool:
        return self.observer.accepting()

    def snapshot(self) -> Deferred[Snapshot]:
        return succeed(self.observer.snapshot())


class Observer:
    """One process's snapshot: its listeners' views and whether its service accepts."""

    def __init__(self) -> None:
        self.views: list[ListenerView] = []
        self.service: TunnelService | None = None

    def accepting(self) -> bool:
        """Started and not stopped: not draining."""
        return self.service is not None and bool(self.service.running)

    def snapshot(self) -> Snapshot:
        service = self.service
        assert service is not None, "the observer's service is not made yet"
        return Snapshot(
            listening=self.accepting(),
            listeners=tuple(view.snapshot(service) for view in self.views),
            process=usage(service.registry.max_tunnels),
        )


def usage(max_tunnels: int) -> ProcessSnapshot:
    """This process's CPU time, memory and descriptors now (Linux's /proc; 0 where it is missing)."""
    times = os.times()
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        descriptors = len(os.listdir("/proc/self/fd"))
    except OSError:
        resident = descriptors = 0
    return ProcessSnapshot(times.user + times.system, resident, descriptors, max_tunnels)
