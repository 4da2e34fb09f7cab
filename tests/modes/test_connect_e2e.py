"""CONNECT mode end to end: ``twistd -n tunnelkit --mode connect`` with real clients.

Each proxy is a ``twistd`` process logging JSON lines, listening on
127.0.0.1:0; proxies whose options several tests can share run once per module
and are stopped with SIGTERM at the end (a traceback or an unclean exit then
fails the last test to use them). Targets are loopback servers in threads of
the test process, allowed with ``--allow-dest 127.0.0.0/8``; payloads are
random and checked by SHA-256; every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from loopback import (
    IO_TIMEOUT,
    IPV6_LOOPBACK,
    NUMERIC_IPV4_LOOPBACK,
    MiB,
    Serve,
    ThreadedServer,
    connect,
    echo_through,
    exchange,
    hashing_echo,
    recv_exactly,
    recv_outcome,
    sha256,
    silent_listener,
)
from processes import (
    LOOPBACK_TARGETS,
    Proxy,
    assert_clean_stop,
    auth_file,
    free_port,
    need,
    run,
    running_proxy,
    start_proxy,
)
from python_socks.sync import Proxy as SocksProxy

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
REALM = 'Basic realm="tunnelkit"'

#: Socket timeout while waiting for a refusal (they come at once, or after 1 s).
REFUSAL_TIMEOUT = 5.0

#: The one user of the auth proxy; the password is new on every run.
USER = "alice"
PASSWORD = secrets.token_urlsafe(18)

#: The numeric spellings of loopback and unspecified addresses that resolvers accept.
LOOPBACK_FORMS = [*NUMERIC_IPV4_LOOPBACK, *(f"[{host}]" for host in IPV6_LOOPBACK)]


# -- the proxies ------------------------------------------------------------


def connect_proxy(cwd: Path, *args: str) -> contextlib.AbstractContextManager[Proxy]:
    """A CONNECT proxy for the ``with`` block; then SIGTERM, and it must exit cleanly."""
    return running_proxy(cwd, "--mode", "connect", *args)


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Loopback and ``*.invalid`` targets allowed, 1 s connect timeout."""
    cwd = tmp_path_factory.mktemp("open")
    args = ("--allow-dest", "127.0.0.0/8", "--allow-dest", "*.invalid", "--connect-timeout", "1")
    with connect_proxy(cwd, *args) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def default_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The default target policy (no --allow-dest) and a 1 s header deadline."""
    cwd = tmp_path_factory.mktemp("default")
    with connect_proxy(cwd, "--header-timeout", "1") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Loopback targets allowed to USER with PASSWORD only (an htpasswd file of one entry)."""
    cwd = tmp_path_factory.mktemp("auth")
    args = ("--auth-file", auth_file(cwd, USER, PASSWORD), *LOOPBACK_TARGETS)
    with connect_proxy(cwd, *args) as proxy:
        yield proxy


# -- targets ------------------------------------------------------------------


@pytest.fixture
def target(serve: Serve) -> ThreadedServer:
    """A loopback echo target that hashes what it receives."""
    return serve(hashing_echo)


class _SiteServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    body = b""
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IO_TIMEOUT)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        with self.tls.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-handshake is not the test's concern."""


class _BodyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SiteServer

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.server.body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


class Site:
    """An HTTP (or, with ``tls``, HTTPS) server on 127.0.0.1 answering every GET with ``body``."""

    def __init__(self, body: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.server = _SiteServer(("127.0.0.1", 0), _BodyHandler)
        self.server.body = body
        self.server.tls = tls
        self.body = body
        self.port: int = self.server.server_address[1]
        self.authority = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def ca() -> Any:
    """A certificate authority made for this test."""
    return trustme.CA()


@pytest.fixture
def https_site(ca: Any) -> Iterator[Site]:
    """An HTTPS site with a certificate for 127.0.0.1 from this test's CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    site = Site(os.urandom(MiB), context)
    yield site
    site.close()


@pytest.fixture
def http_site() -> Iterator[Site]:
    """A plain HTTP site."""
    site = Site(os.urandom(MiB))
    yield site
    site.close()


@pytest.fixture
def ca_file(ca: Any, tmp_path: Path) -> str:
    """This test's CA certificate as a PEM file, for curl and openssl."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


# -- raw clients --------------------------------------------------------------


def connect_request(authority: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    """A CONNECT request head for ``authority`` with these header lines."""
    return ("\r\n".join([f"CONNECT {authority} {version}", *headers]) + "\r\n\r\n").encode()


def basic(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}"


def client_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


class Response:
    """The only response in a byte string: status, headers (lower-cased names) and body."""

    def __init__(self, data: bytes) -> None:
        head, blank, self.body = data.partition(b"\r\n\r\n")
        assert blank, f"no complete response head in {data!r}"
        status_line, *lines = head.decode("ascii").split("\r\n")
        version, status, _phrase = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        self.status = int(status)
        self.headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon and name.lower() not in self.headers, line
            self.headers[name.lower()] = value.strip()
        length = int(self.headers["content-length"])
        assert len(self.body) == length, f"not exactly one response: {data!r}"
        assert self.headers.get("connection") == "close"


def refusal(proxy: Proxy, data: bytes) -> tuple[Response, str]:
    """Send ``data`` in one write; the one response that came before EOF, and our address.

    Fails if the proxy resets the connection, says anything after its
    response, or keeps the connection open.
    """
    with connect(proxy.address, REFUSAL_TIMEOUT) as sock:
        sock.sendall(data)
        received, ending = recv_outcome(sock)
        client = client_address(sock)
    assert ending == "EOF", f"{ending} after {received!r}"
    return Response(received), client


def open_tunnel(proxy: Proxy, data: bytes) -> socket.socket:
    """A socket whose CONNECT (``data``, one write) was answered 200 and nothing else yet."""
    sock = connect(proxy.address)
    try:
        sock.sendall(data)
        reply = recv_exactly(sock, len(ESTABLISHED))
        assert reply == ESTABLISHED, reply + sock.recv(4096)
    except BaseException:
        sock.close()
        raise
    return sock


def assert_tunnel_echoes(sock: socket.socket, target: ThreadedServer, size: int) -> None:
    """A random payload goes through the open tunnel to the echo target and back, once, intact."""
    payload = os.urandom(size)
    received = exchange(sock, payload)
    assert len(received) == size
    assert sha256(received) == sha256(payload)
    assert target.outcome() == sha256(payload)


# -- real clients -------------------------------------------------------------


def curl_through(proxy: Proxy, url: str, cwd: Path, *options: str) -> bytes:
    """The body curl fetches from ``url`` with ``-x http://PROXY`` (the proxy even if NO_PROXY says not)."""
    curl = need("curl")
    body = cwd / "fetched"
    argv = [curl, "-q", "-sS", "-f", "--max-time", "10", "--noproxy", "", *options]
    fetched = run([*argv, "-o", str(body), "-x", f"http://{proxy.address}", url], cwd=cwd)
    assert fetched.returncode == 0, fetched.stdout
    return body.read_bytes()


def test_curl_https_through_connect(
    open_proxy: Proxy, https_site: Site, ca_file: str, tmp_path: Path
) -> None:
    """curl -x http://PROXY https://127.0.0.1:P/ tunnels TLS and fetches 1 MiB byte for byte."""
    url = f"https://{https_site.authority}/"
    body = curl_through(open_proxy, url, tmp_path, "--cacert", ca_file)
    assert sha256(body) == sha256(https_site.body)
    assert open_proxy.closed("curl", target=https_site.authority)["status"] == 200


def test_curl_p_http_through_connect(open_proxy: Proxy, http_site: Site, tmp_path: Path) -> None:
    """curl -p -x http://PROXY http://127.0.0.1:P/ sends CONNECT for a plain-HTTP URL and fetches 1 MiB intact."""
    body = curl_through(open_proxy, f"http://{http_site.authority}/", tmp_path, "-p")
    assert sha256(body) == sha256(http_site.body)
    assert open_proxy.closed("curl -p", target=http_site.authority)["status"] == 200


def _openssl_has_proxy(openssl: str, cwd: Path) -> bool:
    return "-proxy" in run([openssl, "s_client", "-help"], cwd=cwd).stdout


def test_openssl_s_client_proxy_handshake(
    open_proxy: Proxy, https_site: Site, ca_file: str, tmp_path: Path
) -> None:
    """openssl s_client -proxy, whose CONNECT is HTTP/1.0 without Host, completes a verified TLS handshake."""
    openssl = need("openssl")
    if not _openssl_has_proxy(openssl, tmp_path):
        pytest.skip("this openssl s_client has no -proxy option")
    argv = [openssl, "s_client", "-proxy", open_proxy.address, "-connect", https_site.authority]
    argv += ["-CAfile", ca_file, "-verify_return_error", "-verify_ip", "127.0.0.1"]
    result = run(argv, cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert "Verify return code: 0 (ok)" in result.stdout, result.stdout
    event = open_proxy.closed("openssl s_client", target=https_site.authority)
    assert event["status"] == 200
    assert event["bytes_up"] > 0 and event["bytes_down"] > 0


def test_http_client_set_tunnel(open_proxy: Proxy, https_site: Site, ca: Any) -> None:
    """http.client.HTTPSConnection.set_tunnel (HTTP/1.0 CONNECT) fetches 1 MiB over verified TLS intact."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    conn = http.client.HTTPSConnection(
        open_proxy.host, open_proxy.port, context=context, timeout=IO_TIMEOUT
    )
    try:
        conn.set_tunnel("127.0.0.1", https_site.port)
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert sha256(body) == sha256(https_site.body)
    assert open_proxy.closed("http.client", target=https_site.authority)["status"] == 200


def test_python_socks_http_proxy(open_proxy: Proxy, target: ThreadedServer) -> None:
    """python-socks' HTTP proxy client opens a tunnel that carries 2 MiB each way intact."""
    proxy = SocksProxy.from_url(f"http://{open_proxy.address}")
    host, _, port = target.address.rpartition(":")
    with proxy.connect(dest_host=host, dest_port=int(port), timeout=IO_TIMEOUT) as sock:
        sock.settimeout(IO_TIMEOUT)
        assert_tunnel_echoes(sock, target, 2 * MiB)


# -- the bytes around the header ------------------------------------------------


@pytest.mark.parametrize("size", [517, 4 * MiB], ids=["client-hello-size", "4MiB"])
def test_pipelined_bytes_reach_target_once(
    open_proxy: Proxy, target: ThreadedServer, size: int
) -> None:
    """Bytes sent in the same write as the header reach the target exactly once, in order, after the 200."""
    payload = os.urandom(size)
    request = connect_request(target.address, f"Host: {target.address}")
    received = echo_through(open_proxy.address, request + payload)
    assert received[: len(ESTABLISHED)] == ESTABLISHED
    assert len(received) == len(ESTABLISHED) + size
    assert sha256(received[len(ESTABLISHED) :]) == sha256(payload)
    assert target.outcome() == sha256(payload)


def test_bulk_tunnel_is_spliced_after_the_200(open_proxy: Proxy, target: ThreadedServer) -> None:
    """16 MiB pipelined behind the header: spliced once bulk (--splice auto), still in order, once, after the 200."""
    payload = os.urandom(16 * MiB)
    request = connect_request(target.address)
    received = echo_through(open_proxy.address, request + payload)
    assert received[: len(ESTABLISHED)] == ESTABLISHED
    assert sha256(received[len(ESTABLISHED) :]) == sha256(payload)
    assert target.outcome() == sha256(payload)
    record = open_proxy.closed("the bulk tunnel", target=target.address)
    assert (record["bytes_up"], record["bytes_down"]) == (16 * MiB, 16 * MiB)
    assert record["spliced"] is True


def test_header_byte_by_byte(open_proxy: Proxy, target: ThreadedServer) -> None:
    """A header that arrives one byte per segment is parsed, and the bytes after it arrive once."""
    payload = os.urandom(64 * 1024)
    request = connect_request(target.address, f"Host: {target.address}", "User-Agent: slow")
    with connect(open_proxy.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in request[:-1]:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        received = exchange(sock, request[-1:] + payload)
    assert received[: len(ESTABLISHED)] == ESTABLISHED
    assert sha256(received[len(ESTABLISHED) :]) == sha256(payload)
    assert target.outcome() == sha256(payload)


def test_banner_first_target(open_proxy: Proxy, serve: Serve) -> None:
    """A target that speaks first: its banner reaches the client right after the 200, before the client sends."""
    banner = os.urandom(1024)

    def banner_then_echo(conn: socket.socket) -> str:
        conn.sendall(banner)
        return hashing_echo(conn)

    server = serve(banner_then_echo)
    with open_tunnel(open_proxy, connect_request(server.address)) as sock:
        assert recv_exactly(sock, len(banner)) == banner
        assert_tunnel_echoes(sock, server, 64 * 1024)


# -- refusals -------------------------------------------------------------------

#: A marker in refused requests: a response must never echo request bytes.
MARK = "zq" + secrets.token_hex(8)

BAD_REQUESTS = {
    "400 no port": (400, f"CONNECT {MARK}.example HTTP/1.1\r\n\r\n"),
    "400 bare LF": (400, f"CONNECT 127.0.0.1:9 HTTP/1.1\nX-{MARK}: 1\r\n\r\n"),
    "400 body framing": (400, f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nContent-Length: 5\r\n\r\n{MARK}"),
    "405 GET": (405, f"GET http://127.0.0.1/{MARK} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    "414 request line": (414, f"CONNECT {'a' * 9000}{MARK}:443 HTTP/1.1\r\n\r\n"),
    "431 too many headers": (
        431,
        "CONNECT 127.0.0.1:9 HTTP/1.1\r\n"
        + "".join(f"X-{i}: {MARK}\r\n" for i in range(101))
        + "\r\n",
    ),
    "431 oversized headers": (
        431,
        f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nX-Big: {MARK * 1100}\r\n\r\n",
    ),
    "505 HTTP/2.0": (505, f"CONNECT 127.0.0.1:9 HTTP/2.0\r\nX-{MARK}: 1\r\n\r\n"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_one_response_then_eof(open_proxy: Proxy, case: str) -> None:
    """A malformed, non-CONNECT or oversized request gets one fixed error response, then EOF."""
    status, request = BAD_REQUESTS[case]
    response, client = refusal(open_proxy, request.encode())
    assert response.status == status
    assert MARK.encode() not in response.body
    if status == 405:
        assert response.headers["allow"] == "CONNECT"
    assert open_proxy.closed(case, client=client)["status"] == status


def test_refused_port_is_502(open_proxy: Proxy) -> None:
    """A target port where nothing listens gets 502, then EOF."""
    authority = f"127.0.0.1:{free_port()}"
    response, client = refusal(open_proxy, connect_request(authority))
    assert response.status == 502
    event = open_proxy.closed("refused target", client=client)
    assert (event["status"], event["target"]) == (502, authority)
    assert "refused" in event["reason"]


def test_unresolvable_name_is_502(open_proxy: Proxy) -> None:
    """A name that does not resolve (allowed by --allow-dest '*.invalid') gets 502, then EOF."""
    authority = f"{MARK}.invalid:443"
    response, client = refusal(open_proxy, connect_request(authority, f"Host: {authority}"))
    assert response.status == 502
    assert MARK.encode() not in response.body
    event = open_proxy.closed("unresolvable target", client=client)
    assert event["status"] == 502
    assert "resolve" in event["reason"]


def test_connect_timeout_is_504(open_proxy: Proxy) -> None:
    """A target whose SYNs go unanswered gets 504 after --connect-timeout 1, then EOF."""
    with silent_listener() as address:
        if address is None:
            pytest.skip("this kernel answers SYNs to a full accept queue")
        started = time.monotonic()
        response, client = refusal(open_proxy, connect_request(address))
        waited = time.monotonic() - started
    assert response.status == 504
    assert 0.8 <= waited < 4, waited
    event = open_proxy.closed("silent target", client=client)
    assert (event["status"], event["close_kind"]) == (504, "timeout")


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_default_policy_refuses_loopback(
    default_proxy: Proxy, target: ThreadedServer, host: str
) -> None:
    """With no --allow-dest, every numeric spelling of loopback or unspecified gets 403 and no connection."""
    port = target.address.rpartition(":")[2]
    response, client = refusal(default_proxy, connect_request(f"{host}:{port}"))
    assert response.status == 403
    assert target.accepted == 0
    assert default_proxy.closed(host, client=client)["status"] == 403


def test_slowloris_gets_408(default_proxy: Proxy) -> None:
    """A client dripping an endless header gets 408 once --header-timeout 1 has passed since accept, then EOF."""
    with connect(default_proxy.address, REFUSAL_TIMEOUT) as sock:
        started = time.monotonic()
        sock.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nX-Slow: ")
        for _ in range(4):  # bytes keep coming until 0.8 s, but the deadline counts from accept
            time.sleep(0.2)
            sock.sendall(b"a")
        received, ending = recv_outcome(sock)
        waited = time.monotonic() - started
    assert ending == "EOF"
    assert Response(received).status == 408
    assert 0.9 <= waited < 1.7, waited  # a deadline restarted by each byte would end after 1.8 s


SMUGGLED = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


REFUSED_THEN_SMUGGLED = {
    403: connect_request("127.0.0.1:80"),
    400: b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n",
    405: b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}


@pytest.mark.parametrize("status", list(REFUSED_THEN_SMUGGLED))
def test_smuggled_request_after_refusal(default_proxy: Proxy, status: int) -> None:
    """A refusal followed by a GET in the same write gets exactly one response, then EOF."""
    response, _ = refusal(default_proxy, REFUSED_THEN_SMUGGLED[status] + SMUGGLED)
    assert response.status == status
    assert b"HTTP/1.1" not in response.body


# -- authentication -------------------------------------------------------------

BAD_CREDENTIALS = {
    "none": (),
    "wrong password": (basic(USER, "not-" + PASSWORD),),
    "unknown user": (basic("mallory", PASSWORD),),
    "not basic": (f"Proxy-Authorization: Bearer {PASSWORD}",),
    "Authorization instead": (basic(USER, PASSWORD).removeprefix("Proxy-"),),
}


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
def test_auth_required(auth_proxy: Proxy, target: ThreadedServer, case: str, version: str) -> None:
    """With --auth-file, missing or wrong credentials get 407 with Proxy-Authenticate: Basic realm="tunnelkit", then EOF."""
    request = connect_request(target.address, *BAD_CREDENTIALS[case], version=version)
    response, client = refusal(auth_proxy, request)
    assert response.status == 407
    assert response.headers["proxy-authenticate"] == REALM
    assert target.accepted == 0
    assert auth_proxy.closed(case, client=client)["status"] == 407


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_auth_good_credentials(auth_proxy: Proxy, target: ThreadedServer, version: str) -> None:
    """With --auth-file, the right user and password get 200 and a working tunnel, in HTTP/1.1 and 1.0."""
    request = connect_request(target.address, basic(USER, PASSWORD), version=version)
    with open_tunnel(auth_proxy, request) as sock:
        assert_tunnel_echoes(sock, target, 256 * 1024)


def test_python_socks_with_credentials(auth_proxy: Proxy, target: ThreadedServer) -> None:
    """python-socks' HTTP proxy client with user:password in the URL authenticates and tunnels."""
    proxy = SocksProxy.from_url(f"http://{USER}:{PASSWORD}@{auth_proxy.address}")
    host, _, port = target.address.rpartition(":")
    with proxy.connect(dest_host=host, dest_port=int(port), timeout=IO_TIMEOUT) as sock:
        sock.settimeout(IO_TIMEOUT)
        assert_tunnel_echoes(sock, target, 256 * 1024)


def test_access_log(auth_proxy: Proxy, target: ThreadedServer) -> None:
    """tunnel_closed has target, the resolved backend_address, status, user and bytes, and no password anywhere."""
    port = int(target.address.rpartition(":")[2])
    size = 300_000
    request = connect_request(f"localhost:{port}", basic(USER, PASSWORD))
    with open_tunnel(auth_proxy, request) as sock:
        client = client_address(sock)
        assert_tunnel_echoes(sock, target, size)
    event = auth_proxy.closed("the tunnel", client=client)
    assert event["target"] == f"localhost:{port}"
    assert event["backend_address"] == f"127.0.0.1:{port}"
    assert (event["status"], event["user"]) == (200, USER)
    assert (event["bytes_up"], event["bytes_down"]) == (size, size)
    wrong = "wrong-" + secrets.token_urlsafe(12)
    _, refused_client = refusal(auth_proxy, connect_request(target.address, basic(USER, wrong)))
    assert auth_proxy.closed("the refusal", client=refused_client)["status"] == 407
    output = auth_proxy.process.output
    for secret in (PASSWORD, wrong):
        assert secret not in output
        assert base64.b64encode(f"{USER}:{secret}".encode()).decode() not in output


# -- who may use the proxy, and where to ---------------------------------------


def test_deny_client_closes_at_once(tmp_path: Path, target: ThreadedServer) -> None:
    """--deny-client 127.0.0.0/8 closes a loopback client at once, without a response or a tunnel."""
    args = ("--deny-client", "127.0.0.0/8", "--allow-dest", "127.0.0.0/8")
    with connect_proxy(tmp_path, *args) as proxy, connect(proxy.address, 2) as sock:
        started = time.monotonic()
        received, _ending = recv_outcome(sock)
        waited = time.monotonic() - started
        assert received == b""
        assert waited < 1, waited
        proxy.process.wait_for(lambda text: "client_refused" in text, "client_refused", 5)
    assert target.accepted == 0


def test_allow_port_narrows_allowed_destinations(tmp_path: Path, target: ThreadedServer) -> None:
    """--allow-port 443 refuses port 80 (and any other non-443 port) with 403 even inside --allow-dest."""
    args = ("--allow-dest", "127.0.0.0/8", "--allow-port", "443")
    with connect_proxy(tmp_path, *args) as proxy:
        assert refusal(proxy, connect_request("127.0.0.1:80"))[0].status == 403
        assert refusal(proxy, connect_request(target.address))[0].status == 403
        assert target.accepted == 0
        with connect(proxy.address, REFUSAL_TIMEOUT) as sock:
            sock.sendall(connect_request("127.0.0.1:443"))
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
        assert status_line.split(b" ")[1] != b"403", status_line


def test_max_connections_503(tmp_path: Path, target: ThreadedServer) -> None:
    """At --max-connections 1, a second client gets 503 and EOF while one tunnel is open."""
    args = ("--allow-dest", "127.0.0.0/8", "--max-connections", "1")
    with (
        connect_proxy(tmp_path, *args) as proxy,
        open_tunnel(proxy, connect_request(target.address)) as held,
    ):
        with connect(proxy.address, REFUSAL_TIMEOUT) as second:
            received, ending = recv_outcome(second)
        assert ending == "EOF"
        assert Response(received).status == 503
        assert_tunnel_echoes(held, target, 1024)


def test_sigterm_drains_open_tunnel(tmp_path: Path, target: ThreadedServer) -> None:
    """SIGTERM with a CONNECT tunnel open: the tunnel keeps working until the client ends it, then twistd exits 0."""
    args = ("--allow-dest", "127.0.0.0/8", "--drain-timeout", "20")
    proxy = start_proxy(tmp_path, "--mode", "connect", *args)
    with proxy.process as process:
        with open_tunnel(proxy, connect_request(target.address)) as sock:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            process.send_signal(signal.SIGTERM)
            process.wait_for(lambda text: '"drain_started"' in text, "drain_started", 5)
            assert process.proc.poll() is None
            payload = os.urandom(MiB)
            received = exchange(sock, payload)
        assert sha256(received) == sha256(payload)
        assert target.outcome() == sha256(b"ping" + payload)
        assert_clean_stop(process, process.wait(10))
    event = proxy.closed("the drained tunnel", target=target.address)
    assert (event["status"], event["close_kind"], event["closed_by"]) == (200, "FIN", "client")
