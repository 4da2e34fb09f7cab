"""TLS termination under stress, on both relay paths: ``twistd -n tunnelkit`` and raw TLS clients.

The client is Python's ``ssl`` over memory BIOs on a blocking socket, so each
test controls exactly what goes out when: data and close_notify in one
burst with the TCP connection left open, a fatal record after data, a
ClientHello cut short by a reset, a receive buffer left full. Checked each
time: every byte (SHA-256), how the stream ended (close_notify, then FIN),
memory and CPU while stalled, and the ``tunnel_closed`` record. Each test
runs on each plane (tests/planes.py): the native engine terminating TLS and
Twisted's path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import random
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from loopback import MiB, Serve, connect, recv_all, recv_outcome, sha256
from planes import Plane, on_each_plane
from processes import MEMORY_CHECKED, proc_status_kib
from test_tls_e2e import PKI, tls_args, tls_proxy
from tls_clients import client_context


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over(pid: int, seconds: float) -> float:
    """CPU seconds ``pid`` uses in the next ``seconds``: a stalled proxy must not spin."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


class RawTLS:
    """A TLS client over memory BIOs on a blocking socket: exact control of what goes out when."""

    def __init__(self, address: str, ctx: ssl.SSLContext, rcvbuf: int | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(15)
        self.sock.connect((host, int(port)))
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("EOF in handshake") from None
                self.inc.write(data)
        self.flush()

    def flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def burst(self, payload: bytes, close_notify: bool) -> None:
        """Encrypt payload (and close_notify) and send it all in one sendall."""
        view = memoryview(payload)
        while view:
            n = self.obj.write(view[: 16 * 1024])
            view = view[n:]
        if close_notify:
            with contextlib.suppress(ssl.SSLWantReadError):
                self.obj.unwrap()
        self.sock.sendall(self.out.read())

    def read_to_end(self, timeout: float = 30) -> tuple[bytes, str]:
        """Plaintext until close_notify (then wait for the TCP FIN) or a bare FIN."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        end = ""
        while time.monotonic() < deadline:
            try:
                chunk = self.obj.read(1 << 20)
                if not chunk:  # Python's ssl: b"" means close_notify
                    end = "close_notify"
                    break
                got += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                end = "close_notify"
                break
            except ssl.SSLEOFError:
                end = "fin"
                break
            self.flush()
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return bytes(got), "timeout"
            if not data:
                self.inc.write_eof()
            else:
                self.inc.write(data)
        if end == "close_notify":
            # then a TCP FIN must follow
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                while data := self.sock.recv(65536):
                    pass
                end = "close_notify+fin"
            except TimeoutError:
                end = "close_notify, no fin"
        return bytes(got), end or "timeout"

    def close(self) -> None:
        self.sock.close()


# -- 1. data and close_notify in one burst, TCP left open ------------------------------


def late_reply(conn: socket.socket) -> tuple[str, bytes]:
    request = recv_all(conn)
    reply = hashlib.sha256(request).digest() * 1000
    conn.sendall(reply)
    conn.shutdown(socket.SHUT_WR)
    return sha256(request), reply


@pytest.mark.parametrize("size", [10, 100_000, 3 * MiB])
@on_each_plane
def test_burst_with_close_notify_tcp_open(
    tmp_path: Path, serve: Serve, pki: PKI, size: int, plane: Plane
) -> None:
    """Data and close_notify in one burst, TCP left open: the backend sees EOF, its late reply arrives, then close_notify and FIN."""
    backend = serve(late_reply)
    pair = pki.pair("localhost")
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        client = RawTLS(proxy.address, client_context(pki.ca_path))
        payload = os.urandom(size)
        client.burst(payload, close_notify=True)
        digest, reply = backend.outcome(timeout=10)  # the backend saw EOF
        assert digest == sha256(payload)
        got, end = client.read_to_end(15)
        client.close()
        assert got == reply
        assert end == "close_notify+fin", end
        [closed] = proxy.closed()
        assert (closed["bytes_up"], closed["bytes_down"]) == (size, len(reply)), closed


# -- 2. the backend pushes to a TLS client that reads nothing ---------------------------


def push_and_close(size: int) -> Any:
    def handler(conn: socket.socket) -> str:
        data = os.urandom(size)
        conn.settimeout(180)
        conn.recv(10)
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)
        return sha256(data)

    return handler


@pytest.mark.parametrize(("size", "rcvbuf"), [(16 * MiB, 65536), (64 * MiB, None)])
@on_each_plane
def test_backend_pushes_to_a_stalled_reader(
    tmp_path: Path, serve: Serve, pki: PKI, *, size: int, rcvbuf: int | None, plane: Plane
) -> None:
    """The backend sends SIZE and closes while the TLS client reads nothing: memory flat, no spin; then every byte, close_notify and FIN."""
    backend = serve(push_and_close(size))
    pair = pki.pair("localhost")
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        pid = proxy.process.pid
        base = proc_status_kib(pid, "VmRSS")
        client = RawTLS(proxy.address, client_context(pki.ca_path), rcvbuf=rcvbuf)
        client.burst(b"go", close_notify=False)
        time.sleep(1.5)  # the client does not read: everything stalls
        spin = cpu_over(pid, 2)
        stalled = proc_status_kib(pid, "VmRSS")
        got, end = client.read_to_end(120)
        client.close()
        digest = backend.outcome(timeout=10)
        proxy.closed()
    assert len(got) == size and sha256(got) == digest
    assert end == "close_notify+fin", end
    assert not MEMORY_CHECKED or (stalled - base) / 1024 < 32, (
        f"RSS grew {(stalled - base) / 1024:.1f} MiB"
    )
    assert spin < 0.3, f"proxy used {spin:.2f} s CPU in 2 s while stalled"


# -- 3. a stalled backend reader and 64 MiB from the TLS client -----------------------


def slow_sink(conn: socket.socket) -> str:
    time.sleep(4)
    data = recv_all(conn)
    conn.shutdown(socket.SHUT_WR)
    return sha256(data)


@on_each_plane
def test_stalled_backend_64mib(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """64 MiB from a TLS client to a backend that reads nothing for 4 s: memory flat, no spin, every byte."""
    size = 64 * MiB
    backend = serve(slow_sink)
    pair = pki.pair("localhost")
    payload = os.urandom(size)
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        pid = proxy.process.pid
        base = proc_status_kib(pid, "VmRSS")
        client = RawTLS(proxy.address, client_context(pki.ca_path))
        sender = threading.Thread(target=client.burst, args=(payload, True))
        sender.start()
        time.sleep(1.5)
        spin = cpu_over(pid, 2)
        stalled = proc_status_kib(pid, "VmRSS")
        sender.join(60)
        digest = backend.outcome(timeout=60)
        _, end = client.read_to_end(15)
        client.close()
        proxy.closed()
    assert digest == sha256(payload)
    assert not MEMORY_CHECKED or (stalled - base) / 1024 < 32, (
        f"RSS grew {(stalled - base) / 1024:.1f} MiB"
    )
    assert end == "close_notify+fin", end
    assert spin < 0.3, f"proxy used {spin:.2f} s CPU in 2 s while stalled"


# -- 4. a client that resets mid-handshake ---------------------------------------------


@on_each_plane
def test_reset_mid_handshake(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """30 clients reset mid-handshake: each logged, no backend dialled, and the next client is served."""

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    backend = serve(echo)
    pair = pki.pair("localhost")
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        ctx = client_context(pki.ca_path)
        for i in range(30):
            sock = connect(proxy.address)
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
            hello = out.read()
            sock.sendall(hello if i % 3 else hello[: len(hello) // 2])
            if i % 2:
                time.sleep(0.05)  # the server's flight is on its way / sent
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        events = proxy.closed(30)
        assert all(e["close_kind"] in ("error", "RST", "FIN") for e in events), events
        assert backend.accepted == 0
        client = RawTLS(proxy.address, ctx)
        client.burst(b"ping", close_notify=False)
        client.sock.settimeout(5)
        got = b""
        while len(got) < 4:
            try:
                got += client.obj.read(10)
            except ssl.SSLWantReadError:
                client.inc.write(client.sock.recv(1000))
        assert got == b"ping"
        client.close()
        proxy.closed(31)


# -- 5. 200 concurrent TLS clients, random sizes both ways ------------------------------


def sized_reply(conn: socket.socket) -> str:
    header = b""
    while not header.endswith(b"\n"):
        header += conn.recv(1)
    up, down = map(int, header.split())
    data = recv_all(conn)
    assert len(data) == up
    reply = random.Random(up ^ down).randbytes(down)
    conn.sendall(reply)
    conn.shutdown(socket.SHUT_WR)
    return sha256(data)


@on_each_plane
def test_200_concurrent(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """200 concurrent clients, random sizes both ways (record boundaries included), ending with close_notify, a bare FIN or both."""
    backend = serve(sized_reply, backlog=512)
    pair = pki.pair("localhost")
    ctx = client_context(pki.ca_path)
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:

        def one(i: int) -> None:
            rnd = random.Random(i)
            up = rnd.choice([0, 1, 100, 5000, 16384, 16385, 70000, 300_000, 2 * MiB])
            down = rnd.choice([0, 1, 100, 5000, 16384, 16385, 70000, 300_000, 2 * MiB])
            payload = os.urandom(up)
            client = RawTLS(proxy.address, ctx)
            notify = rnd.random() < 0.5
            client.burst(b"%d %d\n" % (up, down) + payload, close_notify=notify)
            if not notify or rnd.random() < 0.5:
                client.sock.shutdown(socket.SHUT_WR)  # a bare FIN, or FIN after close_notify
            got, end = client.read_to_end(60)
            client.close()
            assert got == random.Random(up ^ down).randbytes(down), (i, len(got), down)
            assert end == "close_notify+fin", (i, end)

        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            list(pool.map(one, range(200)))
        proxy.closed(200, timeout=60)


# -- 6. idle timeout sends close_notify --------------------------------------------------


@on_each_plane
def test_idle_timeout_close_notify(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """--idle-timeout ends a TLS tunnel gracefully: close_notify then FIN, logged as a timeout."""

    def hold(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"hello")
        conn.settimeout(10)
        recv_all(conn)

    backend = serve(hold)
    pair = pki.pair("localhost")
    with tls_proxy(
        tmp_path, plane, *tls_args(pair), "--to", backend.address, "--idle-timeout", "1"
    ) as proxy:
        client = RawTLS(proxy.address, client_context(pki.ca_path))
        client.burst(b"x", close_notify=False)
        got, end = client.read_to_end(10)
        client.close()
        [closed] = proxy.closed()
    assert got == b"hello"
    assert end == "close_notify+fin", end
    assert closed["close_kind"] == "timeout", closed


# -- 7. data, then a record that fails to decrypt ----------------------------------------


def greet_then_collect(conn: socket.socket) -> tuple[bytes, str]:
    """Answer the first byte (the tunnel is then joined), then read to the end."""
    conn.sendall(conn.recv(1))
    return recv_outcome(conn)


@on_each_plane
def test_data_before_a_forged_record_reaches_the_backend(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """Data records and a forged one in one burst: the data is relayed, then the backend is reset; the record counts what it got."""
    backend = serve(greet_then_collect)
    payload = os.urandom(100_000)
    with tls_proxy(
        tmp_path, plane, *tls_args(pki.pair("localhost")), "--to", backend.address
    ) as proxy:
        client = RawTLS(proxy.address, client_context(pki.ca_path))
        client.burst(b"!", close_notify=False)
        while True:
            with contextlib.suppress(ssl.SSLWantReadError):
                assert client.obj.read(1) == b"!"
                break
            client.inc.write(client.sock.recv(65536))
        client.obj.write(payload)
        forged = b"\x17\x03\x03\x00\x20" + os.urandom(32)  # application data, bad tag
        client.sock.sendall(client.out.read() + forged)
        received, how = backend.outcome(timeout=10)
        client.close()
        [closed] = proxy.closed()
    # Every decrypted byte was read and sent on before the backend is reset;
    # the reset drops what its socket had not taken or sent yet (both paths),
    # and the record counts no byte the backend did not get. The unsent bytes
    # are measured just before the reset, and a backend that reads meanwhile
    # opens its window for some of them: the count may then fall short of
    # what arrived, never exceed it.
    assert payload.startswith(received)
    assert 1 < closed["bytes_up"] <= 1 + len(received), closed
    assert how == "RST"
    assert (closed["close_kind"], closed["closed_by"]) == ("error", "client"), closed
    assert closed["reason"].startswith("client TLS error: decryption failed"), closed


# -- 8. a slow reader after a half-close; a stalled one reset ---------------------------


def read_paced(client: RawTLS, rate: int, timeout: float = 120) -> tuple[int, str, str]:
    """Read about ``rate`` bytes/s until the stream ends: the plaintext's size, SHA-256 and end.

    The end is ``close_notify+fin``, ``fin`` or ``reset``; what arrived before
    a reset is decrypted and counted too.
    """
    digest = hashlib.sha256()
    size = 0
    step = 16 * 1024
    deadline = time.monotonic() + timeout
    end = "timeout"
    client.sock.settimeout(15)
    while time.monotonic() < deadline:
        try:
            data = client.sock.recv(step)
        except ConnectionResetError:
            end = "reset"
            break
        if data:
            client.inc.write(data)
        else:
            client.inc.write_eof()
        try:
            while chunk := client.obj.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            end = "close_notify"
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            end = "close_notify"
        except ssl.SSLEOFError:
            end = "fin"
        if end == "close_notify":
            end = "close_notify+fin" if not recv_all(client.sock) else "close_notify, then data"
        if end != "timeout" or not data:
            break
        time.sleep(step / rate)
    return size, digest.hexdigest(), end


@on_each_plane
def test_slow_reader_after_close_notify_gets_everything(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """A client that sends close_notify, then reads 4 MiB at 256 KiB/s (more than two close graces): every byte, and an exact record."""
    size = 4 * MiB
    backend = serve(push_and_close(size))
    pair = pki.pair("localhost")
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        client = RawTLS(proxy.address, client_context(pki.ca_path), rcvbuf=65536)
        client.burst(b"go", close_notify=True)
        got, digest, end = read_paced(client, 256 * 1024)
        client.close()
        sent = backend.outcome(timeout=10)
        [closed] = proxy.closed()
    assert (got, digest, end) == (size, sent, "close_notify+fin")
    assert (closed["bytes_up"], closed["bytes_down"]) == (2, size), closed
    assert (closed["closed_by"], closed["close_kind"]) == ("client", "FIN"), closed


@on_each_plane
def test_stalled_reader_reset_counts_only_what_it_got(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """A client that half-closes and reads nothing is reset by --fin-timeout; the record counts no byte it did not get."""
    size = 16 * MiB
    backend = serve(push_and_close(size))
    pair = pki.pair("localhost")
    args = ("--fin-timeout", "2", "--to", backend.address)
    with tls_proxy(tmp_path, plane, *tls_args(pair), *args) as proxy:
        client = RawTLS(proxy.address, client_context(pki.ca_path), rcvbuf=65536)
        client.burst(b"go", close_notify=True)
        [closed] = proxy.closed(timeout=30)
        got, _, end = read_paced(client, 1 << 30)
        client.close()
    assert end == "reset", end
    assert closed["bytes_down"] <= got < size, (got, closed)
    assert (closed["close_kind"], closed["reason"]) == ("FIN", "client sent FIN"), closed
