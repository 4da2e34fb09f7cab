"""UDP forwarding end to end: ``twistd -n tunnelkit`` with real clients (dig, socat) and servers (dnsmasq)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import assert_clean_stop, json_events, need, run, start, twistd

JSON_LOG = ("--logger", "tunnelkit.json_log.observer")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[int]:
    """dnsmasq on 127.0.0.1 serving two local records (and nothing upstream); its port."""
    port = _free_udp_port()
    argv = [need("dnsmasq"), "-k", "--conf-file=/dev/null", f"--port={port}"]
    argv += ["--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts"]
    argv += ["--pid-file=", "--log-facility=-", "--log-queries"]
    argv += [
        "--host-record=www.test.example,192.0.2.53",
        "--host-record=db.test.example,192.0.2.54",
    ]
    with start(argv, tmp_path) as server:
        server.wait_for(lambda text: "started" in text, "dnsmasq started")
        yield port


@pytest.fixture
def echo() -> Iterator[int]:
    """A UDP echo server on 127.0.0.1 in a thread; its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                datagram, peer = sock.recvfrom(65536)
            except TimeoutError:
                continue
            sock.sendto(datagram, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(5)
    sock.close()


def _records(text: str) -> list[dict[str, Any]]:
    return [e for e in json_events(text) if e.get("event") == "udp_session_closed"]


def test_dig_through_tunnelkit_to_dnsmasq(tmp_path: Path, dnsmasq: int) -> None:
    """dig asks dnsmasq through a udp: listener with --udp-replies 1: right answers, one record per query."""
    dig = need("dig")
    process = twistd(
        "--listen", "udp:127.0.0.1:0", "--to", f"udp:127.0.0.1:{dnsmasq}", "--udp-replies", "1",
        cwd=tmp_path, twistd_options=JSON_LOG,
    )  # fmt: skip
    with process:
        [address] = process.wait_listening()
        port = address.rpartition(":")[2]
        for name, expected in (("www", "192.0.2.53"), ("db", "192.0.2.54")):
            answer = run([dig, "+short", "+time=5", "+tries=1", "-p", port, "@127.0.0.1", f"{name}.test.example"], tmp_path)  # fmt: skip
            assert answer.stdout.split() == [expected], answer.stdout
        records = process.wait_for(
            lambda text: len(_records(text)) >= 2 and _records(text), "2 records"
        )
        assert [r["reason"] for r in records] == ["1 reply", "1 reply"]
        assert all((r["datagrams_up"], r["datagrams_down"]) == (1, 1) for r in records)
        assert_clean_stop(process, process.stop())


def test_socat_clients_to_an_echo_backend(tmp_path: Path, echo: int) -> None:
    """Three socat clients at once each get their own random datagram back (SHA-256), then the records."""
    socat = need("socat")
    process = twistd(
        "--listen", "udp:127.0.0.1:0", "--to", f"udp:127.0.0.1:{echo}",
        cwd=tmp_path, twistd_options=JSON_LOG,
    )  # fmt: skip
    with process:
        [address] = process.wait_listening()
        payloads = [os.urandom(size).hex().encode()[:size] for size in (1, 1400, 8000)]
        # -t 1: after its stdin ends, each socat waits up to a second for the reply.
        argv = [socat, "-t", "1", "-b", "65536", "-", f"UDP:{address}"]
        clients = [_start_bytes(argv, payload, tmp_path) for payload in payloads]
        for client, payload in zip(clients, payloads, strict=True):
            assert client.stdout is not None
            out = client.stdout.read()  # to EOF: socat exits a second after its stdin ended
            client.stdout.close()
            assert client.wait(20) == 0
            assert hashlib.sha256(out).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert_clean_stop(process, process.stop())
        records = _records(process.output)
        assert sorted(r["bytes_up"] for r in records) == [1, 1400, 8000]
        assert {r["reason"] for r in records} <= {"shutdown", "idle timeout"}


def _start_bytes(argv: list[str], stdin: bytes, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with ``stdin`` written and closed."""
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd)
    assert process.stdin is not None
    process.stdin.write(stdin)
    process.stdin.close()
    return process


def test_workers_share_the_port_and_keep_each_client_in_one_worker(
    tmp_path: Path, echo: int
) -> None:
    """--workers 2: clients are spread over both workers, and each client's datagrams stay in one session of one worker."""
    process = twistd(
        "--listen", "udp:127.0.0.1:0", "--to", f"udp:127.0.0.1:{echo}", "--workers", "2",
        cwd=tmp_path, twistd_options=JSON_LOG,
    )  # fmt: skip
    with process:
        [address] = process.wait_listening()
        process.wait_for(lambda text: text.count('"worker_ready"') >= 2, "2 workers ready")
        host, _, port = address.rpartition(":")
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
        try:
            for round_ in range(5):
                for index, client in enumerate(clients):
                    client.settimeout(5)
                    datagram = b"%d:%d" % (index, round_)
                    client.sendto(datagram, (host, int(port)))
                    assert client.recvfrom(100) == (datagram, (host, int(port)))
            names = sorted(f"127.0.0.1:{c.getsockname()[1]}" for c in clients)
        finally:
            for client in clients:
                client.close()
        assert_clean_stop(process, process.stop())
        records = _records(process.output)
        assert sorted(r["client"] for r in records) == names  # one session per client
        assert all(r["datagrams_up"] == 5 for r in records)
        assert {r["worker"] for r in records} == {0, 1}
