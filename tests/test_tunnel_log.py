"""The access log's batching: events leave in order, at most the delay late, all of them on flush."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.relay import CloseKind, Side, TunnelRecord
from tunnelkit.tunnel_log import TunnelLog


def record(client: str) -> TunnelRecord:
    return TunnelRecord(
        client=client,
        backend="b:1",
        backend_address="127.0.0.1:1",
        bytes_up=1,
        bytes_down=2,
        duration=0.5,
        connect_time=0.1,
        closed_by=Side.CLIENT,
        close_kind=CloseKind.FIN,
        reason="client sent FIN",
    )


def closed_clients(events: list[LogEvent]) -> list[str]:
    return [e["client"] for e in events if e.get("event") == "tunnel_closed"]


def test_batched_in_order_within_the_delay() -> None:
    clock = Clock()
    log = TunnelLog(clock, delay=0.02)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        log(record("a:1"), "l")
        clock.advance(0.01)
        log(record("b:2"), "l")
        assert closed_clients(events) == []
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(0.01)
        assert closed_clients(events) == ["a:1", "b:2"]
        assert clock.getDelayedCalls() == []
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_flush_emits_now() -> None:
    clock = Clock()
    log = TunnelLog(clock)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        log(record("a:1"), "l")
        log.flush()
        assert closed_clients(events) == ["a:1"]
        assert clock.getDelayedCalls() == []
        log.flush()
        assert closed_clients(events) == ["a:1"]
    finally:
        globalLogPublisher.removeObserver(events.append)
