"""UDP peers for the tests: an echo backend and ping-pong clients on the reactor, and session records."""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import LogEvent, globalLogPublisher

#: Big enough for any UDP payload.
MAX_DATAGRAM = 65536


class Echo(DatagramProtocol):
    """Sends each datagram back to its sender, ``copies`` times (numbered when more than one)."""

    noisy = False

    def __init__(self, copies: int = 1) -> None:
        self.copies = copies
        self.senders: set[tuple[str, int]] = set()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.senders.add(addr)
        for copy in range(self.copies):
            prefix = b"" if self.copies == 1 else b"%d:" % copy
            self.transport.write(prefix + datagram, addr)  # type: ignore[union-attr]


class PingPong(DatagramProtocol):
    """Sends ``datagrams`` one at a time to ``address``, the next once the reply came; ``done`` fires with the replies."""

    noisy = False

    def __init__(self, address: tuple[str, int], datagrams: list[bytes]) -> None:
        self.address = address
        self.datagrams = datagrams
        self.replies: list[bytes] = []
        #: Where the replies came from.
        self.sources: set[tuple[str, int]] = set()
        self.done: Deferred[list[bytes]] = Deferred()

    def start(self) -> None:
        """Send the first datagram (the port must be listening)."""
        self._next()

    def _next(self) -> None:
        if len(self.replies) >= len(self.datagrams):
            if not self.done.called:  # a reply beyond those asked for is only kept
                self.done.callback(self.replies)
            return
        self.transport.write(self.datagrams[len(self.replies)], self.address)  # type: ignore[union-attr]

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.replies.append(datagram)
        self.sources.add(addr)
        self._next()


def digest(datagrams: list[bytes]) -> str:
    """SHA-256 over the datagrams, concatenated, each preceded by its length (a split or merge shows)."""
    h = hashlib.sha256()
    for datagram in datagrams:
        h.update(len(datagram).to_bytes(4, "big") + datagram)
    return h.hexdigest()


class SessionRecords:
    """Collects the ``udp_session_closed`` events; ``first(n)`` fires once n were logged."""

    def __init__(self) -> None:
        self.records: list[LogEvent] = []
        self._waiting: list[tuple[int, Deferred[list[LogEvent]]]] = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event: LogEvent) -> None:
        if event.get("event") == "udp_session_closed":
            self.records.append(event)
            ready = [(n, d) for n, d in self._waiting if len(self.records) >= n]
            for entry in ready:
                self._waiting.remove(entry)
                entry[1].callback(self.records[: entry[0]])

    def first(self, count: int) -> Deferred[list[LogEvent]]:
        waiting: Deferred[list[LogEvent]] = Deferred()
        if len(self.records) >= count:
            waiting.callback(self.records[:count])
        else:
            self._waiting.append((count, waiting))
        return waiting

    def close(self) -> None:
        globalLogPublisher.removeObserver(self)
