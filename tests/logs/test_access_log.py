"""``--access-log``'s file sink in memory: its lines, one write per batch, failures, reopening."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from records import a_record
from twisted.logger import LogEvent, formatEvent, formatTime, globalLogPublisher

from tunnelkit.logs.access_file import AccessLogFile
from tunnelkit.logs.tunnel_log import log_tunnel_closed, tunnel_text
from tunnelkit.relay.tunnel import TunnelRecord


class FakeClock:
    """``time.time`` for the sink: returns ``now`` (set by the test)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Every log event published during the test."""
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def named(events: list[LogEvent], name: str) -> list[LogEvent]:
    return [e for e in events if e.get("event") == name]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def detailed_record() -> TunnelRecord:
    """A record with the details a CONNECT tunnel over TLS, spliced, adds."""
    record = a_record("[2001:db8::1]:4000")
    record.details.update(
        mode="connect",
        target="example.org:443",
        status=200,
        user="alice",
        tls_version="TLSv1.3",
        sni="proxy.example",
        spliced=True,
    )
    return record


def test_text_line_is_twistds_timestamp_and_the_events_text(tmp_path: Path) -> None:
    """A text line is the timestamp twistd would print, a space and the event's text, in batch order."""
    clock = FakeClock(1_764_652_985.25)
    sink = AccessLogFile(str(tmp_path / "a.log"), "text", clock=clock)
    first, second = a_record("127.0.0.1:1"), detailed_record()
    sink([(first, "8888"), (second, "8443")])
    stamp = formatTime(clock.now)
    assert lines(tmp_path / "a.log") == [
        f"{stamp} {tunnel_text(first)}",
        f"{stamp} {tunnel_text(second)}",
    ]


def test_json_line_has_exactly_the_events_fields_and_time(
    tmp_path: Path, events: list[LogEvent]
) -> None:
    """A JSON line carries the fields twisted.logger's tunnel_closed has (details too), plus time."""
    clock = FakeClock(1_764_652_985.125)
    sink = AccessLogFile(str(tmp_path / "a.json"), "json", clock=clock)
    record = detailed_record()
    sink([(record, "8443")])
    log_tunnel_closed(record, "8443")
    [event] = named(events, "tunnel_closed")
    fields = {k: v for k, v in event.items() if not k.startswith("log_")}
    [line] = lines(tmp_path / "a.json")
    assert json.loads(line) == {"time": clock.now, **fields}
    assert fields["target"] == "example.org:443" and fields["spliced"] is True


def test_timestamp_is_formatted_once_per_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached timestamp is reused within a second and renewed at the next one."""
    formatted: list[float] = []
    strftime = time.strftime

    def counting(fmt: str, when: Any = None) -> str:
        formatted.append(time.mktime(when))
        return strftime(fmt, when)

    monkeypatch.setattr(time, "strftime", counting)
    clock = FakeClock(1000.1)
    path = tmp_path / "a.log"
    sink = AccessLogFile(str(path), "text", clock=clock)
    stamps = []
    for now in (1000.1, 1000.999, 1001.0, 1001.5, 999.9):
        clock.now = now
        sink([(a_record(), "l")])
        stamps.append(lines(path)[-1].split(" ")[0])
    monkeypatch.undo()  # formatTime below calls time.strftime too
    assert formatted == [1000, 1001, 999]
    assert stamps == [formatTime(t) for t in (1000, 1000, 1001, 1001, 999)]


def spy_writes(monkeypatch: pytest.MonkeyPatch, fail: Callable[[], OSError | None]) -> list[int]:
    """Count os.write calls (their sizes); each raises what ``fail()`` returns, if anything."""
    sizes: list[int] = []
    real = os.write

    def write(fd: int, data: Any) -> int:
        sizes.append(len(data))
        error = fail()
        if error is not None:
            raise error
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return sizes


def test_a_batch_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 records flushed together reach the file with a single write(2)."""
    path = tmp_path / "a.log"
    sink = AccessLogFile(str(path), "text")
    sizes = spy_writes(monkeypatch, lambda: None)
    sink([(a_record(f"127.0.0.1:{port}"), "l") for port in range(1, 201)])
    assert len(sizes) == 1
    assert sizes[0] == path.stat().st_size
    assert len(lines(path)) == 200


def test_a_write_error_is_logged_once_and_writing_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[LogEvent]
) -> None:
    """ENOSPC: the failing batches are dropped without raising, said once per outage; the next good write says how many were lost (1 record, 6 records)."""
    path = tmp_path / "a.log"
    sink = AccessLogFile(str(path), "text")
    full = [True]
    spy_writes(
        monkeypatch, lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full[0] else None
    )
    for client in ("a:1", "b:2", "c:3"):
        sink([(a_record(client), "l"), (a_record(client), "l")])
    full[0] = False
    sink([(a_record("d:4"), "l")])
    sink([(a_record("e:5"), "l")])
    full[0] = True
    sink([(a_record("f:6"), "l")])
    full[0] = False
    sink([(a_record("g:7"), "l")])
    [failed, _] = named(events, "access_log_write_failed")
    assert (failed["path"], failed["reason"]) == (str(path), "No space left on device")
    assert failed["log_level"].name == "error"
    resumed = named(events, "access_log_write_resumed")
    assert [event["dropped"] for event in resumed] == [6, 1]
    assert [formatEvent(event).rpartition("dropping ")[2] for event in resumed] == [
        "6 records",
        "1 record",
    ]
    assert [line.split(" ")[1] for line in lines(path)] == ["d:4", "e:5", "g:7"]


def test_reopen_after_rename_writes_to_the_new_file(tmp_path: Path, events: list[LogEvent]) -> None:
    """logrotate renames the file; reopen() creates the path anew and later batches go there."""
    path, rotated = tmp_path / "a.log", tmp_path / "a.log.1"
    sink = AccessLogFile(str(path), "text")
    sink([(a_record("old:1"), "l")])
    path.rename(rotated)
    sink([(a_record("old:2"), "l")])
    sink.reopen()
    sink([(a_record("new:3"), "l")])
    assert [line.split(" ")[1] for line in lines(rotated)] == ["old:1", "old:2"]
    assert [line.split(" ")[1] for line in lines(path)] == ["new:3"]
    assert [e["path"] for e in named(events, "access_log_reopened")] == [str(path)]


def test_a_failed_reopen_keeps_writing_to_the_old_file(
    tmp_path: Path, events: list[LogEvent]
) -> None:
    """The path cannot be opened (a directory took its place): the error is logged, records still land in the old file."""
    path, rotated = tmp_path / "a.log", tmp_path / "a.log.1"
    sink = AccessLogFile(str(path), "text")
    path.rename(rotated)
    path.mkdir()
    sink.reopen()
    sink([(a_record("kept:1"), "l")])
    [failed] = named(events, "access_log_reopen_failed")
    assert (failed["path"], failed["reason"]) == (str(path), "Is a directory")
    assert failed["log_level"].name == "error"
    assert [line.split(" ")[1] for line in lines(rotated)] == ["kept:1"]


def test_a_relative_path_is_reopened_where_it_was_first_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twistd may change directory (--rundir) after the options are parsed: the path stays the one given."""
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    sink = AccessLogFile("a.log", "text")
    monkeypatch.chdir(elsewhere)
    (tmp_path / "a.log").rename(tmp_path / "a.log.1")
    sink.reopen()
    sink([(a_record("new:1"), "l")])
    assert len(lines(tmp_path / "a.log")) == 1
    assert not (elsewhere / "a.log").exists()


def test_after_close_a_batch_is_dropped_not_raised(tmp_path: Path, events: list[LogEvent]) -> None:
    """A record after the file was closed (shutdown) is dropped with one error, and reopen() stays shut."""
    sink = AccessLogFile(str(tmp_path / "a.log"), "text")
    sink.close()
    sink([(a_record(), "l")])
    sink.reopen()
    assert len(named(events, "access_log_write_failed")) == 1
    assert named(events, "access_log_reopened") == []
    assert sink.fd == -1
