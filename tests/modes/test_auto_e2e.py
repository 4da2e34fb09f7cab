"""``--mode auto`` end to end: one ``twistd -n tunnelkit`` port serving real SOCKS5, CONNECT, HTTPS-proxy and other clients at once.

The proxy terminates TLS with a trustme certificate, allows loopback targets,
and sends everything else to a ``--to`` backend that speaks first (a banner,
then an echo), as SSH or SMTP servers do. Payloads are random and checked by
SHA-256; every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import write_ca, write_pair
from loopback import (
    IO_TIMEOUT,
    MiB,
    ThreadedServer,
    connect,
    hashing_echo,
    http_backend,
    recv_exactly,
    sha256,
)
from processes import Proxy, need, run, running_proxy
from python_socks.sync import Proxy as SocksProxy
from tls_clients import (
    client_context,
    leaf_der,
    served_certificate,
    server_context,
    tls_connect,
)

BANNER = b"220 backend speaks first\r\n"


def banner_then_echo(conn: socket.socket) -> str:
    """A server-speaks-first backend: its banner, then an echo of what comes."""
    conn.sendall(BANNER)
    return hashing_echo(conn)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    directory = tmp_path_factory.mktemp("auto-pki")
    ca = trustme.CA()
    return ca, directory


@pytest.fixture(scope="module")
def other() -> Iterator[ThreadedServer]:
    server = ThreadedServer(banner_then_echo)
    yield server
    server.close()


@pytest.fixture(scope="module")
def auto_proxy(
    tmp_path_factory: pytest.TempPathFactory, pki: tuple[trustme.CA, Path], other: ThreadedServer
) -> Iterator[Proxy]:
    """SOCKS5, CONNECT, TLS (terminated: an HTTPS proxy) and --to on one port."""
    ca, directory = pki
    pair = write_pair(ca, directory, "localhost", "127.0.0.1")
    cwd = tmp_path_factory.mktemp("auto")
    args = ["--mode", "auto", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
    args += ["--allow-dest", "127.0.0.0/8", "--allow-dest", "[::1]", "--to", other.address]
    with running_proxy(cwd, *args, "--detect-timeout", "0.5") as proxy:
        yield proxy


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """An HTTP server of one random 1 MiB file: its address and the file's bytes."""
    body = os.urandom(MiB)
    (tmp_path / "blob").write_bytes(body)
    with http_backend(tmp_path) as address:
        yield address, body


def curl_fetch(cwd: Path, *options: str) -> bytes:
    """What curl fetched with ``options`` (it must succeed)."""
    out = cwd / f"fetched-{os.urandom(4).hex()}"
    argv = [need("curl"), "-q", "-sS", "-f", "--max-time", "10", "--noproxy", "", "-o", str(out)]
    fetched = run([*argv, *options], cwd=cwd)
    assert fetched.returncode == 0, fetched.stdout
    return out.read_bytes()


def socks_echo(proxy: Proxy, target: str, payload: bytes) -> str:
    """python-socks over SOCKS5 to an echo ``target``: the SHA-256 of what came back."""
    host, port = target.rsplit(":", 1)
    sock = SocksProxy.from_url(f"socks5://{proxy.address}").connect(
        host, int(port), timeout=IO_TIMEOUT
    )
    with sock:
        return sha256(_exchange(sock, payload))


def plain_client(proxy: Proxy, payload: bytes) -> tuple[bytes, str]:
    """A client no mode claims: the banner it gets, and the SHA-256 of the echo."""
    with connect(proxy.address) as sock:
        sock.sendall(payload[:1])  # not a byte any mode claims (checked below)
        banner = recv_exactly(sock, len(BANNER))
        return banner, sha256(_exchange(sock, payload[1:]))


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` while reading, half-close, and read to EOF."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sending = pool.submit(send)
        got = bytearray()
        while data := sock.recv(256 * 1024):
            got += data
        sending.result()
    return bytes(got)


def test_one_port_serves_every_client_at_once(
    auto_proxy: Proxy,
    pki: tuple[trustme.CA, Path],
    site: tuple[str, bytes],
    other: ThreadedServer,
    tmp_path: Path,
) -> None:
    """curl over SOCKS5, over CONNECT and over an HTTPS proxy, python-socks and a plain client, concurrently."""
    address, body = site
    ca_file = write_ca(pki[0], tmp_path)
    payload = b"\x00" + os.urandom(MiB)
    url = f"http://{address}/blob"
    port = auto_proxy.port
    clients: dict[str, Callable[[], Any]] = {
        "socks5": lambda: curl_fetch(tmp_path, "--socks5-hostname", auto_proxy.address, url),
        "connect": lambda: curl_fetch(tmp_path, "-p", "-x", f"http://{auto_proxy.address}", url),
        "https proxy": lambda: curl_fetch(
            tmp_path, "-p", "-x", f"https://localhost:{port}", "--proxy-cacert", str(ca_file), url
        ),
        "python-socks": lambda: socks_echo(auto_proxy, other.address, payload),
        "plain": lambda: plain_client(auto_proxy, payload),
    }
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        running = {name: pool.submit(client) for name, client in clients.items()}
        results = {name: future.result(timeout=30) for name, future in running.items()}
    for name in ("socks5", "connect", "https proxy"):
        assert sha256(results[name]) == sha256(body), name
    # python-socks' echo went through --to's banner server: banner, then the payload.
    assert results["python-socks"] == sha256(BANNER + payload)
    assert results["plain"] == (BANNER, sha256(payload))
    assert auto_proxy.closed("the https proxy client", mode="connect", tls_version="TLSv1.3")
    assert auto_proxy.closed("the SOCKS5 client", mode="socks5")


def test_socks5_inside_tls(
    auto_proxy: Proxy, pki: tuple[trustme.CA, Path], other: ThreadedServer, tmp_path: Path
) -> None:
    """A TLS client speaking SOCKS5 inside: terminated, peeked at again, served by SOCKS5."""
    host, port = other.address.rsplit(":", 1)
    request = b"\x05\x01\x00\x01" + socket.inet_aton(host) + int(port).to_bytes(2, "big")
    context = client_context(write_ca(pki[0], tmp_path))
    with tls_connect(auto_proxy.address, context, "localhost") as tls:
        tls.sendall(b"\x05\x01\x00")
        assert recv_exactly(tls, 2) == b"\x05\x00"
        tls.sendall(request)
        assert recv_exactly(tls, 10)[:2] == b"\x05\x00"
        assert recv_exactly(tls, len(BANNER)) == BANNER
        tls.sendall(b"inside")
        assert recv_exactly(tls, 6) == b"inside"
    closed = auto_proxy.closed("the SOCKS5-in-TLS client", mode="socks5", tls_version="TLSv1.3")
    assert closed["target"] == other.address


def test_a_silent_client_goes_to_the_default_after_the_detect_timeout(
    auto_proxy: Proxy,
) -> None:
    """A client that waits for the server (SSH, SMTP) gets the --to backend's banner."""
    with connect(auto_proxy.address) as sock:
        assert recv_exactly(sock, len(BANNER)) == BANNER
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"


def test_a_tls_client_is_routed_by_sni_when_the_listener_does_not_terminate(
    tmp_path: Path, pki: tuple[trustme.CA, Path], other: ThreadedServer
) -> None:
    """Without --tls-cert, --route sends TLS clients to the backend their server name names, untouched."""
    ca, directory = pki
    pair = write_pair(ca, directory, "api.example.test")
    ca_file = write_ca(ca, tmp_path)
    context = server_context(pair)

    def tls_backend(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    backend = ThreadedServer(tls_backend)
    args = ["--mode", "auto", "--route", f"api.example.test={backend.address}"]
    try:
        with running_proxy(tmp_path, *args, "--to", other.address) as proxy:
            der = served_certificate(proxy.address, client_context(ca_file), "api.example.test")
            assert proxy.closed("the routed TLS client", mode="sni")["sni"] == "api.example.test"
    finally:
        backend.close()
    assert der == leaf_der(pair)
