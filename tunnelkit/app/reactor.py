"""Twisted's epoll reactor, without a legacy log context around every I/O event.

For each ready descriptor, ``EPollReactor.doPoll`` calls the transport's
``logPrefix()`` and enters ``twisted.python.log.callWithLogger``, which sets up
a context (a dict and three nested calls) so that old-style ``log.msg`` calls
made while handling the event carry the transport's name. tunnelkit logs
with ``twisted.logger`` namespaces and never uses that context, yet paid for
it about six times per short connection. This reactor dispatches the event
directly; errors are still caught and logged per event, so one failing
descriptor cannot disturb the others.

It also lets the native engine (:mod:`tunnelkit.engine.driver`) do its waiting:
with an engine nested (:meth:`EPollReactor.nest_engine`), the engine's epoll
descriptor holds the tunnels' sockets and this reactor's own epoll
descriptor, so a tunnel's event wakes the engine directly instead of waking
this epoll through the engine's, then being dispatched by Python to the
engine. The reactor's descriptors are polled when the engine says they are
ready.

``twistd --reactor NAME`` still chooses another reactor: this one is
installed only when none is installed yet.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

log = Logger(namespace="tunnelkit.reactor")


class EPollReactor(epollreactor.EPollReactor):
    """``EPollReactor`` whose poll loop calls ``_doReadOrWrite`` directly."""

    #: The nested engine's wait (see :meth:`nest_engine`), else ``None``.
    _engine_wait: Callable[[float | None], bool] | None = None

    def nest_engine(self, wait: Callable[[float | None], bool] | None) -> int | None:
        """Let ``wait(timeout)`` do the blocking; it says whether this reactor's descriptors are ready.

        Returns the epoll descriptor ``wait`` must watch, or ``None`` if
        another engine already waits here (one at most). ``None`` undoes it.
        """
        if wait is not None and self._engine_wait is not None:
            return None
        self._engine_wait = wait
        fileno: int = self._poller.fileno()
        return fileno

    def doPoll(self, timeout: float | None) -> None:
        wait = self._engine_wait
        if wait is not None:
            try:
                if not wait(timeout):
                    return
            except Exception:
                # Never stop the loop: the reactor's own descriptors are polled as usual.
                log.failure("the native engine's wait failed")
            timeout = 0
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except InterruptedError:
            return
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)  # type: ignore[no-untyped-call]
            except Exception:
                log.failure("handling an event of {selectable!r}", selectable=selectable)

    doIteration = doPoll


def installed() -> Any:
    """The reactor: the one already installed (``twistd --reactor``, tests), or this one."""
    if "twisted.internet.reactor" not in sys.modules:
        installReactor(EPollReactor())  # type: ignore[no-untyped-call]
    from twisted.internet import reactor

    return reactor
