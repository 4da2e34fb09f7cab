"""``--access-log PATH``: the ``tunnel_closed`` records in a file of their own, cheaply.

Through twisted.logger, twistd's text observer costs about 44 µs per record
(the event's classic-text rendering, ``formatTime``, one write(2) per line),
more than half the ~77 µs of proxy CPU of the rest of a short connection. This
sink takes the batches :class:`tunnelkit.logs.tunnel_log.TunnelLog` already
makes, formats them with f-strings (or one C JSON encoder), stamps them with
a timestamp formatted once per second and writes each batch with one
``os.write``: a few µs per record (docs/logging.md has the figures), as
nginx's ``access_log PATH buffer=32k flush=1s``.

The file is opened (``O_APPEND``) while the options are checked, so a bad
path is a command-line error before ``twistd`` daemonizes or drops
privileges. Each process of ``--workers N`` opens it on its own: a batch is
whole lines written with one write(2) on an ``O_APPEND`` descriptor, so the
lines of different workers never interleave. SIGHUP reopens the path (after
logrotate renamed the file); writing is never allowed to fail the reactor.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from twisted.logger import Logger

from tunnelkit.logs.tunnel_log import Batch, tunnel_fields, tunnel_text

log = Logger(namespace="tunnelkit.access_log")

#: The values of ``--access-log-format``; the first is the default.
FORMATS = ("text", "json")

#: twistd's timestamp (``twisted.logger.formatTime``): local time and its UTC offset.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_MODE = 0o640

# One encoder for every line: json.dumps with options builds a new one per call.
# ``default=str`` turns a detail that JSON cannot carry into text instead of an error.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _open(path: str) -> int:
    return os.open(path, _FLAGS, _MODE)


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


class AccessLogFile:
    """A :class:`TunnelLog` sink that appends each batch to ``path`` with one write.

    Opening raises :class:`OSError` (the caller turns it into a usage
    error). Afterwards nothing raises: a batch that cannot be written is
    dropped and the failure logged once per burst (``access_log_write_failed``,
    then ``access_log_write_resumed`` with the count of dropped records once
    a write succeeds again).
    """

    def __init__(
        self, path: str, format: str = FORMATS[0], clock: Callable[[], float] = time.time
    ) -> None:
        # Absolute: twistd changes directory (--rundir) before SIGHUP reopens it.
        self.path = os.path.abspath(path)
        self.clock = clock
        self._lines = {"text": self._text_lines, "json": self._json_lines}[format]
        self.fd = _open(self.path)
        self._second = -1
        self._prefix = ""
        self._dropped = 0

    def __call__(self, batch: Batch) -> None:
        """Write ``batch`` as whole lines with one system call (two only on a short write)."""
        data = memoryview(self._lines(batch, self.clock()).encode("utf-8", "backslashreplace"))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as e:
            if not self._dropped:
                log.error(
                    "access log {path}: cannot write ({reason}); records are dropped"
                    " until a write succeeds",
                    event="access_log_write_failed",
                    path=self.path,
                    reason=_reason(e),
                )
            self._dropped += len(batch)
            return
        if self._dropped:
            log.warn(
                "access log {path}: writing again after dropping {records}",
                event="access_log_write_resumed",
                path=self.path,
                dropped=self._dropped,
                records=f"{self._dropped} record{'s' if self._dropped != 1 else ''}",
            )
            self._dropped = 0

    def _text_lines(self, batch: Batch, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime(TIME_FORMAT, time.localtime(second)) + " "
        prefix = self._prefix
        return "".join([f"{prefix}{tunnel_text(record)}\n" for record, _ in batch])

    def _json_lines(self, batch: Batch, now: float) -> str:
        stamp = round(now, 6)
        return "".join(
            [
                f"{_encode({'time': stamp, **tunnel_fields(record, listener)})}\n"
                for record, listener in batch
            ]
        )

    def reopen(self) -> None:
        """Open the path again (SIGHUP after logrotate renamed it) and write there from now on.

        If it cannot be opened the previous descriptor stays in use, so no
        record is lost to a rotation gone wrong (``access_log_reopen_failed``).
        """
        if self.fd < 0:  # a SIGHUP that arrived while the service stopped
            return
        try:
            fd = _open(self.path)
        except OSError as e:
            log.error(
                "access log {path}: cannot reopen ({reason}); still writing to the file"
                " opened before",
                event="access_log_reopen_failed",
                path=self.path,
                reason=_reason(e),
            )
            return
        previous, self.fd = self.fd, fd
        os.close(previous)
        log.info("access log {path} reopened", event="access_log_reopened", path=self.path)

    def close(self) -> None:
        """Let the file go (on stop, after the last batch); a later write fails and is logged."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
