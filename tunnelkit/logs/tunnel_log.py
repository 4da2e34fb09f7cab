"""The one structured log event each tunnel emits when it ends.

Every field is documented in docs/logging.md; the event name ``tunnel_closed``
and the field names are a stable interface for log pipelines (``twistd
--logger`` with ``twisted.logger.jsonFileLogObserver`` gives JSON lines).
With ``--access-log`` the same records go to a file of their own instead
(:mod:`tunnelkit.logs.access_file`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tunnelkit.relay.tunnel import TunnelRecord

log = Logger(namespace="tunnelkit.tunnel")


#: A batch of ended tunnels: each record with the ``--listen`` value that accepted it.
Batch = Sequence[tuple[TunnelRecord, str]]


def tunnel_text(record: TunnelRecord) -> str:
    """The event as one line for people: the text log's message and the ``text`` field."""
    backend = record.backend or "-"
    address = record.backend_address or "-"
    return (
        f"{record.client or '-'} -> {backend} ({address}) {record.close_kind.value}"
        f" by {record.closed_by.value} after {record.duration:.3f}s:"
        f" up {record.bytes_up} B, down {record.bytes_down} B; {record.reason}"
    )


def tunnel_fields(record: TunnelRecord, listener: str) -> dict[str, object]:
    """The fields of ``tunnel_closed`` for ``record``, seen on ``listener``.

    One list for every output (twisted.logger's event, the ``--access-log``
    JSON lines), so they keep the same names. A mode's
    :attr:`TunnelRecord.details` (CONNECT's target, status and user, TLS
    fields, ``spliced``) become fields of their own.
    """
    # The line is rendered here with an f-string and handed over as one field:
    # twisted.logger renders formats with the pure-Python string.Formatter,
    # which cost 15 % of the CPU of a new connection per request with ten
    # fields. Braces in the text are never interpreted.
    return {
        "text": tunnel_text(record),
        "event": "tunnel_closed",
        "listener": listener,
        # An unnamed UNIX client (most are) has no address: "-", as for no backend.
        "client": record.client or "-",
        "backend": record.backend or "-",
        "backend_address": record.backend_address or "-",
        "attempts": record.attempts,
        "bytes_up": record.bytes_up,
        "bytes_down": record.bytes_down,
        "duration": round(record.duration, 6),
        "connect_time": None if record.connect_time is None else round(record.connect_time, 6),
        "closed_by": record.closed_by.value,
        "close_kind": record.close_kind.value,
        "reason": record.reason,
        **record.details,
    }


def log_tunnel_closed(record: TunnelRecord, listener: str) -> None:
    """Emit ``tunnel_closed`` for ``record``, seen on ``listener``, through twisted.logger."""
    log.info("{text}", **tunnel_fields(record, listener))


def emit_events(batch: Batch) -> None:
    """The default sink of :class:`TunnelLog`: one twisted.logger event per record."""
    for record, listener in batch:
        log_tunnel_closed(record, listener)


class TunnelLog:
    """Hands ended tunnels to ``sink`` in batches, at most ``delay`` seconds late.

    One event emitted on its own, between the network work of the
    connections around it, runs twisted.logger's observer on a cold path:
    about 40 µs per event in a busy proxy against 16 µs in a tight loop.
    Queued and emitted together a reactor turn or so later, the same events
    cost about 20 µs less each (of ~195 µs of CPU per short connection).
    The sink is :func:`emit_events`, or with ``--access-log`` a
    :class:`tunnelkit.logs.access_file.AccessLogFile` that writes a batch with one
    system call. Order is kept; :meth:`flush` empties the queue at once (on
    shutdown).
    """

    def __init__(
        self, clock: IReactorTime, delay: float = 0.02, sink: Callable[[Batch], None] = emit_events
    ) -> None:
        self.clock = clock
        self.delay = delay
        self.sink = sink
        self._pending: list[tuple[TunnelRecord, str]] = []
        self._timer: IDelayedCall | None = None

    def __call__(self, record: TunnelRecord, listener: str) -> None:
        self._pending.append((record, listener))
        if self._timer is None:
            self._timer = self.clock.callLater(self.delay, self.flush)

    def flush(self) -> None:
        """Hand every queued record to the sink now."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if pending:
            self.sink(pending)
