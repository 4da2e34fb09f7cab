"""Small-datagram rate through a ``udp:`` listener (Twisted's plane) against socat and no proxy.

    .venv/bin/python benchmarks/udp_bench.py [--seconds 5] [--size 64] [--window 32] [--clients 4]
    .venv/bin/python benchmarks/udp_bench.py --iperf [--rate 200M] [--seconds 5]

An echo backend (a process of its own) answers each datagram; ``--clients``
client sockets each keep ``--window`` datagrams of ``--size`` bytes in
flight and send the next one for each reply, for ``--seconds``. The figure is
replies per second over all clients, and the proxy's CPU seconds (user +
system, from /proc) per million datagrams relayed (each request and each
reply counts). socat is ``socat UDP-LISTEN:P,fork,reuseaddr UDP:BACKEND``
(a process per client). Loopback only; the clients run in this process.

``--iperf`` runs ``iperf3 -u`` at a fixed offered rate (``--rate``,
1,400-byte datagrams) through each row instead, and reports what the
receiver got, the loss and the jitter, and the proxy's CPU seconds. iperf3
also needs its TCP control connection forwarded on the same port: tunnelkit
gets a TCP and a UDP listener (a ``--config`` file), socat two processes.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ECHO = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('127.0.0.1',0))\n"
    "print(s.getsockname()[1],flush=True)\n"
    "while True:\n d,a=s.recvfrom(65536);s.sendto(d,a)\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU of ``pid`` and its live children (socat forks one per client)."""
    total = cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += tree_cpu(int(child))
    return total


def drive(port: int, seconds: float, size: int, window: int, clients: int) -> int:
    """Replies received in ``seconds`` by ``clients`` sockets keeping ``window`` datagrams in flight."""
    payload = b"x" * size
    selector = selectors.DefaultSelector()
    socks = []
    for _ in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    # One datagram first: the proxy opens its session before the window is sent.
    for sock in socks:
        sock.send(payload)
    replies, deadline = 0, time.monotonic() + seconds
    started = False
    while time.monotonic() < deadline:
        events = selector.select(timeout=1.0)
        if not events:  # a lost datagram: top the window up again
            for sock in socks:
                sock.send(payload)
            continue
        for key, _ in events:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
                replies += 1
                sock.send(payload)
        if not started:
            started = True
            for sock in socks:
                for _ in range(window - 1):
                    sock.send(payload)
    for sock in socks:
        selector.unregister(sock)
        sock.close()
    return replies


def start(argv: list[str], ready: str | None) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    if ready is not None:
        assert process.stdout is not None
        for line in process.stdout:
            if ready in line:
                break
    else:
        time.sleep(0.5)
    return process


def stop(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(10)


def iperf_row(name: str, rate: str, seconds: float, tmp: Path) -> str:
    """One ``iperf3 -u`` run through the proxy ``name`` (``direct``: to the server)."""
    port, backend = free_port(), free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(backend)], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    proxies: list[subprocess.Popen[str]] = []
    if name == "tunnelkit":
        config = tmp / "tk.toml"
        config.write_text(
            f'[[listener]]\nlisten = "127.0.0.1:{port}"\nto = "127.0.0.1:{backend}"\n'
            f'[[listener]]\nlisten = "udp:127.0.0.1:{port}"\nto = "udp:127.0.0.1:{backend}"\n'
            "no-access-log = true\n"
        )
        tk = [str(BIN / "twistd"), "-n", "--pidfile=", "tunnelkit", "--config", str(config)]
        proxies.append(start(tk, "(udp:"))
    elif name == "socat":
        tcp = f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"
        udp = f"UDP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"
        proxies.append(start(["socat", tcp, f"TCP:127.0.0.1:{backend}"], None))
        proxies.append(start(["socat", udp, f"UDP:127.0.0.1:{backend}"], None))
    target = backend if name == "direct" else port
    before = sum(tree_cpu(p.pid) for p in proxies)
    client = subprocess.run(
        [
            *("iperf3", "-c", "127.0.0.1", "-p", str(target), "-u", "-b", rate, "-l", "1400"),
            *("-t", f"{seconds:g}", "-J"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    cpu = sum(tree_cpu(p.pid) for p in proxies) - before
    for process in proxies:
        stop(process)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:  # the test's end never reached it
        server.kill()
        server.wait()
    outcome = json.loads(client.stdout)
    if "error" in outcome:
        return f"{name:<10} iperf3: {outcome['error']}"
    result = outcome["end"]["sum"]
    received = result["bits_per_second"] * (1 - result["lost_percent"] / 100) / 1e6
    return (
        f"{name:<10} {received:>10.0f} {result['lost_percent']:>8.2f} "
        f"{result['jitter_ms']:>10.3f} {cpu:>8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--iperf", action="store_true", help="iperf3 -u at --rate instead")
    parser.add_argument("--rate", default="200M")
    args = parser.parse_args()
    if args.iperf:
        print(f"iperf3 -u -b {args.rate} -l 1400 for {args.seconds:g} s")
        print(f"{'row':<10} {'recv Mb/s':>10} {'loss %':>8} {'jitter ms':>10} {'CPU s':>8}")
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("direct", "tunnelkit", "socat"):
                print(iperf_row(name, args.rate, args.seconds, Path(tmp)))
        return
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    backend = int(echo.stdout.readline())
    try:
        rows = [("direct", None, backend)]
        port = free_port()
        tk = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "tunnelkit",
            "--listen",
            f"udp:127.0.0.1:{port}",
        ]
        tk += ["--to", f"udp:127.0.0.1:{backend}", "--no-access-log"]
        rows.append(("tunnelkit", start(tk, "listening on"), port))
        port2 = free_port()
        socat = [
            "socat",
            f"UDP-LISTEN:{port2},bind=127.0.0.1,fork,reuseaddr",
            f"UDP:127.0.0.1:{backend}",
        ]
        rows.append(("socat", start(socat, None), port2))
        print(
            f"{args.clients} clients x {args.window} in flight, {args.size}-byte datagrams, {args.seconds:g} s"
        )
        print(f"{'row':<10} {'replies/s':>10} {'proxy CPU s per M datagrams':>28}")
        for name, process, target in rows:
            before = tree_cpu(process.pid) if process else 0.0
            replies = drive(target, args.seconds, args.size, args.window, args.clients)
            cpu = (tree_cpu(process.pid) - before) if process else 0.0
            per_million = cpu / (2 * replies) * 1e6 if process and replies else float("nan")
            print(f"{name:<10} {replies / args.seconds:>10.0f} {per_million:>28.2f}")
        for _, process, _ in rows:
            if process is not None:
                stop(process)
    finally:
        echo.kill()
        echo.wait()


if __name__ == "__main__":
    main()
