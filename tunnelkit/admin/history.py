"""The last minutes of each listener's traffic, for the status page's sparklines.

Sampled from the same snapshots as every other answer, every
:data:`PERIOD` seconds while the process runs (with ``--workers``, a
scrape of the workers each time), so the page shows the recent past the
moment it is opened. Bytes are counted when tunnels end (as the counters
do): a long download shows when it is over.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.admin.site import Source
from tunnelkit.admin.snapshot import Snapshot

log = Logger(namespace="tunnelkit.admin")

#: Seconds between samples, and how many are kept: six minutes.
PERIOD = 5.0
POINTS = 72

#: One sample of one listener: its time (the clock's seconds), bytes both ways, live tunnels.
Sample = tuple[float, int, int]


class History(Service):
    """Samples ``source`` every :data:`PERIOD` seconds; :meth:`series` is what the page draws."""

    def __init__(self, source: Source, clock: Any) -> None:
        self.source = source
        self.clock = clock
        self._series: dict[str, deque[Sample]] = {}
        self._sampling = LoopingCall(self.sample)
        self._sampling.clock = clock

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._sampling.start(PERIOD, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sampling.running:
            self._sampling.stop()

    def sample(self) -> None:
        self.source.snapshot().addCallbacks(self._add, self._failed)

    def _add(self, snapshot: Snapshot) -> None:
        now = self.clock.seconds()
        for listener in snapshot.listeners:
            counters = listener.counters
            series = self._series.setdefault(listener.name, deque(maxlen=POINTS))
            series.append((now, counters.bytes_up + counters.bytes_down, counters.active))

    def _failed(self, failure: Failure) -> None:
        log.failure("admin: sampling failed", failure, event="admin_failed", path="history")

    def to_json(self) -> dict[str, Any]:
        """Each listener's samples, oldest first, and how they are taken (for ``/status.json``)."""
        listeners = {name: list(samples) for name, samples in self._series.items()}
        return {"period": PERIOD, "points": POINTS, "listeners": listeners}
