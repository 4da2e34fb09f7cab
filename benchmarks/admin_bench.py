"""What ``--admin`` costs: CPU per short connection of the proxy, and the time of one scrape.

    .venv/bin/python benchmarks/admin_bench.py [--connections 4000] [--reps 3]

Per connection: ``twistd -n tunnelkit`` on the native engine with
``--no-access-log`` (where ``--admin`` makes the engine hand its records
back, to time them) and with the access log (where it only adds the
histogram's hook), each with and without ``--admin``; the proxy's CPU time
(``/proc/PID/stat``) over ``--connections`` sequential connect-send-receive-close
rounds through it to a threaded echo backend, best of ``--reps``, in µs.

Per scrape: the wall time of ``GET /metrics`` (best of 20) against a process
of 4 listeners with 8 backends each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def echo_backend() -> tuple[str, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    host, port = server.getsockname()
    return f"{host}:{port}", server


def start(*args: str, admin: bool) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """twistd with a JSON log; the bound addresses of its listener (and ``admin`` endpoint)."""
    argv = [str(BIN / "twistd"), "-n", "--logger", "tunnelkit.json_log.observer", "tunnelkit"]
    proc = subprocess.Popen([*argv, *args], stdout=subprocess.PIPE, cwd=tempfile.mkdtemp())
    assert proc.stdout is not None
    found: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip(b"\x1e \n")
        if line.startswith(b"{"):
            event = json.loads(line)
            if event.get("event") in ("listening", "admin_listening"):
                found.setdefault(event["event"], event["address"])
        if "listening" in found and (not admin or "admin_listening" in found):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, found
    raise SystemExit(f"{args}: did not start")


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rounds(address: str, count: int) -> None:
    host, port = address.rsplit(":", 1)
    for _ in range(count):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"


def per_connection(backend: str, count: int, reps: int, *extra: str) -> float:
    best = float("inf")
    argv = ("--listen", "127.0.0.1:0", "--to", backend, "--engine", "native", *extra)
    proc, found = start(*argv, admin="--admin" in extra)
    try:
        rounds(found["listening"], 200)  # warm up
        for _ in range(reps):
            before = cpu(proc.pid)
            rounds(found["listening"], count)
            best = min(best, (cpu(proc.pid) - before) / count * 1e6)
    finally:
        proc.terminate()
        proc.wait()
    return best


def scrape(backends: list[str]) -> float:
    config = Path(tempfile.mkdtemp()) / "tk.toml"
    tables = "".join(
        f'[[listener]]\nlisten = "127.0.0.1:0"\nto = {json.dumps(backends)}\n\n' for _ in range(4)
    )
    config.write_text('admin = "127.0.0.1:0"\n\n' + tables)
    proc, found = start("--config", str(config), admin=True)
    try:
        url = f"http://{found['admin_listening']}/metrics"
        best = float("inf")
        for _ in range(20):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as answer:
                answer.read()
            best = min(best, time.perf_counter() - started)
        return best * 1e3
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    backend, server = echo_backend()
    admin = ("--admin", "127.0.0.1:0")
    for label, extra in (("--no-access-log", ("--no-access-log",)), ("access log", ())):
        plain = per_connection(backend, args.connections, args.reps, *extra)
        with_admin = per_connection(backend, args.connections, args.reps, *extra, *admin)
        print(f"{label:16} CPU per connection: {plain:6.1f} µs, with --admin {with_admin:6.1f} µs")
    # Backends are never dialled here (no client, no health checks): any addresses do.
    backends = [f"127.0.0.{i}:9" for i in range(1, 9)]
    print(f"GET /metrics, 4 listeners x 8 backends: {scrape(backends):.2f} ms")
    server.close()


if __name__ == "__main__":
    main()
