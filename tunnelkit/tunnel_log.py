"""The one structured log event each tunnel emits when it ends.

Every field is documented in docs/logging.md; the event name ``tunnel_closed``
and the field names are a stable interface for log pipelines (``twistd
--logger`` with ``twisted.logger.jsonFileLogObserver`` gives JSON lines).
"""

from __future__ import annotations

from twisted.logger import Logger

from tunnelkit.relay import TunnelRecord

log = Logger(namespace="tunnelkit.tunnel")


def _text(record: TunnelRecord) -> str:
    backend = record.backend or "-"
    address = record.backend_address or "-"
    return (
        f"{record.client} -> {backend} ({address}) {record.close_kind.value}"
        f" by {record.closed_by.value} after {record.duration:.3f}s:"
        f" up {record.bytes_up} B, down {record.bytes_down} B; {record.reason}"
    )


def log_tunnel_closed(record: TunnelRecord, listener: str) -> None:
    """Emit ``tunnel_closed`` for ``record``, seen on ``listener``.

    A mode's :attr:`TunnelRecord.details` (CONNECT's target, status and user)
    become fields of their own.
    """
    # The line is rendered here with an f-string and handed over as one field:
    # twisted.logger renders formats with the pure-Python string.Formatter,
    # which cost 15 % of the CPU of a new connection per request with ten
    # fields. Braces in the text are never interpreted.
    log.info(
        "{text}",
        text=_text(record),
        event="tunnel_closed",
        listener=listener,
        client=record.client,
        backend=record.backend or "-",
        backend_address=record.backend_address or "-",
        bytes_up=record.bytes_up,
        bytes_down=record.bytes_down,
        duration=round(record.duration, 6),
        connect_time=None if record.connect_time is None else round(record.connect_time, 6),
        closed_by=record.closed_by.value,
        close_kind=record.close_kind.value,
        reason=record.reason,
        **record.details,
    )
