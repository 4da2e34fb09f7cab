"""CPU per connection of the native engine with the per-client limits off and on.

    .venv/bin/python benchmarks/limits_bench.py [--connections 20000] [--reps 3]

Why: the engine looks each accepted client up in its per-client table (a
hash of the address, in C) and releases it when the tunnel ends; this says
what that costs a short connection, against the same engine without limits.
Each row starts ``twistd -n tunnelkit --engine native --no-access-log`` to an
echo backend (``backends.py echo``) and makes ``--connections`` short
connections one after another (connect, 1 byte there and back, close), then
reads the proxy's CPU (user + system, ``/proc``) before and after: µs per
connection, the median of ``--reps`` (rows interleaved per repetition). No
connection is refused: the limits are set high enough for none to apply.

Rows: ``off``; ``on, one address`` (every client from 127.0.0.1, so one
entry, found each time); ``on, new addresses`` (each client from another
address of 127.1.0.0/16, each forgotten when its tunnel ends: an insert and a
free per connection); ``on, new addresses kept`` (a slow rate, so each idle
client is kept until 16,384 are and the oldest is then forgotten: a flood of
addresses at its worst). The client's own CPU is not counted.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import procs
from peers import twistd_argv

#: Linux's socket option (not in Python's socket module before 3.12).
IP_BIND_ADDRESS_NO_PORT = 24

ROWS: dict[str, tuple[tuple[str, ...], bool]] = {
    "off": ((), False),
    "on, one address": (("--max-conn-per-client", "1000", "--rate-per-client", "1000000"), False),
    "on, new addresses": (("--max-conn-per-client", "1000", "--rate-per-client", "1000000"), True),
    "on, new addresses kept": (
        ("--max-conn-per-client", "1000", "--rate-per-client", "1/m", "--rate-burst", "5"),
        True,
    ),
}


def source(index: int, spread: bool) -> str:
    """The client address of connection ``index``: 127.0.0.1, or one of 127.1.0.0/16 in turn."""
    if not spread:
        return "127.0.0.1"
    index %= 65_534
    return f"127.1.{(index + 1) >> 8}.{(index + 1) & 255}"


def connections(port: int, count: int, spread: bool, start: int) -> None:
    """``count`` short connections through 127.0.0.1:``port``, each a 1-byte echo."""
    for i in range(start, start + count):
        with socket.socket() as sock:
            sock.settimeout(10)
            # The port is picked at connect(), which may reuse one in TIME_WAIT
            # (bind() alone would run out of ports from one address).
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source(i, spread), 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise procs.BenchError(f"connection {i}: no echo (refused?)")


def measure(tmp: Path, backend: int, args: tuple[str, ...], spread: bool, count: int) -> float:
    """µs of the proxy's CPU per connection for one row."""
    port = procs.free_port()
    argv = twistd_argv(tmp, "tunnelkit", "tunnelkit", "--engine", "native", "--no-access-log")
    argv += ["--listen", f"127.0.0.1:{port}", "--to", f"127.0.0.1:{backend}", *args]
    with procs.Proc("tunnelkit", argv, tmp / "tunnelkit.out") as proxy:
        proxy.wait_port(port)
        connections(port, 500, spread, 100_000)  # warm up, other addresses than measured
        before = procs.cpu_seconds(proxy.pid)
        connections(port, count, spread, 0)
        after = procs.cpu_seconds(proxy.pid)
    return (after - before) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory(prefix="limits-bench-") as directory:
        tmp = Path(directory)
        echo = procs.Proc("echo", [sys.executable, "benchmarks/backends.py", "echo"], tmp / "e.log")
        with echo:
            found = echo.wait_for(lambda: "listening on" in echo.output(), "listening", 10)
            assert found
            backend = int(echo.output().split("listening on 127.0.0.1:")[1].split()[0])
            for rep in range(args.reps):
                rows = list(ROWS)
                rows = rows[rep % len(rows) :] + rows[: rep % len(rows)]
                for row in rows:
                    extra, spread = ROWS[row]
                    figures[row].append(measure(tmp, backend, extra, spread, args.connections))
    print(f"{args.connections} connections per row, median of {args.reps}:")
    for row, values in figures.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {row:<24} {statistics.median(values):6.1f} µs/connection  ({spread})")


if __name__ == "__main__":
    main()
