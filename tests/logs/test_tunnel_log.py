"""The access log's batching: events leave in order, at most the delay late, all of them on flush, to one sink call."""

from __future__ import annotations

from records import a_record
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.logs.tunnel_log import Batch, TunnelLog, tunnel_fields


def closed_clients(events: list[LogEvent]) -> list[str]:
    return [e["client"] for e in events if e.get("event") == "tunnel_closed"]


def test_batched_in_order_within_the_delay() -> None:
    clock = Clock()
    log = TunnelLog(clock, delay=0.02)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        log(a_record("a:1"), "l")
        clock.advance(0.01)
        log(a_record("b:2"), "l")
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
        log(a_record("a:1"), "l")
        log.flush()
        assert closed_clients(events) == ["a:1"]
        assert clock.getDelayedCalls() == []
        log.flush()
        assert closed_clients(events) == ["a:1"]
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_batch_is_one_sink_call() -> None:
    """The records queued within the delay reach the sink together, in order; an empty flush calls nothing."""
    clock = Clock()
    batches: list[list[str]] = []

    def sink(batch: Batch) -> None:
        batches.append([f"{record.client}@{listener}" for record, listener in batch])

    log = TunnelLog(clock, sink=sink)
    log(a_record("a:1"), "l1")
    log(a_record("b:2"), "l2")
    clock.advance(0.02)
    log.flush()
    log(a_record("c:3"), "l1")
    log.flush()
    assert batches == [["a:1@l1", "b:2@l2"], ["c:3@l1"]]


def test_unnamed_unix_client_is_a_dash() -> None:
    """A client without an address (an unnamed UNIX socket) is "-" in the text and the field, never a leading space."""
    fields = tunnel_fields(a_record(""), "unix:/run/tk.sock")
    assert fields["client"] == "-"
    assert str(fields["text"]).startswith("- -> b:80 (127.0.0.1:80) FIN by client")
