"""A ``unix:`` listener a worker shares with its supervisor and the other workers."""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp, unix


class SharedUNIXPort(unix.Port):
    """A worker's view of an inherited ``unix:`` listener: the supervisor owns its path and lock.

    Twisted's port removes the socket file when it stops listening: the first
    worker to stop would take the path away from the others (and the next
    would fail to remove it again, with a traceback).
    """

    @classmethod
    def adopt(cls, reactor: Any, fd: int, factory: Any) -> SharedUNIXPort:
        """Listen on a duplicate of ``fd``, as ``reactor.adoptStreamPort`` does."""
        port: SharedUNIXPort = cls._fromListeningDescriptor(reactor, fd, factory)  # type: ignore[no-untyped-call]
        port.startListening()  # type: ignore[no-untyped-call]
        return port

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)
