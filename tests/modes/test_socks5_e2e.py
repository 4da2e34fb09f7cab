"""SOCKS5 mode end to end: ``twistd -n tunnelkit --mode socks5`` with curl, python-socks and raw frames.

Each proxy is a ``twistd`` process logging JSON lines on 127.0.0.1:0, shared by
the tests of this module and stopped with SIGTERM at the end. Targets are
loopback servers in threads of the test process, allowed with ``--allow-dest
127.0.0.0/8``; payloads are random and checked by SHA-256; every wait is
bounded.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import (
    IO_TIMEOUT,
    IPV6_LOOPBACK,
    NUMERIC_IPV4_LOOPBACK,
    MiB,
    Serve,
    ThreadedServer,
    connect,
    exchange,
    hashing_echo,
    http_backend,
    recv_exactly,
    recv_outcome,
    sha256,
    silent_listener,
)
from processes import LOOPBACK_TARGETS, Proxy, auth_file, free_port, need, run, running_proxy
from python_socks import ProxyError
from python_socks.sync import Proxy as SocksProxy

#: The one user of the auth proxy; the password is new on every run.
USER = "alice"
PASSWORD = secrets.token_urlsafe(18)

#: Socket timeout while waiting for a refusal (they come at once, or after 1 s).
REFUSAL_TIMEOUT = 5.0

NO_AUTH = b"\x05\x01\x00"


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Loopback (IPv4 and IPv6) and ``*.invalid`` targets allowed, 1 s connect timeout."""
    cwd = tmp_path_factory.mktemp("socks-open")
    args = ("--allow-dest", "127.0.0.0/8", "--allow-dest", "[::1]", "--allow-dest", "*.invalid")
    with running_proxy(cwd, "--mode", "socks5", *args, "--connect-timeout", "1") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def default_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The default target policy (no --allow-dest) and a 1 s header deadline."""
    cwd = tmp_path_factory.mktemp("socks-default")
    with running_proxy(cwd, "--mode", "socks5", "--header-timeout", "1") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Loopback targets allowed to USER with PASSWORD only (an htpasswd file of one entry)."""
    cwd = tmp_path_factory.mktemp("socks-auth")
    args = ("--auth-file", auth_file(cwd, USER, PASSWORD), *LOOPBACK_TARGETS)
    with running_proxy(cwd, "--mode", "socks5", *args) as proxy:
        yield proxy


@pytest.fixture
def target(serve: Serve) -> ThreadedServer:
    """A loopback echo target that hashes what it receives."""
    return serve(hashing_echo)


def echo_noting_peer(conn: socket.socket) -> tuple[str, str]:
    """A hashing echo that also returns the address it saw the proxy connect from."""
    host, port = conn.getpeername()[:2]
    peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return peer, hashing_echo(conn)


# -- raw frames ----------------------------------------------------------------------


def ipv4_request(address: str, command: int = 1) -> bytes:
    host, _, port = address.rpartition(":")
    return bytes((5, command, 0, 1)) + socket.inet_aton(host) + struct.pack("!H", int(port))


def name_request(host: str, port: int) -> bytes:
    return bytes((5, 1, 0, 3, len(host))) + host.encode() + struct.pack("!H", port)


def read_reply(sock: socket.socket) -> tuple[int, str]:
    """The reply's code and BND as ``host:port`` (IPv4 or IPv6)."""
    head = recv_exactly(sock, 4)
    assert head[0] == 5 and head[2] == 0, head
    size = {1: 4, 4: 16}[head[3]]
    address = ipaddress.ip_address(recv_exactly(sock, size))
    (port,) = struct.unpack("!H", recv_exactly(sock, 2))
    host = f"[{address}]" if address.version == 6 else str(address)
    return head[1], f"{host}:{port}"


def refused_reply(proxy: Proxy, data: bytes) -> tuple[int, str]:
    """Send ``data`` (a greeting and a request) in one write; the reply code, then EOF; and our address."""
    with connect(proxy.address, REFUSAL_TIMEOUT) as sock:
        sock.sendall(data)
        received, ending = recv_outcome(sock)
        client = "{}:{}".format(*sock.getsockname()[:2])
    assert ending == "EOF", f"{ending} after {received!r}"
    assert received[:2] == b"\x05\x00" and len(received) == 12, received
    return received[3], client


def test_pipelined_negotiation_bytes_reach_target_once(open_proxy: Proxy, serve: Serve) -> None:
    """Greeting, request and 4 MiB in one write: the reply (BND = the target's view of us), then the echo, once, in order."""
    server = serve(echo_noting_peer)
    payload = os.urandom(4 * MiB)
    with connect(open_proxy.address) as sock:
        sock.sendall(NO_AUTH + ipv4_request(server.address) + payload[:65536])
        assert recv_exactly(sock, 2) == b"\x05\x00"
        code, bound = read_reply(sock)
        received = exchange(sock, payload[65536:])
        client = "{}:{}".format(*sock.getsockname()[:2])
    peer, digest = server.outcome()
    assert (code, bound) == (0, peer)
    assert sha256(received) == digest == sha256(payload)
    event = open_proxy.closed("the pipelined tunnel", client=client)
    assert (event["mode"], event["reply"], event["target"]) == ("socks5", 0, server.address)
    assert (event["bytes_up"], event["bytes_down"]) == (4 * MiB, 4 * MiB)


def test_ipv6_target_and_bound_address(open_proxy: Proxy, serve: Serve) -> None:
    """A request by IPv6 address (type 0x04) reaches [::1]; BND is the IPv6 address the target sees."""
    try:
        server = serve(echo_noting_peer, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = int(server.address.rpartition(":")[2])
    payload = os.urandom(256 * 1024)
    request = b"\x05\x01\x00\x04" + ipaddress.IPv6Address("::1").packed + struct.pack("!H", port)
    with connect(open_proxy.address) as sock:
        sock.sendall(NO_AUTH + request)
        assert recv_exactly(sock, 2) == b"\x05\x00"
        code, bound = read_reply(sock)
        received = exchange(sock, payload)
    peer, digest = server.outcome()
    assert (code, bound) == (0, peer)
    assert sha256(received) == digest == sha256(payload)


def curl_socks(
    tmp_path: Path, proxy: Proxy, option: str, url: str, *more: str
) -> tuple[int, str, bytes]:
    """``curl OPTION PROXY URL MORE``: its exit status, output and the body it fetched."""
    curl = need("curl")
    out = tmp_path / "fetched"
    out.unlink(missing_ok=True)
    argv = [curl, "-q", "-sS", "-f", "--max-time", "10", "--noproxy", "", "-o", str(out)]
    fetched = run([*argv, option, proxy.address, url, *more], cwd=tmp_path)
    return fetched.returncode, fetched.stdout, out.read_bytes() if out.exists() else b""


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """An HTTP server on 127.0.0.1 serving 1 MiB of random bytes at /blob: its address and the bytes."""
    root = tmp_path / "site"
    root.mkdir()
    body = os.urandom(MiB)
    (root / "blob").write_bytes(body)
    with http_backend(root) as address:
        yield address, body


def test_curl_socks5(open_proxy: Proxy, site: tuple[str, bytes], tmp_path: Path) -> None:
    """curl --socks5 (curl resolves, sends an IPv4 address) fetches 1 MiB intact."""
    address, body = site
    code, output, fetched = curl_socks(tmp_path, open_proxy, "--socks5", f"http://{address}/blob")
    assert code == 0, output
    assert sha256(fetched) == sha256(body)
    assert open_proxy.closed("curl --socks5", target=address)["reply"] == 0


def test_curl_socks5_hostname_is_resolved_by_the_proxy(open_proxy: Proxy, tmp_path: Path) -> None:
    """curl --socks5-hostname sends the name: the proxy resolves it, and a name that does not exist gets 0x04."""
    name = f"{secrets.token_hex(4)}.invalid"
    code, output, _ = curl_socks(tmp_path, open_proxy, "--socks5-hostname", f"http://{name}/")
    assert code == 97, output  # curl: the proxy's reply was not a success
    assert "(4)" in output, output
    assert open_proxy.closed("curl --socks5-hostname", target=f"{name}:80")["reply"] == 4


def test_curl_socks5_hostname_with_proxy_user(
    auth_proxy: Proxy, site: tuple[str, bytes], tmp_path: Path
) -> None:
    """curl --socks5-hostname --proxy-user: RFC 1929 auth, the proxy resolves localhost, 1 MiB intact; a wrong password fails."""
    address, body = site
    url = f"http://localhost:{address.rpartition(':')[2]}/blob"
    good = ("--proxy-user", f"{USER}:{PASSWORD}")
    code, output, fetched = curl_socks(tmp_path, auth_proxy, "--socks5-hostname", url, *good)
    assert code == 0, output
    assert sha256(fetched) == sha256(body)
    wrong = "wrong-" + secrets.token_urlsafe(12)
    bad = ("--proxy-user", f"{USER}:{wrong}")
    code, output, _ = curl_socks(tmp_path, auth_proxy, "--socks5-hostname", url, *bad)
    assert code == 97, output
    event = auth_proxy.closed("curl with its user", target=url.split("/")[2])
    assert (event["user"], event["reply"]) == (USER, 0)
    failed = auth_proxy.closed("curl with a wrong password", reason="authentication failed")
    assert failed["user"] == USER
    for secret in (PASSWORD, wrong):
        assert secret not in auth_proxy.process.output


def test_python_socks_with_credentials(auth_proxy: Proxy, target: ThreadedServer) -> None:
    """python-socks' SOCKS5 client with user:password in the URL authenticates and tunnels 2 MiB each way."""
    proxy = SocksProxy.from_url(f"socks5://{USER}:{PASSWORD}@{auth_proxy.address}")
    host, _, port = target.address.rpartition(":")
    payload = os.urandom(2 * MiB)
    with proxy.connect(dest_host=host, dest_port=int(port), timeout=IO_TIMEOUT) as sock:
        sock.settimeout(IO_TIMEOUT)
        received = exchange(sock, payload)
    assert sha256(received) == sha256(payload)
    assert target.outcome() == sha256(payload)
    bad = SocksProxy.from_url(f"socks5://{USER}:nope@{auth_proxy.address}")
    with pytest.raises(ProxyError):
        bad.connect(dest_host=host, dest_port=int(port), timeout=IO_TIMEOUT).close()
    assert target.accepted == 1


# -- refusals ---------------------------------------------------------------------------


def test_refused_port_is_05(open_proxy: Proxy) -> None:
    """A target port where nothing listens gets reply 0x05, then EOF."""
    authority = f"127.0.0.1:{free_port()}"
    code, client = refused_reply(open_proxy, NO_AUTH + ipv4_request(authority))
    assert code == 0x05
    event = open_proxy.closed("refused target", client=client)
    assert (event["reply"], event["target"]) == (5, authority)


def test_unresolvable_name_is_04(open_proxy: Proxy) -> None:
    """A name that does not resolve (allowed by --allow-dest '*.invalid') gets 0x04, then EOF."""
    code, _ = refused_reply(
        open_proxy, NO_AUTH + name_request(f"{secrets.token_hex(6)}.invalid", 443)
    )
    assert code == 0x04


def test_connect_timeout_is_04(open_proxy: Proxy) -> None:
    """A target whose SYNs go unanswered gets 0x04 after --connect-timeout 1, recorded as a timeout."""
    with silent_listener() as address:
        if address is None:
            pytest.skip("this kernel answers SYNs to a full accept queue")
        code, client = refused_reply(open_proxy, NO_AUTH + ipv4_request(address))
    assert code == 0x04
    assert open_proxy.closed("silent target", client=client)["close_kind"] == "timeout"


def test_bind_and_udp_associate_are_07(open_proxy: Proxy, target: ThreadedServer) -> None:
    """BIND and UDP ASSOCIATE get 0x07 and EOF; nothing reaches the target."""
    for command in (2, 3):
        code, _ = refused_reply(open_proxy, NO_AUTH + ipv4_request(target.address, command))
        assert code == 0x07
    assert target.accepted == 0


def test_no_acceptable_method_is_05_ff(auth_proxy: Proxy, target: ThreadedServer) -> None:
    """With --auth-file, a client offering only 'no authentication' gets 05 FF and EOF, nothing else."""
    with connect(auth_proxy.address, REFUSAL_TIMEOUT) as sock:
        sock.sendall(NO_AUTH + ipv4_request(target.address))
        assert recv_outcome(sock) == (b"\x05\xff", "EOF")
    assert target.accepted == 0


#: Every numeric spelling of loopback and unspecified: as a name, and (where it is one) as an address.
LOOPBACK_FORMS = [*NUMERIC_IPV4_LOOPBACK, *IPV6_LOOPBACK]


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_default_policy_refuses_loopback(
    default_proxy: Proxy, target: ThreadedServer, host: str
) -> None:
    """With no --allow-dest, every spelling of loopback gets 0x02, by name or address type, and no connection."""
    port = int(target.address.rpartition(":")[2])
    requests = [name_request(host, port)]
    if host in ("127.0.0.1", "::1", "::"):
        address = ipaddress.ip_address(host)
        atyp = 1 if address.version == 4 else 4
        requests.append(bytes((5, 1, 0, atyp)) + address.packed + struct.pack("!H", port))
    for request in requests:
        code, client = refused_reply(default_proxy, NO_AUTH + request)
        assert code == 0x02
        assert default_proxy.closed(host, client=client)["reply"] == 2
    assert target.accepted == 0


def test_negotiation_deadline(default_proxy: Proxy) -> None:
    """A client that stops after its greeting is closed once --header-timeout 1 has passed, recorded as a timeout."""
    with connect(default_proxy.address, REFUSAL_TIMEOUT) as sock:
        sock.sendall(NO_AUTH + b"\x05\x01")
        received, ending = recv_outcome(sock)
        client = "{}:{}".format(*sock.getsockname()[:2])
    assert (received, ending) == (b"\x05\x00", "EOF")
    assert default_proxy.closed("the slow client", client=client)["close_kind"] == "timeout"
