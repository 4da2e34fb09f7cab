"""The default log of ended tunnels, cheaply: twistd's own text lines, a batch per write.

As shipped (``twistd -n tunnelkit ...``, or ``--logfile``), every
``tunnel_closed`` event went through twisted.logger: the event dict, the
publisher, then twistd's text observer, which renders the line with the
pure-Python ``string.Formatter``, formats the time with ``strftime`` and
writes and flushes once per line. About 29 µs per record in a tight loop and
35 µs in a busy proxy, against some 80 µs for the rest of a short
connection: the default log alone made tunnelkit slower than HAProxy in new
connections per second.

When twistd's text observer is the only observer of the global publisher,
:class:`TwistdText` writes each batch of
:class:`~tunnelkit.logs.tunnel_log.TunnelLog` straight to that observer's
file, as the very lines the observer would have written (``TIMESTAMP
[tunnelkit.tunnel#info] TEXT``, the time formatted once per second), with
one write and one flush per batch. Anyone else listening (``twistd
--logger``, ``--syslog``, an observer a test or a plugin added) gets the
events as before, through twisted.logger, so nothing that reads the events
loses them.

It reads two private attributes of Twisted's logger (the publisher's
``_observers``, the file observer's ``_outFile``) and recognises
:func:`twisted.logger.textFileLogObserver` by its formatter; the tests in
tests/logs/test_twistd_text.py pin all three against the installed Twisted,
and anything unrecognised takes the general path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    Logger,
    LogPublisher,
    globalLogPublisher,
    timeFormatRFC3339,
)

from tunnelkit.logs.tunnel_log import Batch, emit_events, log, tunnel_text

info = Logger(namespace="tunnelkit.access_log")

#: What twistd's text observer puts between the time and the text of our events.
SYSTEM = f" [{log.namespace}#info] "

#: The name of the formatter :func:`twisted.logger.textFileLogObserver` makes.
_TEXT_FORMATTER = "textFileLogObserver.<locals>.formatEvent"


def text_file(observer: object) -> tuple[IO[Any], bool] | None:
    """The file of a ``textFileLogObserver`` with twistd's time format, and whether it takes bytes."""
    if not isinstance(observer, FileLogObserver):
        return None
    formatter = observer.formatEvent
    if getattr(formatter, "__qualname__", None) != _TEXT_FORMATTER:
        return None
    cells = dict(zip(formatter.__code__.co_freevars, formatter.__closure__ or (), strict=True))
    time_format = cells.get("timeFormat")
    if time_format is None or time_format.cell_contents != timeFormatRFC3339:
        return None
    out: IO[Any] = observer._outFile
    return out, observer._encoding is not None


class TwistdText:
    """A :class:`~tunnelkit.logs.tunnel_log.TunnelLog` sink: twistd's lines a batch at a time, or events."""

    def __init__(
        self,
        publisher: LogPublisher = globalLogPublisher,
        clock: Callable[[], float] = time.time,
        events: Callable[[Batch], None] = emit_events,
    ) -> None:
        self.publisher = publisher
        self.clock = clock
        self.events = events
        self._second = -1
        self._prefix = ""
        self._direct: bool | None = None

    def __call__(self, batch: Batch) -> None:
        # Asked per batch: observers come and go (twistd adds its own only
        # after the service is made).
        observers = self.publisher._observers
        found = text_file(observers[0]) if len(observers) == 1 else None
        self._say(found is not None)
        if found is None:
            self.events(batch)
            return
        out, binary = found
        lines = self.lines(batch, self.clock())
        out.write(lines.encode("utf-8") if binary else lines)
        out.flush()

    def _say(self, direct: bool) -> None:
        """One line when the path changes, so that a slower log is never a mystery."""
        if direct is self._direct:
            return
        self._direct = direct
        info.info(
            "tunnel records: {path}",
            event="tunnel_log_path",
            direct=direct,
            path="written straight to twistd's text log, a batch at a time"
            if direct
            else "emitted as twisted.logger events (other observers listen)",
        )

    def lines(self, batch: Batch, now: float) -> str:
        """The batch as twistd's text observer writes events: ``TIME [SYSTEM] TEXT``, tabs after newlines."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime(timeFormatRFC3339, time.localtime(second)) + SYSTEM
        prefix = self._prefix
        return "".join(
            [prefix + tunnel_text(record).replace("\n", "\n\t") + "\n" for record, _ in batch]
        )
