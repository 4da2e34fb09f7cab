"""CPU per ``tunnel_closed`` record: twistd's log (text, JSON) against ``--access-log`` (text, JSON).

    .venv/bin/python benchmarks/access_log_bench.py [--records 20000] [--batch 100] [--reps 5]

The old paths are what ``twistd --logfile`` and ``twistd --logger
tunnelkit.json_log.observer`` run: the event goes through twisted.logger's
global publisher to ``textFileLogObserver`` on a ``LogFile`` (classic text
rendering, ``formatTime``, one write(2) per line) or to
``jsonFileLogObserver`` (every field, one write(2) per line).
The new paths are :class:`tunnelkit.logs.twistd_text.TwistdText` (what a
process logging to twistd's text log does now: the same lines, a batch per
write) and :class:`tunnelkit.logs.access_file.AccessLogFile` (``--access-log``),
each the sink of the same :class:`TunnelLog` batching. Records are queued and flushed in
batches of ``--batch`` (about what 20 ms collect at 5,000 connections/s);
the figure is the best of ``--reps`` runs, in µs per record, files in a
temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import (
    globalLogBeginner,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

from tunnelkit.logs.access_file import FORMATS, AccessLogFile
from tunnelkit.logs.tunnel_log import Batch, TunnelLog, emit_events
from tunnelkit.logs.twistd_text import TwistdText
from tunnelkit.relay.tunnel import CloseKind, Side, TunnelRecord


def records(count: int) -> list[TunnelRecord]:
    """``count`` records of short clean tunnels, each from another client port."""
    return [
        TunnelRecord(
            client=f"127.0.0.1:{30000 + i % 30000}",
            backend="127.0.0.1:8080",
            backend_address="127.0.0.1:8080",
            bytes_up=79,
            bytes_down=149 + i % 7,
            duration=0.000734,
            connect_time=0.000121,
            closed_by=Side.CLIENT,
            close_kind=CloseKind.FIN,
            reason="client sent FIN",
        )
        for i in range(count)
    ]


def per_record(sink: Callable[[Batch], None], items: list[TunnelRecord], batch: int) -> float:
    """µs per record to queue ``items`` and flush them every ``batch`` through ``sink``."""
    log = TunnelLog(Clock(), sink=sink)
    started = time.perf_counter()
    for i, record in enumerate(items, 1):
        log(record, "8888")
        if i % batch == 0:
            log.flush()
    log.flush()
    return (time.perf_counter() - started) / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    items = records(args.records)
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False, discardBuffer=True)
    with (
        tempfile.TemporaryDirectory(prefix="access-log-bench-") as tmp,
        open(Path(tmp) / "twistd.json", "w") as twistd_json,
    ):
        directory = Path(tmp)
        # As twistd --logfile and --logger tunnelkit.json_log.observer set up the global publisher.
        twistd_text = LogFile("twistd.log", str(directory))
        observers = {
            "twistd --logfile (textFileLogObserver, LogFile)": textFileLogObserver(twistd_text),
            "twistd --logger tunnelkit.json_log.observer": jsonFileLogObserver(twistd_json),
        }
        print(f"{args.records} records, batches of {args.batch}, best of {args.reps}:")
        for name, observer in observers.items():
            globalLogPublisher.addObserver(observer)
            report(name, [per_record(emit_events, items, args.batch) for _ in range(args.reps)])
            if name.startswith("twistd --logfile"):
                # The default since issue 18: twistd's lines, a batch per write.
                direct = TwistdText()
                figures = [per_record(direct, items, args.batch) for _ in range(args.reps)]
                report("twistd --logfile, written a batch at a time (the default)", figures)
            globalLogPublisher.removeObserver(observer)
        for fmt in FORMATS:
            sink = AccessLogFile(str(directory / f"access.{fmt}"), fmt)
            name = f"--access-log-format {fmt}"
            report(name, [per_record(sink, items, args.batch) for _ in range(args.reps)])
            sink.close()
        twistd_text.close()


def report(name: str, figures: list[float]) -> None:
    print(f"  {name:<50} {min(figures):6.2f} µs/record")


if __name__ == "__main__":
    main()
