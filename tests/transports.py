"""In-memory transports for protocol tests: no sockets, no reactor."""

from __future__ import annotations

from twisted.internet.testing import StringTransport


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records ``loseWriteConnection``."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()
