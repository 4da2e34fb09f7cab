"""Snapshots in memory: the duration buckets, a worker's JSON, the supervisor's sums, the Prometheus rendering."""

from __future__ import annotations

import attrs
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from tunnelkit.admin.history import PERIOD, POINTS, History
from tunnelkit.admin.metrics import render
from tunnelkit.admin.snapshot import (
    DURATION_BUCKETS,
    BackendSnapshot,
    DurationHistogram,
    DurationSnapshot,
    ListenerSnapshot,
    ProcessSnapshot,
    Snapshot,
    durations,
    merge,
    retired,
)
from tunnelkit.relay.counters import ListenerCounters


def backend(name: str = "10.0.0.1:80", **fields: object) -> BackendSnapshot:
    values: dict[str, object] = {
        "group": "",
        "up": True,
        "ejected": False,
        "active": 1,
        "weight": 1,
        "connections": 10,
        "connect_failures": 2,
        "health_failures": 3,
    }
    return BackendSnapshot(name=name, **(values | fields))  # type: ignore[arg-type]


def worker(*backends: BackendSnapshot, seconds: tuple[float, ...] = (0.01,)) -> Snapshot:
    histogram = DurationHistogram()
    for each in seconds:
        histogram.observe(each)
    counters = ListenerCounters(accepted=5, active=1, bytes_up=100, bytes_down=200)
    listener = ListenerSnapshot("web", "engine", counters, durations([histogram]), backends)
    return Snapshot(True, (listener,))


def test_a_duration_is_counted_in_the_first_bucket_it_fits() -> None:
    """Prometheus' buckets are "less than or equal": a bound itself falls in its own bucket."""
    histogram = DurationHistogram()
    for seconds in (0.0, 0.005, 0.0051, 3600.0, 3600.1):
        histogram.observe(seconds)
    assert histogram.counts[0] == 2 and histogram.counts[1] == 1
    assert histogram.counts[len(DURATION_BUCKETS) - 1] == 1
    assert histogram.counts[-1] == 1


def test_a_snapshot_crosses_the_pipe_as_json() -> None:
    snapshot = worker(backend(), backend("b", group="*.example.com", up=False))
    assert Snapshot.from_json(snapshot.to_json()) == snapshot


def test_the_supervisor_adds_its_workers_up() -> None:
    """Counts and live tunnels add; a backend is up only if every worker says so; ejected if one does."""
    one = worker(backend(ejected=True), seconds=(0.01,))
    other = worker(backend(up=False), seconds=(100.0, 0.2))
    total = merge([one, other], listening=True, expected=2)
    [listener] = total.listeners
    assert listener.counters == ListenerCounters(
        accepted=10, active=2, bytes_up=200, bytes_down=400
    )
    assert sum(listener.durations.counts) == 3
    assert listener.durations.sum == pytest.approx(100.21)
    [both] = listener.backends
    assert (both.up, both.ejected, both.active, both.connections) == (False, True, 2, 20)
    assert (total.processes, total.ready) == (2, False)
    assert total.unready() == ["listener web: no backend is up"]


def test_a_worker_that_ended_keeps_its_counts_but_not_its_live_state() -> None:
    """Its counters stay in the sums; its live tunnels and its view of health do not."""
    used = ProcessSnapshot(cpu_seconds=2.5, resident_bytes=1 << 20, open_fds=9, max_tunnels=100)
    gone = retired(attrs.evolve(worker(backend(up=False, ejected=True)), process=used))
    live = attrs.evolve(worker(backend()), process=used)
    total = merge([live, gone], listening=True, expected=1)
    assert total.process == attrs.evolve(used, cpu_seconds=5.0)
    [listener] = total.listeners
    assert listener.counters.accepted == 10 and listener.counters.active == 1
    [one] = listener.backends
    assert (one.up, one.ejected, one.active, one.connections) == (True, False, 1, 20)
    assert total.ready
    alone = merge([gone], listening=True, expected=2)
    assert alone.unready() == ["0 of 2 workers answered"]


def test_the_histogram_is_cumulative_in_prometheus_text() -> None:
    snapshot = worker(backend(), seconds=(0.001, 0.2, 0.2, 7200.0))
    text, content_type = render(snapshot)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    samples = families["tunnelkit_tunnel_duration_seconds"].samples
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert (buckets["0.005"], buckets["0.5"], buckets["3600"], buckets["+Inf"]) == (1, 3, 3, 4)
    [count] = [s.value for s in samples if s.name.endswith("_count")]
    assert count == 4


def test_openmetrics_when_asked() -> None:
    """A scraper that accepts OpenMetrics (Prometheus does) gets it, with its ``# EOF``."""
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    text, content_type = render(worker(backend()), accept)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics_families(text.decode())}
    [accepted] = families["tunnelkit_connections_accepted"].samples
    assert (accepted.name, accepted.value) == ("tunnelkit_connections_accepted_total", 5)


class Snapshots:
    """A source whose snapshots the test sets: one listener's bytes and live tunnels."""

    def __init__(self) -> None:
        self.bytes = self.active = 0

    def accepting(self) -> bool:
        return True

    def snapshot(self) -> Deferred[Snapshot]:
        counters = ListenerCounters(active=self.active, bytes_up=self.bytes, bytes_down=self.bytes)
        listener = ListenerSnapshot("web", "engine", counters, DurationSnapshot(), ())
        return succeed(Snapshot(True, (listener,)))


def test_the_history_keeps_the_last_minutes() -> None:
    """A sample at start and every period; the oldest go once there are POINTS."""
    clock, source = Clock(), Snapshots()
    history = History(source, clock)
    history.startService()
    for step in range(1, POINTS + 5):
        source.bytes, source.active = step * 100, step % 3
        clock.advance(PERIOD)
    history.stopService()
    clock.advance(PERIOD)
    samples = history.to_json()["listeners"]["web"]
    assert len(samples) == POINTS
    assert samples[-1] == ((POINTS + 4) * PERIOD, (POINTS + 4) * 200, (POINTS + 4) % 3)
    assert samples[0][0] == 5 * PERIOD
    assert not clock.getDelayedCalls()
