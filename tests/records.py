"""A tunnel record for tests of the log events built from it."""

from __future__ import annotations

from tunnelkit.relay.tunnel import CloseKind, Side, TunnelRecord


def a_record(client: str = "127.0.0.1:5", reason: str = "client sent FIN") -> TunnelRecord:
    """A clean client-closed tunnel to backend ``b:80``."""
    return TunnelRecord(
        client=client,
        backend="b:80",
        backend_address="127.0.0.1:80",
        bytes_up=3,
        bytes_down=4,
        duration=1.5,
        connect_time=0.01,
        closed_by=Side.CLIENT,
        close_kind=CloseKind.FIN,
        reason=reason,
    )
