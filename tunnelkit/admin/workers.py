"""``--admin`` with ``--workers N``: the supervisor asks every worker, and serves the sum.

Each worker gets one more pair of pipes from its supervisor (beside its
standard output, which carries its log): requests come in on one, answers
go out on the other, at descriptor numbers above the inherited listeners'
(named in :data:`ENVIRONMENT`). A request is a line with a number; the
answer is that number and the worker's snapshot as JSON, on one line. At
each scrape the supervisor asks every ready worker at once, waits at most
:data:`SCRAPE_TIMEOUT` seconds, and adds up what came back
(:func:`~tunnelkit.admin.snapshot.merge`): a worker that did not answer is
left out, which ``/readyz`` and ``tunnelkit_processes`` show.

A worker that ends leaves its last counts behind (:func:`retired`), added
to every later sum: the supervisor's counters never go back when a worker
is restarted (Prometheus would read that as a reset of the whole sum). What
it counted after its last scrape is lost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from tunnelkit.admin.observe import Observer
from tunnelkit.admin.snapshot import Snapshot, merge, retired

log = Logger(namespace="tunnelkit.admin")

#: The worker's scrape descriptors, ``READ,WRITE``, set by the supervisor.
ENVIRONMENT = "TUNNELKIT_SCRAPE_FDS"
#: Seconds a scrape waits for the workers' answers.
SCRAPE_TIMEOUT = 2.0
#: The longest answer read from a worker (a snapshot of many backends is a few hundred KiB).
MAX_ANSWER = 1 << 24


# -- the worker's side -----------------------------------------------------------


class _Answers(LineReceiver):
    """Answers each request line with its number and this worker's snapshot."""

    delimiter = b"\n"

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def lineReceived(self, line: bytes) -> None:
        answer = json.dumps(self.observer.snapshot().to_json(), separators=(",", ":"))
        assert self.transport is not None
        self.transport.write(line.strip() + b" " + answer.encode() + b"\n")


def answer_scrapes(reactor: Any, observer: Observer) -> None:
    """In a worker: answer the supervisor's scrapes on the pipes it gave, if it gave any."""
    fds = os.environ.pop(ENVIRONMENT, None)
    if fds is None:
        return
    from twisted.internet.stdio import StandardIO

    read, write = (int(fd) for fd in fds.split(","))
    # (mypy reads Windows' StandardIO, which takes no descriptors.)
    StandardIO(_Answers(observer), stdin=read, stdout=write, reactor=reactor)  # type: ignore[call-arg]


# -- the supervisor's side -------------------------------------------------------


class Channel:
    """The supervisor's end of one worker's scrape pipes: asks, and matches the answers."""

    def __init__(self, clock: Any, write: Callable[[bytes], None]) -> None:
        self.clock = clock
        self.write = write
        self.last: Snapshot | None = None
        self._pending: dict[int, tuple[Deferred[Snapshot | None], IDelayedCall]] = {}
        self._asked = 0
        self._partial = b""

    def ask(self) -> Deferred[Snapshot | None]:
        """The worker's snapshot, or ``None`` if it does not answer in time."""
        self._asked += 1
        number = self._asked
        answer: Deferred[Snapshot | None] = Deferred()
        timer = self.clock.callLater(SCRAPE_TIMEOUT, self._answer, number, None)
        self._pending[number] = (answer, timer)
        self.write(b"%d\n" % number)
        return answer

    def received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_ANSWER:
            self._partial = b""
        for line in lines:
            number, _, body = line.partition(b" ")
            try:
                snapshot = Snapshot.from_json(json.loads(body))
                self._answer(int(number), snapshot)
            except (ValueError, KeyError, TypeError):
                log.warn("a worker's scrape answer was not understood", event="scrape_garbled")

    def _answer(self, number: int, snapshot: Snapshot | None) -> None:
        pending = self._pending.pop(number, None)
        if pending is None:
            return  # timed out already
        answer, timer = pending
        if timer.active():
            timer.cancel()
        if snapshot is not None:
            self.last = snapshot
        answer.callback(snapshot)

    def ended(self) -> None:
        """The worker is gone: nothing pending will be answered."""
        for number in list(self._pending):
            self._answer(number, None)


class Scrapes:
    """The supervisor's scrapes of its workers, and the counts of those that ended."""

    def __init__(self, clock: Any, listening: Sequence[int], expected: int) -> None:
        self.clock = clock
        self.expected = expected
        base = max([2, *listening]) + 1
        #: The worker's descriptors: it reads requests on the first, writes answers on the second.
        self.requests, self.answers = base, base + 1
        self._retired: list[Snapshot] = []

    def child_fds(self) -> dict[int, int | str]:
        """For ``spawnProcess``: the supervisor writes the requests and reads the answers."""
        return {self.requests: "w", self.answers: "r"}

    def environment(self) -> dict[str, str]:
        return {ENVIRONMENT: f"{self.requests},{self.answers}"}

    def retire(self, channel: Channel) -> None:
        """A worker ended: keep its last counts in the sums from now on."""
        if channel.last is not None:
            left = [*self._retired, retired(channel.last)]
            self._retired = [merge(left, listening=False, expected=0)]
        channel.ended()

    def snapshot(self, channels: Iterable[Channel], accepting: bool) -> Deferred[Snapshot]:
        """Every ready worker's snapshot now, added up (with those that ended)."""
        asked: Deferred[list[Snapshot | None]] = gatherResults([c.ask() for c in channels])

        def added(answers: list[Snapshot | None]) -> Snapshot:
            live = [answer for answer in answers if answer is not None]
            return merge([*live, *self._retired], listening=accepting, expected=self.expected)

        return asked.addCallback(added)
