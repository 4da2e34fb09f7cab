"""What the admin endpoint shows, as plain data: one process's view, or the sum of its workers'.

A :class:`Snapshot` is read from the live objects at request time (no
counting of its own per connection), crosses the pipe from a worker to its
supervisor as JSON, and is added up there (:func:`merge`), so ``/metrics``,
``/readyz`` and ``/status`` say the same on one process and on N.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from tunnelkit.relay.counters import ListenerCounters

#: The upper bounds (seconds) of the tunnel-duration histogram's buckets; one more counts the rest.
#: From a refused connect (milliseconds) to a long-lived tunnel (an hour and more).
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class DurationHistogram:
    """How long a listener's tunnels lasted: a count per bucket of :data:`DURATION_BUCKETS` and the sum.

    Fed with each tunnel's record as it ends (both planes produce one):
    a bisect and two additions per tunnel.
    """

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds


@attrs.frozen
class BackendSnapshot:
    """One backend of one of a listener's groups, now."""

    name: str
    #: Which of the listener's groups: ``""`` for ``to``, else the SNI route (as written).
    group: str
    #: As the health checks last said (and its weight is above 0): it may take clients.
    up: bool
    #: Passively ejected after failed connects (it still takes clients when no other can).
    ejected: bool
    #: Its connections now: tunnels and connects in flight.
    active: int
    weight: int
    #: Connects that succeeded and failed since start (of this set of backends).
    connections: int
    connect_failures: int
    #: Health checks that failed since start.
    health_failures: int


@attrs.frozen
class DurationSnapshot:
    """A :class:`DurationHistogram`'s counts (per bucket, not cumulative) and sum."""

    counts: tuple[int, ...] = (0,) * (len(DURATION_BUCKETS) + 1)
    sum: float = 0.0

    def __add__(self, other: DurationSnapshot) -> DurationSnapshot:
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return DurationSnapshot(counts, self.sum + other.sum)


@attrs.frozen
class ListenerSnapshot:
    """One listener (all its ``listen`` endpoints together), now."""

    name: str
    #: Who relays its tunnels: ``engine`` or ``twisted``.
    plane: str
    counters: ListenerCounters
    durations: DurationSnapshot
    backends: tuple[BackendSnapshot, ...]

    @property
    def ready(self) -> bool:
        """A listener with backends needs one up; a proxy without ``to`` is ready while listening."""
        return not self.backends or any(backend.up for backend in self.backends)


@attrs.frozen
class ProcessSnapshot:
    """What the processes relaying the tunnels use (the workers', added up)."""

    #: CPU time, user and system, since each started.
    cpu_seconds: float = 0.0
    resident_bytes: int = 0
    open_fds: int = 0
    #: The most tunnels at once: ``--max-connections``, or what the descriptor limit allows.
    max_tunnels: int = 0

    def __add__(self, other: ProcessSnapshot) -> ProcessSnapshot:
        mine, theirs = attrs.astuple(self), attrs.astuple(other)
        return ProcessSnapshot(*(a + b for a, b in zip(mine, theirs, strict=True)))


@attrs.frozen
class Snapshot:
    """The whole process (or every worker) now."""

    #: Accepting: started and not draining.
    listening: bool
    listeners: tuple[ListenerSnapshot, ...]
    #: Processes that answered, and that should have (``--workers N``; 1 without).
    processes: int = 1
    expected: int = 1
    process: ProcessSnapshot = ProcessSnapshot()

    @property
    def ready(self) -> bool:
        return (
            self.listening
            and self.processes == self.expected
            and all(listener.ready for listener in self.listeners)
        )

    def unready(self) -> list[str]:
        """Why :attr:`ready` is false, one reason a line (empty when ready)."""
        reasons = [] if self.listening else ["draining"]
        if self.processes < self.expected:
            reasons.append(f"{self.processes} of {self.expected} workers answered")
        reasons += [
            f"listener {listener.name}: no backend is up"
            for listener in self.listeners
            if not listener.ready
        ]
        return reasons

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self) | {"ready": self.ready}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        """Made again from :meth:`to_json` (a worker's answer to its supervisor)."""
        listeners = tuple(
            ListenerSnapshot(
                listener["name"],
                listener["plane"],
                ListenerCounters(**listener["counters"]),
                DurationSnapshot(
                    tuple(listener["durations"]["counts"]), listener["durations"]["sum"]
                ),
                tuple(BackendSnapshot(**backend) for backend in listener["backends"]),
            )
            for listener in data["listeners"]
        )
        return cls(
            data["listening"],
            listeners,
            data["processes"],
            data["expected"],
            ProcessSnapshot(**data["process"]),
        )


def retired(snapshot: Snapshot) -> Snapshot:
    """What a worker that ended leaves behind: its counts, without what was live (active, health).

    Added to the supervisor's sums so that its counters never go back when
    a worker is restarted (Prometheus would read that as a reset).
    """
    listeners = tuple(
        attrs.evolve(
            listener,
            counters=attrs.evolve(listener.counters, active=0),
            # Neutral in a merge: the live workers say whether a backend is up.
            backends=tuple(
                attrs.evolve(b, active=0, up=True, ejected=False) for b in listener.backends
            ),
        )
        for listener in snapshot.listeners
    )
    # Its CPU time was spent; its memory, descriptors and room for tunnels are gone.
    process = ProcessSnapshot(cpu_seconds=snapshot.process.cpu_seconds)
    return attrs.evolve(snapshot, listeners=listeners, processes=0, expected=0, process=process)


def merge(snapshots: Sequence[Snapshot], *, listening: bool, expected: int) -> Snapshot:
    """The workers' snapshots added up, listener by listener and backend by backend.

    Counts and live tunnels add up; a backend is up only if every worker
    that checks it says so (each worker runs its own health checks), and
    ejected if one of them ejected it.
    """
    listeners: dict[str, ListenerSnapshot] = {}
    for snapshot in snapshots:
        for listener in snapshot.listeners:
            seen = listeners.get(listener.name)
            listeners[listener.name] = listener if seen is None else _add(seen, listener)
    processes = sum(snapshot.processes for snapshot in snapshots)
    used = sum((snapshot.process for snapshot in snapshots), ProcessSnapshot())
    return Snapshot(listening, tuple(listeners.values()), processes, expected, used)


def _add(one: ListenerSnapshot, other: ListenerSnapshot) -> ListenerSnapshot:
    backends = {(b.group, b.name): b for b in one.backends}
    for b in other.backends:
        seen = backends.get((b.group, b.name))
        backends[(b.group, b.name)] = b if seen is None else _add_backend(seen, b)
    return attrs.evolve(
        one,
        counters=one.counters + other.counters,
        durations=one.durations + other.durations,
        backends=tuple(backends.values()),
    )


def _add_backend(one: BackendSnapshot, other: BackendSnapshot) -> BackendSnapshot:
    return attrs.evolve(
        one,
        up=one.up and other.up,
        ejected=one.ejected or other.ejected,
        active=one.active + other.active,
        connections=one.connections + other.connections,
        connect_failures=one.connect_failures + other.connect_failures,
        health_failures=one.health_failures + other.health_failures,
    )


def durations(histograms: Iterable[DurationHistogram]) -> DurationSnapshot:
    """The histograms of a listener's endpoints, together."""
    total = DurationSnapshot()
    for histogram in histograms:
        total += DurationSnapshot(tuple(histogram.counts), histogram.sum)
    return total
