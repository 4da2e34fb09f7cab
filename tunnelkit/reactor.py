"""Twisted's epoll reactor, without a legacy log context around every I/O event.

For each ready descriptor, ``EPollReactor.doPoll`` calls the transport's
``logPrefix()`` and enters ``twisted.python.log.callWithLogger``, which sets up
a context (a dict and three nested calls) so that old-style ``log.msg`` calls
made while handling the event carry the transport's name. tunnelkit logs
with ``twisted.logger`` namespaces and never uses that context, yet paid for
it about six times per short connection. This reactor dispatches the event
directly; errors are still caught and logged per event, so one failing
descriptor cannot disturb the others.

``twistd --reactor NAME`` still chooses another reactor: this one is
installed only when none is installed yet.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

log = Logger(namespace="tunnelkit.reactor")


class EPollReactor(epollreactor.EPollReactor):
    """``EPollReactor`` whose poll loop calls ``_doReadOrWrite`` directly."""

    def doPoll(self, timeout: float | None) -> None:
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
