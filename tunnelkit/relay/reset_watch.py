"""Notice the reset of a client whose FIN arrived while its backend still connects.

Twisted stops reading a socket once it returns EOF (the half-close is kept
for the backend), and an unread, unwritten socket is not polled at all: a
client that sends its FIN and then an RST would hold its socket and the
pending connect until the connect timeout. Watching it for reading again
would report the EOF over and over. Instead the socket goes into an epoll
descriptor of its own with no event asked for, which epoll reports only on
a hang-up or an error (an RST), and that descriptor is read by the reactor
only while it holds a socket.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IReadDescriptor)
class ResetWatch:
    """Calls back once per watched socket when it hangs up (reset), unless forgotten first."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._poller: select.epoll | None = None
        self._watched: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, on_reset: Callable[[], None]) -> None:
        """Call ``on_reset`` when socket ``fd`` hangs up; :meth:`forget` it before it closes."""
        if self._poller is None:
            self._poller = select.epoll()
            self.reactor.addReader(self)
        self._poller.register(fd, 0)  # hang-ups and errors are reported unasked
        self._watched[fd] = on_reset

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (nothing happens if it is not watched)."""
        if self._watched.pop(fd, None) is None or self._poller is None:
            return
        with contextlib.suppress(OSError):  # already closed: epoll dropped it
            self._poller.unregister(fd)
        if not self._watched:
            self.reactor.removeReader(self)
            self._poller.close()
            self._poller = None

    def fileno(self) -> int:
        return self._poller.fileno() if self._poller is not None else -1

    def doRead(self) -> None:
        if self._poller is None:
            return
        for fd, _events in self._poller.poll(0):
            on_reset = self._watched.get(fd)
            if on_reset is not None:
                self.forget(fd)
                on_reset()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor let go of it (at shutdown): nothing to release but the poller."""
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        self._watched.clear()

    def logPrefix(self) -> str:
        return "tunnelkit-reset-watch"


_watch: ResetWatch | None = None


def reset_watch() -> ResetWatch | None:
    """The process's :class:`ResetWatch` on the global reactor, or ``None`` without epoll."""
    global _watch
    if _watch is None and hasattr(select, "epoll"):
        from twisted.internet import reactor

        _watch = ResetWatch(reactor)
    return _watch
