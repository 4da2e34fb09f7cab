"""``/metrics``: a :class:`~tunnelkit.admin.snapshot.Snapshot` in Prometheus' text format.

Names follow Prometheus' conventions (``_total`` counters, ``_seconds``
units) and HAProxy's exporter where it has the same thing: per listener
(``listener`` is its ``name``, or its first ``listen`` value), per backend
(``listener``, ``group``: ``""`` for ``to`` or the SNI route, ``backend``).
The families are made at scrape time by a collector of one snapshot
(``prometheus_client``'s custom-collector interface): nothing is counted
twice, and a worker's numbers reach its supervisor as plain data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import accumulate

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from tunnelkit.admin.snapshot import DURATION_BUCKETS, ListenerSnapshot, Snapshot
from tunnelkit.relay.counters import ListenerCounters

#: The reasons a client is refused, as ``reason`` labels, and their counter in ListenerCounters:
#: every ``refused_REASON`` field (a counter added there is exported with no change here).
REFUSALS = {
    field.name.removeprefix("refused_"): field.name
    for field in attrs.fields(ListenerCounters)
    if field.name.startswith("refused_")
}

#: Per listener: (name, help, ListenerCounters field) of the plain counters.
LISTENER_COUNTERS = (
    ("connections_accepted", "Clients admitted (a tunnel began)", "accepted"),
    ("connect_failures", "Tunnels that ended because no backend connected", "connect_failures"),
    ("tls_handshake_failures", "TLS clients whose handshake did not complete", "tls_failures"),
)

LISTENER = ["listener"]
BACKEND = ["listener", "group", "backend"]


class SnapshotCollector:
    """The metric families of one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        yield _gauge("up", "1 while accepting, 0 while draining", [], [([], snapshot.listening)])
        yield _gauge("ready", "1 when /readyz answers 200", [], [([], snapshot.ready)])
        yield _gauge(
            "processes",
            "Processes whose counts are included (workers that answered this scrape)",
            [],
            [([], snapshot.processes)],
        )
        yield from self._process(snapshot)
        listeners = snapshot.listeners
        yield from self._listeners(listeners)
        yield from self._backends(listeners)

    def _process(self, snapshot: Snapshot) -> Iterator[Metric]:
        used = snapshot.process
        yield _gauge(
            "connections_max",
            "The most tunnels at once (--max-connections, or the descriptor limit's room), all listeners",
            [],
            [([], used.max_tunnels)],
        )
        yield _counter(
            "process_cpu_seconds",
            "CPU time (user and system) of the processes relaying tunnels",
            [],
            [([], used.cpu_seconds)],
        )
        yield _gauge(
            "process_resident_memory_bytes",
            "Resident memory of the processes relaying tunnels",
            [],
            [([], used.resident_bytes)],
        )
        yield _gauge(
            "process_open_fds",
            "Open file descriptors of the processes relaying tunnels",
            [],
            [([], used.open_fds)],
        )

    def _listeners(self, listeners: tuple[ListenerSnapshot, ...]) -> Iterator[Metric]:
        for name, text, field in LISTENER_COUNTERS:
            yield _counter(
                name,
                text,
                LISTENER,
                [([each.name], getattr(each.counters, field)) for each in listeners],
            )
        yield _counter(
            "connections_refused",
            "Clients closed at once, by reason",
            [*LISTENER, "reason"],
            [
                ([each.name, reason], getattr(each.counters, field))
                for each in listeners
                for reason, field in REFUSALS.items()
            ],
        )
        yield _gauge(
            "connections_active",
            "Tunnels live now",
            LISTENER,
            [([each.name], each.counters.active) for each in listeners],
        )
        yield _counter(
            "bytes",
            "Bytes relayed by the tunnels that ended: up (client to backend) and down",
            [*LISTENER, "direction"],
            [([each.name, "up"], each.counters.bytes_up) for each in listeners]
            + [([each.name, "down"], each.counters.bytes_down) for each in listeners],
        )
        yield _gauge(
            "listener_ready",
            "1 when the listener can serve: listening, and one of its backends up (if it has any)",
            LISTENER,
            [([each.name], each.ready) for each in listeners],
        )
        yield _gauge(
            "listener_info",
            "The plane relaying the listener's tunnels (engine or twisted)",
            [*LISTENER, "plane"],
            [([each.name, each.plane], 1) for each in listeners],
        )
        durations = HistogramMetricFamily(
            "tunnelkit_tunnel_duration_seconds",
            "How long tunnels lasted, from accept to the end of both legs",
            labels=LISTENER,
        )
        bounds = [*(f"{b:g}" for b in DURATION_BUCKETS), "+Inf"]
        for each in listeners:
            cumulative = accumulate(each.durations.counts)
            durations.add_metric(
                [each.name], list(zip(bounds, cumulative, strict=True)), each.durations.sum
            )
        yield durations

    def _backends(self, listeners: tuple[ListenerSnapshot, ...]) -> Iterator[Metric]:
        rows = [([each.name, b.group, b.name], b) for each in listeners for b in each.backends]
        gauges = (
            ("backend_up", "1 when the backend may take clients (health checks, weight)", "up"),
            ("backend_ejected", "1 while passively ejected after failed connects", "ejected"),
            ("backend_active_connections", "The backend's tunnels and connects now", "active"),
            ("backend_weight", "The backend's configured weight", "weight"),
        )
        for name, text, field in gauges:
            yield _gauge(name, text, BACKEND, [(labels, getattr(b, field)) for labels, b in rows])
        counters = (
            ("backend_connections", "Connects to the backend that succeeded", "connections"),
            ("backend_connect_failures", "Connects to the backend that failed or timed out", "connect_failures"),
            ("backend_health_check_failures", "Health checks of the backend that failed", "health_failures"),
        )  # fmt: skip
        for name, text, field in counters:
            yield _counter(name, text, BACKEND, [(labels, getattr(b, field)) for labels, b in rows])


def _gauge(
    name: str, text: str, labels: list[str], rows: Iterable[tuple[list[str], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"tunnelkit_{name}", text, labels=labels)
    for values, value in rows:
        family.add_metric(values, float(value))
    return family


def _counter(
    name: str, text: str, labels: list[str], rows: Iterable[tuple[list[str], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"tunnelkit_{name}", text, labels=labels)
    for values, value in rows:
        family.add_metric(values, float(value))
    return family


def render(snapshot: Snapshot, accept: str = "") -> tuple[bytes, str]:
    """The snapshot in the format a scraper's ``Accept`` header asks for, and its content type.

    Prometheus' text format (version 0.0.4) unless OpenMetrics is asked for,
    as prometheus_client's own handler negotiates it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
