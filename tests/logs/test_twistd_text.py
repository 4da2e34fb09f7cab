"""The default tunnel log writes twistd's own text lines a batch at a time, and events when anyone else listens.

The lines must be exactly what twistd's text observer would have written for
the ``tunnel_closed`` events (log tools and tests/processes.py parse them), so
each test here compares against Twisted's own observer fed the same events.
Twisted's private attributes the sink reads are pinned here too: if a
Twisted upgrade moves them, these tests fail rather than the log going quiet.
"""

from __future__ import annotations

import io
from pathlib import Path

import attrs
import pytest
from loopback import ThreadedServer, connect, echo, recv_exactly
from processes import assert_clean_stop, tunnel_closed_events, twistd
from records import a_record
from twisted.logger import (
    FileLogObserver,
    LogEvent,
    LogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)

from tunnelkit.logs.tunnel_log import TunnelLog, emit_events, log_tunnel_closed
from tunnelkit.logs.twistd_text import TwistdText, text_file
from tunnelkit.relay.tunnel import TunnelRecord

#: A fixed moment in the middle of a second, so the two renderings agree on it.
NOW = 1_796_000_000.25


def record(reason: str = "client closed", client: str = "127.0.0.1:50000") -> TunnelRecord:
    """A record with mode fields, which the line does not show but the events carry."""
    return attrs.evolve(
        a_record(client, reason), details={"mode": "connect", "target": "example.org:443"}
    )


BATCH = [(record(), "8888"), (record("said\nthree\nlines"), "8888"), (record(client=""), "unix")]


def twisteds_lines(batch: list[tuple[TunnelRecord, str]]) -> str:
    """What twistd's text observer writes for the events of ``batch``, emitted at NOW."""
    out = io.StringIO()
    observer = textFileLogObserver(out)

    def at_now(event: LogEvent) -> None:
        observer({**event, "log_time": NOW})

    from tunnelkit.logs import tunnel_log

    publisher = LogPublisher(at_now)
    saved = tunnel_log.log.observer
    tunnel_log.log.observer = publisher
    try:
        for each, listener in batch:
            log_tunnel_closed(each, listener)
    finally:
        tunnel_log.log.observer = saved
    return out.getvalue()


def test_the_lines_are_twisteds_own() -> None:
    """Byte for byte what twistd's observer writes, multi-line reasons and unnamed clients included."""
    assert TwistdText().lines(BATCH, NOW) == twisteds_lines(BATCH)


def test_a_batch_is_written_with_one_write_when_twistds_observer_is_alone() -> None:
    writes: list[str] = []

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    publisher = LogPublisher(textFileLogObserver(Out()))
    events: list[object] = []
    TwistdText(publisher, clock=lambda: NOW, events=events.append)(BATCH)
    assert writes == [twisteds_lines(BATCH)]
    assert events == []


def test_a_binary_file_gets_utf8() -> None:
    out = io.BytesIO()
    publisher = LogPublisher(textFileLogObserver(out))
    batch = [(record("caf\u00e9"), "8888")]
    TwistdText(publisher, clock=lambda: NOW)(batch)
    assert out.getvalue() == twisteds_lines(batch).encode("utf-8")


@pytest.mark.parametrize(
    "observers",
    [
        pytest.param(lambda: [jsonFileLogObserver(io.StringIO())], id="twistd --logger json"),
        pytest.param(
            lambda: [textFileLogObserver(io.StringIO()), lambda event: None], id="two observers"
        ),
        pytest.param(
            lambda: [textFileLogObserver(io.StringIO(), "%H:%M")], id="another time format"
        ),
        pytest.param(lambda: [FileLogObserver(io.StringIO(), str)], id="another formatter"),
        pytest.param(lambda: [], id="no observer yet"),
    ],
)
def test_anyone_else_listening_gets_the_events(observers) -> None:  # type: ignore[no-untyped-def]
    """Any other set of observers: one twisted.logger event per record, as before."""
    publisher = LogPublisher(*observers())
    batches: list[object] = []
    TwistdText(publisher, clock=lambda: NOW, events=batches.append)(BATCH)
    assert batches == [BATCH]


def test_twisteds_private_parts_are_where_the_sink_reads_them() -> None:
    """``_observers``, ``_outFile``, ``_encoding`` and the formatter's name and time format."""
    out = io.StringIO()
    observer = textFileLogObserver(out)
    assert LogPublisher(observer)._observers == [observer]
    assert text_file(observer) == (out, False)
    assert emit_events is TwistdText().events


def test_tunnel_log_batches_reach_twistd_text() -> None:
    """TunnelLog hands its batches to the sink in order (the default sink of a process)."""
    out = io.StringIO()
    sink = TwistdText(LogPublisher(textFileLogObserver(out)), clock=lambda: NOW)
    from twisted.internet.task import Clock

    clock = Clock()
    tunnels = TunnelLog(clock, sink=sink)
    for each, listener in BATCH:
        tunnels(each, listener)
    clock.advance(1)
    assert out.getvalue() == twisteds_lines(BATCH)


def three_tunnels(text: str) -> list[dict[str, object]] | None:
    found = tunnel_closed_events(text)
    return found if len(found) >= 3 else None


@pytest.mark.parametrize("engine", ["native", "python"])
def test_twistd_writes_its_own_lines_a_batch_at_a_time(tmp_path: Path, engine: str) -> None:
    """``twistd -n tunnelkit`` on either plane: the direct path is taken, the lines are twistd's."""
    backend = ThreadedServer(echo)
    try:
        argv = ("--listen", "127.0.0.1:0", "--to", backend.address, "--engine", engine)
        with twistd(*argv, cwd=tmp_path) as tk:
            [address] = tk.wait_listening()
            for _ in range(3):
                with connect(address) as sock:
                    sock.sendall(b"x")
                    assert recv_exactly(sock, 1) == b"x"
            events = tk.wait_for(three_tunnels, "three tunnel_closed lines", 10)
            assert "tunnel records: written straight to twistd's text log" in tk.output
            assert_clean_stop(tk, tk.stop())
    finally:
        backend.close()
    assert [event["bytes_up"] for event in events] == [1, 1, 1]
    lines = [line for line in tk.output.splitlines() if "[tunnelkit.tunnel#info]" in line]
    assert len(lines) == 3, tk.output
