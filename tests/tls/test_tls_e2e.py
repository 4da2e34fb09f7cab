"""TLS offload and TLS to backends end to end (docs/tls.md): ``twistd -n tunnelkit`` with real peers.

Each proxy is a ``twistd`` process logging JSON lines and listening on
127.0.0.1:0; it is stopped with SIGTERM at the end of its ``with`` block and
must exit cleanly, without a traceback. Clients are Python ``ssl`` sockets,
``curl`` and ``openssl s_client``; backends are threaded loopback servers,
plaintext or Python ``ssl``. Certificates are made per test with trustme.
Payloads are random and checked by SHA-256; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import Pair, write_ca, write_pair
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from loopback import (
    BulkSender,
    Download,
    MiB,
    Serve,
    assert_echoes,
    connect,
    echo,
    hashing_echo,
    http_backend,
    paced_bulk,
    read_slowly,
    recv_all,
    recv_outcome,
    send_while_reading,
    sha256,
    split_address,
)
from planes import TWISTED, Plane, on_each_plane, on_planes
from processes import (
    MEMORY_CHECKED,
    Process,
    assert_clean_stop,
    assert_rss_growth_below,
    json_events,
    proc_status_kib,
    reset_peak_rss,
    run,
    twistd,
    twistd_argv,
    wait_until,
)
from tls_clients import (
    Pump,
    TLSBackend,
    client_context,
    close_tls,
    der_sha256,
    leaf_der,
    refused,
    served_certificate,
    tls_connect,
    tls_echo,
    tls_exchange,
    tls_ping,
)

SOAK = os.environ.get("TUNNELKIT_SOAK") == "1"

JSON_LOG = ("--logger", "tunnelkit.json_log.observer")

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")

needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

#: OpenSSL's security level 0 lets a client (or a server) use TLS 1.0/1.1
#: and SHA-1 signatures, so only the server's protocol floor can refuse them.
SECLEVEL0 = "DEFAULT@SECLEVEL=0"

_proxy_numbers = itertools.count()


# -- the proxy under test -----------------------------------------------------


class Proxy:
    """A running ``twistd -n tunnelkit`` and the address it listens on."""

    def __init__(self, process: Process, address: str) -> None:
        self.process = process
        self.address = address
        self.port = split_address(address)[1]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in json_events(self.process.stdout) if e.get("event") == name]

    def wait_events(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The first ``count`` events named ``name``, once logged."""

        def enough(text: str) -> list[dict[str, Any]] | None:
            found = [e for e in json_events(text) if e.get("event") == name]
            return found[:count] if len(found) >= count else None

        return self.process.wait_for(enough, f"{count} {name} event(s)", timeout)

    def closed(self, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        return self.wait_events("tunnel_closed", count, timeout)

    def closed_for(self, client_port: int, timeout: float = 15.0) -> dict[str, Any]:
        """The ``tunnel_closed`` event of the client that connected from ``client_port``."""

        def found(text: str) -> dict[str, Any] | None:
            for event in json_events(text):
                if event.get("event") == "tunnel_closed" and str(event.get("client")).endswith(
                    f":{client_port}"
                ):
                    return event
            return None

        return self.process.wait_for(found, f"tunnel_closed of client port {client_port}", timeout)


@contextlib.contextmanager
def tls_proxy(cwd: Path, plane: Plane, *args: str, listen: str = "127.0.0.1:0") -> Iterator[Proxy]:
    """``twistd -n tunnelkit --listen 127.0.0.1:0 ARGS`` on ``plane`` (each in its own directory, for twistd.pid)."""
    directory = cwd / f"proxy{next(_proxy_numbers)}"
    directory.mkdir()
    process = twistd(
        "--listen",
        listen,
        "--drain-timeout",
        "2",
        *args,
        cwd=directory,
        twistd_options=JSON_LOG,
        plane=plane,
    )
    with process:
        [address] = process.wait_listening()
        yield Proxy(process, address)
        assert_clean_stop(process, process.stop())


def tls_args(*pairs: Pair) -> list[str]:
    args: list[str] = []
    for pair in pairs:
        args += ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
    return args


class PKI:
    """A CA per test, its PEM file, and certificates it issues, in one directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = write_ca(self.ca, directory)

    def pair(self, *identities: str, name: str | None = None, **options: Any) -> Pair:
        return write_pair(self.ca, self.directory, *identities, name=name, **options)

    def other_ca(self, name: str) -> tuple[trustme.CA, Path]:
        ca = trustme.CA()
        return ca, write_ca(ca, self.directory, name)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


def assert_handshake_failure(event: dict[str, Any]) -> None:
    """A failed handshake's ``tunnel_closed``: close_kind error, no backend dialled."""
    assert event["close_kind"] == "error", event
    assert event["reason"].startswith(("TLS handshake failed", "TLS handshake refused")), event
    assert event["backend"] == "-", event
    assert event["backend_address"] == "-", event
    assert event.get("connect_time") is None, event


def plain_client_cut_off(address: str) -> bytes:
    """A plaintext client that sends a little and reads until the proxy ends it; what it got."""
    with connect(address) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"hello?")
        try:
            return recv_outcome(sock)[0]
        except OSError:
            return b""


# -- 1. curl through the offloader ---------------------------------------------


def curl(*args: str) -> bytes:
    """``curl ARGS`` must exit 0 (its stderr says why not); the body it wrote to stdout."""
    assert CURL is not None
    fetched = subprocess.run([CURL, *args], capture_output=True, timeout=30, check=False)
    assert fetched.returncode == 0, fetched.stderr
    return fetched.stdout


@needs_curl
@pytest.mark.parametrize("key_form", ["separate-key", "combined-pem"])
@on_each_plane
def test_curl_https_to_plain_http_backend(
    tmp_path: Path, pki: PKI, key_form: str, plane: Plane
) -> None:
    """curl --cacert CA https://localhost:P/ gets a 3 MiB body from a plaintext HTTP backend; the chain (leaf + intermediate) is served."""
    assert CURL is not None
    intermediate = pki.ca.create_child_ca()
    pair = write_pair(intermediate, pki.directory, "localhost")
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(3 * MiB)
    (www / "file").write_bytes(body)
    combined = key_form == "combined-pem"
    tls = ["--tls-cert", str(pair.combined)] if combined else tls_args(pair)
    with http_backend(www) as backend, tls_proxy(tmp_path, plane, *tls, "--to", backend) as proxy:
        fetched = curl(
            "-s",
            "-S",
            "-f",
            "--max-time",
            "20",
            "--cacert",
            str(pki.ca_path),
            "--resolve",
            f"localhost:{proxy.port}:127.0.0.1",
            f"https://localhost:{proxy.port}/file",
        )
        assert len(fetched) == len(body)
        assert sha256(fetched) == sha256(body)
        [closed] = proxy.closed()
    assert closed["tls_version"] in ("TLSv1.2", "TLSv1.3"), closed
    assert closed["tls_cipher"], closed
    assert closed["sni"] == "localhost", closed
    assert "alpn" not in closed, "no --alpn, yet a protocol was negotiated"
    assert closed["bytes_down"] > len(body)
    assert closed["backend"] == backend


@needs_curl
@on_planes(TWISTED)
def test_https_proxy_in_connect_mode(tmp_path: Path, pki: PKI, plane: Plane) -> None:
    """--mode connect over TLS is an HTTPS proxy: curl --proxy https://localhost:P fetches 1 MiB intact."""
    assert CURL is not None
    pair = pki.pair("localhost")
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(MiB)
    (www / "file").write_bytes(body)
    args = ("--mode", "connect", "--allow-dest", "127.0.0.0/8", *tls_args(pair))
    with http_backend(www) as backend, tls_proxy(tmp_path, plane, *args) as proxy:
        fetched = curl(
            "-q",
            "-sS",
            "-f",
            "-p",
            "--max-time",
            "20",
            "--noproxy",
            "",
            "--proxy",
            f"https://localhost:{proxy.port}",
            "--proxy-cacert",
            str(pki.ca_path),
            "--resolve",
            f"localhost:{proxy.port}:127.0.0.1",
            f"http://{backend}/file",
        )
        assert sha256(fetched) == sha256(body)
        [closed] = proxy.closed()
    assert (closed["mode"], closed["target"], closed["status"]) == ("connect", backend, 200)
    assert closed["tls_version"] in ("TLSv1.2", "TLSv1.3"), closed
    assert closed["sni"] == "localhost", closed


@on_planes(TWISTED)
def test_twisted_ssl_endpoint_still_listens(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """--listen ssl:0:...:privateKey=KEY:certKey=CERT (Twisted's own TLS) still relays."""
    backend = serve(echo)
    pair = pki.pair("localhost")
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
    with tls_proxy(tmp_path, plane, "--to", backend.address, listen=listen) as proxy:
        ctx = client_context(pki.ca_path)
        with tls_ping(proxy.address, ctx, "localhost") as tls:
            assert tls.getpeercert(binary_form=True) == leaf_der(pair)
        proxy.closed()
    assert backend.accepted == 1


@needs_curl
@on_planes(TWISTED)
def test_twisted_ssl_endpoint_serves_alpn_clients(tmp_path: Path, pki: PKI, plane: Plane) -> None:
    """An ssl: listener serves clients that offer ALPN (Python ssl, curl by default): no protocol is negotiated."""
    pair = pki.pair("localhost")
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(MiB)
    (www / "file").write_bytes(body)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
    with (
        http_backend(www) as backend,
        tls_proxy(tmp_path, plane, "--to", backend, listen=listen) as proxy,
    ):
        ctx = client_context(pki.ca_path, alpn=["h2", "http/1.1"])
        with tls_connect(proxy.address, ctx, "localhost") as tls:
            assert tls.selected_alpn_protocol() is None
            tls.sendall(b"GET /file HTTP/1.0\r\nHost: localhost\r\n\r\n")
            reply = recv_all(tls)
        assert reply.startswith(b"HTTP/1.0 200"), reply[:100]
        assert sha256(reply[reply.index(b"\r\n\r\n") + 4 :]) == sha256(body)
        fetched = curl(
            "-sS",
            "-f",
            "--max-time",
            "20",
            "--cacert",
            str(pki.ca_path),
            "--resolve",
            f"localhost:{proxy.port}:127.0.0.1",
            f"https://localhost:{proxy.port}/file",
        )
        assert sha256(fetched) == sha256(body)
        proxy.closed(2)


@on_planes(TWISTED)
def test_twisted_ssl_endpoint_logs_tls_errors_in_words(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """A client that refuses an ssl: listener's certificate is logged with OpenSSL's reason, not its error-queue tuples."""
    backend = serve(echo)
    pair = pki.pair("localhost")
    _, stranger_ca = pki.other_ca("stranger")
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
    with tls_proxy(tmp_path, plane, "--to", backend.address, listen=listen) as proxy:
        assert refused(proxy.address, client_context(stranger_ca), "localhost")[0]
        [closed] = proxy.closed()
    assert closed["reason"] == "client reset: tlsv1 alert unknown ca", closed


def test_twisted_ssl_endpoint_with_tls_cert_refused(tmp_path: Path, pki: PKI) -> None:
    """An ssl: listener with --tls-cert (TLS inside TLS) is one start-up error naming both."""
    pair = pki.pair("localhost")
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
    args = ("--listen", listen, *tls_args(pair), "--to", "127.0.0.1:9")
    result = run(twistd_argv(*args), cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    [line] = result.stdout.splitlines()
    assert line.startswith(f"tunnelkit: error: --listen {listen!r}"), line
    assert "--tls-cert" in line, line


# -- 2. protocol versions -------------------------------------------------------

_NEW_SESSION = re.compile(r"^New, (\S+), Cipher is (\S+)\s*$", re.MULTILINE)
_PROTOCOL = re.compile(r"^\s*Protocol\s*:\s*(\S+)\s*$", re.MULTILINE)


def s_client(address: str, *args: str, servername: str | None = "localhost") -> str:
    """``openssl s_client -connect ADDRESS ARGS`` with an empty stdin: its whole output."""
    assert OPENSSL is not None
    host, port = split_address(address)
    argv = [OPENSSL, "s_client", "-connect", f"{host}:{port}", *args]
    if servername is not None:
        argv += ["-servername", servername]
    result = subprocess.run(
        argv,
        input=b"",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=20,
        check=False,
    )
    return result.stdout.decode("utf-8", "replace")


def negotiated(output: str) -> str | None:
    """The protocol s_client negotiated (``TLSv1.2``...), or None when the handshake failed."""
    new = _NEW_SESSION.search(output)
    if new is None or "(NONE)" in (new[1], new[2]):
        return None
    protocol = _PROTOCOL.search(output)
    return protocol[1] if protocol else new[1]


def tls11_control(serve: Serve, pki: PKI) -> None:
    """Skip unless ``s_client -tls1_1 -cipher DEFAULT@SECLEVEL=0`` can do TLS 1.1 here."""
    pair = pki.pair("localhost", name="tls11-control")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers(SECLEVEL0)
        except (ValueError, ssl.SSLError) as e:
            pytest.skip(f"this Python/OpenSSL cannot serve TLS 1.1 for the control: {e}")

    def handshake(conn: socket.socket) -> str | None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            return tls.version()

    control = serve(handshake)
    output = s_client(control.address, "-tls1_1", "-cipher", SECLEVEL0)
    with contextlib.suppress(BaseException):
        control.outcome(5)
    if negotiated(output) != "TLSv1.1":
        pytest.skip(f"openssl s_client cannot do TLS 1.1 on this machine:\n{output[-1500:]}")


@needs_openssl
@on_each_plane
def test_protocol_versions(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """TLS 1.2 and 1.3 are accepted; TLS 1.1 never (even with --tls-ciphers at SECLEVEL 0); --tls-min-version 1.3 refuses 1.2."""
    tls11_control(serve, pki)
    backend = serve(echo)
    pair = pki.pair("localhost")
    to = ("--to", backend.address)
    with (
        tls_proxy(tmp_path, plane, *tls_args(pair), *to) as default,
        tls_proxy(tmp_path, plane, *tls_args(pair), "--tls-ciphers", SECLEVEL0, *to) as weak,
        tls_proxy(tmp_path, plane, *tls_args(pair), "--tls-min-version", "1.3", *to) as modern,
    ):
        outputs = {
            "default -tls1_2": s_client(default.address, "-tls1_2"),
            "default -tls1_3": s_client(default.address, "-tls1_3"),
            "default -tls1_1": s_client(default.address, "-tls1_1", "-cipher", SECLEVEL0),
            "weak -tls1_1": s_client(weak.address, "-tls1_1", "-cipher", SECLEVEL0),
            "weak -tls1_2": s_client(weak.address, "-tls1_2", "-cipher", SECLEVEL0),
            "min1.3 -tls1_2": s_client(modern.address, "-tls1_2"),
            "min1.3 -tls1_3": s_client(modern.address, "-tls1_3"),
        }
        got = {case: negotiated(output) for case, output in outputs.items()}
        expected = {
            "default -tls1_2": "TLSv1.2",
            "default -tls1_3": "TLSv1.3",
            "default -tls1_1": None,
            "weak -tls1_1": None,
            "weak -tls1_2": "TLSv1.2",
            "min1.3 -tls1_2": None,
            "min1.3 -tls1_3": "TLSv1.3",
        }
        assert got == expected, "\n\n".join(f"== {c}\n{o[-1200:]}" for c, o in outputs.items())
        default_events = default.closed(3)
        weak_events = weak.closed(2)
        modern_events = modern.closed(2)
        wait_until(lambda: backend.accepted == 4, "4 backend connections", 10)
    # Refusals are handshake failures; accepted sessions are tunnels with the version logged.
    for events, versions in (
        (default_events, ["TLSv1.2", "TLSv1.3"]),
        (weak_events, ["TLSv1.2"]),
        (modern_events, ["TLSv1.3"]),
    ):
        failed = [e for e in events if "tls_version" not in e]
        assert len(failed) == 1, events
        assert_handshake_failure(failed[0])
        assert sorted(e["tls_version"] for e in events if "tls_version" in e) == versions
    assert backend.accepted == 4


@on_each_plane
def test_tls12_ciphers_in_server_order(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """--tls-ciphers limits TLS 1.2 suites and the server's order wins over the client's."""
    backend = serve(echo)
    pair = pki.pair("localhost")
    ours = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"
    args = (*tls_args(pair), "--tls-ciphers", ours, "--to", backend.address)

    def tls12(ciphers: str) -> ssl.SSLContext:
        ctx = client_context(pki.ca_path, maximum=ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers(ciphers)
        return ctx

    with tls_proxy(tmp_path, plane, *args) as proxy:
        client_order = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384"
        with tls_ping(proxy.address, tls12(client_order), "localhost") as tls:
            cipher = tls.cipher()
            port = tls.getsockname()[1]
        assert cipher is not None
        assert cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384", cipher
        assert proxy.closed_for(port)["tls_cipher"] == "ECDHE-ECDSA-AES256-GCM-SHA384"
        was_refused, _ = refused(proxy.address, tls12("ECDHE-ECDSA-AES128-GCM-SHA256"), "localhost")
        assert was_refused, "a TLS 1.2 suite outside --tls-ciphers was accepted"
        proxy.closed(2)
    assert backend.accepted == 1


# -- 3. SNI ----------------------------------------------------------------------


@on_each_plane
def test_sni_selects_certificate(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """The SNI name picks the certificate (exact beats wildcard, a wildcard matches one label); unknown or no name gets the first; --tls-strict-sni refuses those."""
    backend = serve(echo)
    a = pki.pair("a.example")
    wildcard = pki.pair("*.b.example")
    exact = pki.pair("exact.b.example")
    certs = tls_args(a, wildcard, exact)
    ctx = client_context(pki.ca_path, check_hostname=False)
    cases: dict[str | None, Pair] = {
        "a.example": a,
        "x.b.example": wildcard,
        "exact.b.example": exact,
        "deep.x.b.example": a,
        "b.example": a,
        "unknown.example": a,
        None: a,
    }
    with tls_proxy(tmp_path, plane, *certs, "--to", backend.address) as proxy:
        for name, pair in cases.items():
            der = served_certificate(proxy.address, ctx, name)
            assert der == leaf_der(pair), f"SNI {name!r}: served the wrong certificate"
        events = proxy.closed(len(cases))
    assert sorted(e["sni"] for e in events if "sni" in e) == sorted(n for n in cases if n)
    assert sum("sni" not in e for e in events) == 1

    strict_ok = ["a.example", "x.b.example", "exact.b.example"]
    strict_refused: list[str | None] = ["unknown.example", "deep.x.b.example", None]
    with tls_proxy(tmp_path, plane, *certs, "--tls-strict-sni", "--to", backend.address) as strict:
        for name in strict_ok:
            assert served_certificate(strict.address, ctx, name) == leaf_der(cases[name])
        alerts: dict[str | None, str] = {}
        for refused_name in strict_refused:
            with pytest.raises(ssl.SSLError) as failure:
                served_certificate(strict.address, ctx, refused_name)
            alerts[refused_name] = str(failure.value)
        strict_events = strict.closed(len(strict_ok) + len(strict_refused))
    failed = [e for e in strict_events if e["close_kind"] == "error"]
    assert len(failed) == len(strict_refused), strict_events
    for event in failed:
        assert_handshake_failure(event)
    wait_until(lambda: backend.accepted == len(cases) + len(strict_ok), "backend accepts", 5)
    # The refusal is a fatal alert (docs/tls.md says why it is handshake_failure) and
    # the log names the SNI name that no certificate serves and those served, or
    # says that the client sent none.
    assert all("HANDSHAKE_FAILURE" in alert.upper() for alert in alerts.values()), alerts
    served = "a.example, *.b.example, exact.b.example"
    assert sorted(str(e["reason"]) for e in failed) == sorted(
        [
            "TLS handshake refused by --tls-strict-sni: the client sent no SNI name",
            *(
                f"TLS handshake refused by --tls-strict-sni: no certificate for SNI name"
                f" {name!r} (served: {served})"
                for name in strict_refused
                if name
            ),
        ]
    )


# -- 4. ALPN -----------------------------------------------------------------------


@on_each_plane
def test_alpn(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """--alpn h2,http/1.1: our preference wins, one shared protocol is chosen, and a client offering none of them connects without ALPN."""
    backend = serve(echo)
    pair = pki.pair("localhost")
    offers: list[tuple[list[str] | None, str | None]] = [
        (["http/1.1"], "http/1.1"),
        (["http/1.1", "h2"], "h2"),
        (["h2"], "h2"),
        (["spdy/3.1", "imap"], None),
        (None, None),
    ]
    with tls_proxy(
        tmp_path, plane, *tls_args(pair), "--alpn", "h2,http/1.1", "--to", backend.address
    ) as proxy:
        for offer, expected in offers:
            ctx = client_context(pki.ca_path, alpn=offer)
            with tls_ping(proxy.address, ctx, "localhost") as tls:
                assert tls.selected_alpn_protocol() == expected, offer
                port = tls.getsockname()[1]
            event = proxy.closed_for(port)
            assert event.get("alpn") == expected, (offer, event)
            if expected is None:
                assert "alpn" not in event, event
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as plain:
        ctx = client_context(pki.ca_path, alpn=["h2", "http/1.1"])
        with tls_ping(plain.address, ctx, "localhost") as tls:
            assert tls.selected_alpn_protocol() is None


# -- 5. mutual TLS -------------------------------------------------------------------


@on_each_plane
def test_client_certificates(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """--tls-client-ca: no certificate or one from another CA fails the handshake; a good one works and is logged; --tls-client-optional admits clients without one."""
    backend = serve(echo)
    pair = pki.pair("localhost")
    client_ca, client_ca_path = pki.other_ca("client-ca")
    rogue_ca, _ = pki.other_ca("rogue-ca")
    good = write_pair(
        client_ca,
        pki.directory,
        "client.example",
        "alice@example.org",
        common_name="alice",
        name="good",
    )
    rogue = write_pair(
        rogue_ca,
        pki.directory,
        "client.example",
        "alice@example.org",
        common_name="alice",
        name="rogue",
    )
    good_der = leaf_der(good)
    subject = x509.load_der_x509_certificate(good_der).subject.rfc4514_string()

    def ctx(cert: Pair | None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        return client_context(pki.ca_path, cert=cert, maximum=maximum)

    def assert_logs_client(event: dict[str, Any]) -> None:
        assert event["client_subject"] == subject, event
        assert "client.example" in event["client_san"], event
        assert "alice@example.org" in event["client_san"], event
        assert event["client_fingerprint"].lower() == der_sha256(good_der), event

    args = (*tls_args(pair), "--tls-client-ca", str(client_ca_path), "--to", backend.address)
    with tls_proxy(tmp_path, plane, *args) as proxy:
        for cert, maximum in [
            (None, None),
            (None, ssl.TLSVersion.TLSv1_2),
            (rogue, None),
            (rogue, ssl.TLSVersion.TLSv1_2),
        ]:
            was_refused, _ = refused(proxy.address, ctx(cert, maximum), "localhost")
            assert was_refused, f"client cert {cert and cert.cert.name}, max {maximum}: not refused"
        with tls_ping(proxy.address, ctx(good), "localhost") as tls:
            port = tls.getsockname()[1]
        with tls_ping(proxy.address, ctx(good, ssl.TLSVersion.TLSv1_2), "localhost") as tls:
            port12 = tls.getsockname()[1]
        events = proxy.closed(6)
        assert_logs_client(proxy.closed_for(port))
        assert_logs_client(proxy.closed_for(port12))
    failed = [e for e in events if e["close_kind"] == "error"]
    assert len(failed) == 4, events
    for event in failed:
        assert_handshake_failure(event)
        assert "client_subject" not in event
    assert backend.accepted == 2

    optional = (*args, "--tls-client-optional")
    with tls_proxy(tmp_path, plane, *optional) as proxy:
        with tls_ping(proxy.address, ctx(None), "localhost") as tls:
            anonymous = tls.getsockname()[1]
        with tls_ping(proxy.address, ctx(good), "localhost") as tls:
            known = tls.getsockname()[1]
        was_refused, _ = refused(proxy.address, ctx(rogue), "localhost")
        assert was_refused, "a certificate from another CA was accepted with --tls-client-optional"
        assert "client_subject" not in proxy.closed_for(anonymous)
        assert_logs_client(proxy.closed_for(known))
        proxy.closed(3)
    assert backend.accepted == 4


# -- 6. renegotiation -----------------------------------------------------------------


class SClientSession:
    """An interactive ``openssl s_client -tls1_2`` whose stdin stays open until told."""

    def __init__(self, address: str, ca: Path, version: str = "-tls1_2") -> None:
        assert OPENSSL is not None
        host, port = split_address(address)
        argv = [OPENSSL, "s_client", "-connect", f"{host}:{port}", version]
        argv += ["-servername", "localhost", "-CAfile", str(ca)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            with self._changed:
                self._lines.append(line.decode("utf-8", "replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def send(self, line: str) -> bool:
        """Write a line to s_client; False if it has gone."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def wait_for(self, text: str, timeout: float) -> bool:
        """Wait until ``text`` is in the output (True) or s_client exits or time is up (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if text in "".join(self._lines):
                    return True
                ended = self.proc.poll() is not None and not self._reader.is_alive()
                remaining = deadline - time.monotonic()
                if ended or remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.1))

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def try_renegotiation(address: str, ca: Path) -> tuple[bool, str]:
    """Echo a line, ask s_client to renegotiate (``R``), echo another: (renegotiated, output)."""
    before, after = f"before-{os.urandom(6).hex()}", f"after-{os.urandom(6).hex()}"
    session = SClientSession(address, ca)
    try:
        session.send(before)
        assert session.wait_for(before, 10), f"no echo before renegotiating:\n{session.output}"
        session.send("R")
        session.wait_for("RENEGOTIATING", 5)
        session.send(after)
        echoed_after = session.wait_for(after, 5)
    finally:
        session.close()
    output = session.output
    assert "RENEGOTIATING" in output, output
    # s_client verifies the server's certificate again on a renegotiation.
    rehandshaked = output.count("depth=0") >= 2
    return echoed_after and rehandshaked, output


#: OpenSSL 3's SSL_OP_ALLOW_CLIENT_RENEGOTIATION (not exported by Python's ssl).
ALLOW_CLIENT_RENEGOTIATION = 1 << 8


@needs_openssl
@on_each_plane
def test_client_renegotiation_refused(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """s_client's R (a TLS 1.2 renegotiation) succeeds against a server allowing it, and never through tunnelkit."""
    pair = pki.pair("localhost")
    control = TLSBackend(serve, pair, tls_echo)
    control.ctx.options |= ALLOW_CLIENT_RENEGOTIATION
    renegotiated, output = try_renegotiation(control.address, pki.ca_path)
    if not renegotiated:
        pytest.skip(f"s_client cannot renegotiate with a permissive server here:\n{output[-1500:]}")
    backend = serve(echo)
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        renegotiated, output = try_renegotiation(proxy.address, pki.ca_path)
        assert not renegotiated, f"the client renegotiated through tunnelkit:\n{output}"
        assert output.count("depth=0") == 1, output
        proxy.closed(1)


@needs_openssl
@on_each_plane
def test_client_key_update(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """s_client's K (a TLS 1.3 KeyUpdate asking for ours) mid-stream: the echo goes on, both ways."""
    backend = serve(echo)
    with tls_proxy(
        tmp_path, plane, *tls_args(pki.pair("localhost")), "--to", backend.address
    ) as proxy:
        session = SClientSession(proxy.address, pki.ca_path, "-tls1_3")
        # One update: s_client (3.0) does not send a second one's next line.
        lines = [f"line-{i}-{os.urandom(6).hex()}" for i in range(2)]
        try:
            session.send(lines[0])
            assert session.wait_for(lines[0], 10), session.output
            session.send("K")
            assert session.wait_for("KEYUPDATE", 5), session.output
            session.send(lines[1])
            assert session.wait_for(lines[1], 5), f"no echo after a key update:\n{session.output}"
        finally:
            session.close()
        [event] = proxy.closed(1)
        assert event["close_kind"] == "FIN", event
        assert event["bytes_up"] == event["bytes_down"] == sum(len(line) + 1 for line in lines)


@on_each_plane
def test_key_updates_while_the_client_reads_nothing(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """Two KeyUpdates asking for ours, sent while our writes to the client are blocked: all 16 MiB still arrive, both ways."""
    down, up = os.urandom(16 * MiB), os.urandom(MiB)
    backend = serve(functools.partial(send_while_reading, down))
    with tls_proxy(
        tmp_path, plane, *tls_args(pki.pair("localhost")), "--to", backend.address
    ) as proxy:
        with Pump(proxy.address, client_context(pki.ca_path), "localhost") as pump:
            pump.stall_then_update_keys(2.0, updates=2)
            pump.run(up, timeout=60)
        assert backend.outcome() == sha256(up)
        [closed] = proxy.closed()
    assert (pump.received, pump.digest.hexdigest()) == (len(down), sha256(down))
    assert (closed["bytes_up"], closed["bytes_down"], closed["close_kind"]) == (
        len(up),
        len(down),
        "FIN",
    ), closed


@on_each_plane
def test_writing_to_a_slow_tls_reader_is_not_idle(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """A TLS tunnel that only writes (a held 1 MiB read draining to a slow reader) for longer than --idle-timeout is not idle."""
    size = 2 * MiB
    bulk = BulkSender()
    backend = serve(bulk)
    args = ("--idle-timeout", "0.5", "--read-size", str(MiB), "--sndbuf", "16384")
    with tls_proxy(
        tmp_path, plane, *tls_args(pki.pair("localhost")), "--to", backend.address, *args
    ) as proxy:
        # Small kernel buffers: what the proxy holds drains at the reader's pace.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        raw.settimeout(15)
        raw.connect(split_address(proxy.address))
        with client_context(pki.ca_path).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"%d\n" % size)
            digest, received = hashlib.sha256(), 0
            for _ in range(size // 1024 + 1000):
                chunk = tls.recv(32 * 1024)
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
                time.sleep(0.05)  # at most 640 KiB/s: a held MiB takes longer than the timeout
        assert (received, digest.hexdigest()) == (size, backend.outcome())
        [closed] = proxy.closed()
    assert (closed["closed_by"], closed["close_kind"]) == ("backend", "FIN"), closed


# -- 7. bulk both ways ------------------------------------------------------------------


@on_each_plane
def test_64_mib_both_ways_at_once(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """64 MiB up and the echo of it down at the same time through a TLS client leg, both intact."""
    size = 64 * MiB
    payload = os.urandom(size)
    backend = serve(hashing_echo)
    pair = pki.pair("localhost")
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        pump = tls_exchange(
            proxy.address, client_context(pki.ca_path), "localhost", payload, timeout=120
        )
        assert backend.outcome(30) == sha256(payload)
        [closed] = proxy.closed()
    assert pump.received == size
    assert pump.digest.hexdigest() == sha256(payload)
    assert pump.peer_end == "close_notify"
    # Download overlapped upload: much of the echo had come back before the upload ended.
    assert pump.written_all_at is not None
    assert 0 < pump.written_all_at < size
    assert (closed["bytes_up"], closed["bytes_down"]) == (size, size)
    assert closed["close_kind"] == "FIN", closed


# -- 8. backpressure through TLS ---------------------------------------------------------


@pytest.mark.soak
@on_each_plane
def test_stalled_tls_reader_keeps_memory_flat(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """A backend pushing 256 MiB (1 GiB with TUNNELKIT_SOAK=1) to a TLS client that stalls, then reads slowly, grows twistd's RSS by under 64 MiB."""
    size = (1024 if SOAK else 256) * MiB
    bulk = BulkSender()
    backend = serve(bulk)
    pair = pki.pair("localhost")
    ctx = client_context(pki.ca_path)
    with tls_proxy(tmp_path, plane, *tls_args(pair), "--to", backend.address) as proxy:
        with tls_connect(proxy.address, ctx, "localhost") as tls:
            tls.sendall(b"%d\n" % (4 * MiB))
            warmup = b""
            while chunk := tls.recv(MiB):
                warmup += chunk
        assert len(warmup) == 4 * MiB
        assert backend.outcome() == sha256(warmup)
        proxy.closed(1)
        pid = proxy.process.pid
        baseline = proc_status_kib(pid, "VmRSS")
        peak_reset = reset_peak_rss(pid)
        with tls_connect(proxy.address, ctx, "localhost") as tls:
            tls.sendall(b"%d\n" % size)
            stalled_at = bulk.wait_stalled(size)
            rss_stalled = proc_status_kib(pid, "VmRSS")
            received, received_digest = read_slowly(tls)
        sent_digest = backend.outcome()
        peak = proc_status_kib(pid, "VmHWM" if peak_reset else "VmRSS")
        proxy.closed(2)
    assert stalled_at < size, "the backend sent everything to a TLS reader that read nothing"
    assert received == size
    assert received_digest == sent_digest
    assert_rss_growth_below(64, baseline, rss_stalled, peak, stalled_at)


#: Idle TLS tunnels held open by :func:`test_idle_tls_tunnels_are_small`.
IDLE_TLS = 300


@on_each_plane
def test_idle_tls_tunnels_are_small(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """300 idle TLS tunnels, each proven by an echo, cost twistd under 32 KiB each (no idle record buffers)."""
    backend = serve(echo)
    ctx = client_context(pki.ca_path)
    with tls_proxy(
        tmp_path, plane, *tls_args(pki.pair("localhost")), "--to", backend.address
    ) as proxy:
        with contextlib.ExitStack() as stack:

            def idle_client() -> None:
                tls = stack.enter_context(tls_connect(proxy.address, ctx, "localhost"))
                tls.sendall(b"?")
                assert tls.recv(1) == b"?"

            for _ in range(20):  # the first ones warm up allocator pools
                idle_client()
            baseline = proc_status_kib(proxy.process.pid, "VmRSS")
            for _ in range(IDLE_TLS):
                idle_client()
            grown = proc_status_kib(proxy.process.pid, "VmRSS") - baseline
        proxy.closed(IDLE_TLS + 20)
    assert not MEMORY_CHECKED or grown / IDLE_TLS < 32, (
        f"{grown / IDLE_TLS:.1f} KiB per idle TLS tunnel"
    )


# -- 9. silent and garbage clients -------------------------------------------------------

_HANDSHAKE_TIMEOUT_REASON = re.compile(r"TLS handshake timeout \(2(\.0*)? s\)")


@on_each_plane
def test_silent_and_garbage_clients(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """40 silent and 20 garbage clients: a real client still handshakes and echoes within 1 s; each of the 60 ends in one tunnel_closed (timeout/error) and none reaches the backend."""
    backend = serve(echo)
    pair = pki.pair("localhost")
    args = (*tls_args(pair), "--tls-handshake-timeout", "2", "--to", backend.address)
    silent: list[socket.socket] = []
    garbage: list[socket.socket] = []
    with tls_proxy(tmp_path, plane, *args) as proxy:
        try:
            for _ in range(40):
                silent.append(connect(proxy.address))
            for i in range(20):
                sock = connect(proxy.address)
                garbage.append(sock)
                if i % 2:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                else:
                    sock.sendall(b"\x00\x00\x00\x00\x00\x00\x00\x00" + os.urandom(1024))
            ctx = client_context(pki.ca_path)
            started = time.monotonic()
            with tls_ping(proxy.address, ctx, "localhost") as tls:
                elapsed = time.monotonic() - started
                real_port = tls.getsockname()[1]
            assert elapsed < 1.0, f"the real client took {elapsed:.2f} s"
            # Both kinds are dropped by the proxy (the garbage at once, the silent at 2 s).
            for sock in garbage + silent:
                recv_outcome(sock)
            silent_ports = {s.getsockname()[1] for s in silent}
            garbage_ports = {s.getsockname()[1] for s in garbage}
            proxy.closed(61, timeout=20)
        finally:
            for sock in silent + garbage:
                sock.close()
    events = [e for e in json_events(proxy.process.stdout) if e.get("event") == "tunnel_closed"]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        by_port.setdefault(split_address(event["client"])[1], []).append(event)
    assert len(events) == 61, [e.get("text") for e in events]
    assert set(by_port) == silent_ports | garbage_ports | {real_port}
    assert all(len(found) == 1 for found in by_port.values()), "a client logged twice"
    for port in silent_ports:
        [event] = by_port[port]
        assert event["close_kind"] == "timeout", event
        assert _HANDSHAKE_TIMEOUT_REASON.fullmatch(event["reason"]), event
        assert event["backend"] == "-", event
        assert event.get("connect_time") is None, event
    for port in garbage_ports:
        [event] = by_port[port]
        assert_handshake_failure(event)
    [real] = by_port[real_port]
    assert real["backend"] == backend.address
    assert backend.accepted == 1, "a client that never completed a handshake reached the backend"


# -- 10. SIGHUP reload ---------------------------------------------------------------------


def install(pair: Pair, cert: Path, key: Path) -> None:
    shutil.copyfile(pair.cert, cert)
    shutil.copyfile(pair.key, key)


@on_each_plane
def test_sighup_reloads_certificates(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """SIGHUP under load: the transfer in flight finishes intact; new handshakes get the new certificate; a broken file, a mismatched or damaged key keeps the old one and logs tls_reload_failed saying which file, what is wrong, and that the old certificates stay in use."""
    size = 32 * MiB
    payload = os.urandom(size)
    backend = serve(functools.partial(paced_bulk, payload, 5.0))
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "site.pem", live / "site.key"
    first = pki.pair("localhost", name="first")
    second_ca, second_ca_path = pki.other_ca("second-ca")
    second = write_pair(second_ca, pki.directory, "localhost", name="second")
    third = write_pair(second_ca, pki.directory, "localhost", name="third")
    install(first, cert, key)
    trust_both = client_context(pki.ca_path)
    trust_both.load_verify_locations(cafile=str(second_ca_path))

    def served() -> bytes:
        return served_certificate(proxy.address, trust_both, "localhost")

    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--to", backend.address)
    with tls_proxy(tmp_path, plane, *args) as proxy:
        dial = functools.partial(
            tls_connect, ctx=client_context(pki.ca_path), server_hostname="localhost"
        )
        download = Download(proxy.address, b"GET\n", dial)
        wait_until(lambda: download.received >= 2 * MiB or download.done.is_set(), "2 MiB", 10)
        assert not download.done.is_set(), download.failure
        assert served() == leaf_der(first)

        install(second, cert, key)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_events("tls_reloaded", 1)
        assert served() == leaf_der(second), "a new handshake did not get the reloaded certificate"
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(proxy.address, client_context(pki.ca_path), "localhost")
        assert not download.done.is_set(), "the transfer ended before the reload was done"

        spoiled = [
            # A broken certificate file; then third's certificate, whose key is
            # still second's (a mismatch); then a damaged key.
            lambda: cert.write_text(
                "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"
            ),
            lambda: shutil.copyfile(third.cert, cert),
            lambda: key.write_text(
                "-----BEGIN PRIVATE KEY-----\nAAAAnot-a-key\n-----END PRIVATE KEY-----\n"
            ),
        ]
        for count, spoil in enumerate(spoiled, 1):
            spoil()
            proxy.process.send_signal(signal.SIGHUP)
            proxy.wait_events("tls_reload_failed", count)
            assert served() == leaf_der(second), f"spoiled file {count} replaced the certificate"

        install(third, cert, key)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_events("tls_reloaded", 2)
        assert served() == leaf_der(third)

        download.join(30)
        assert download.done.is_set(), "the transfer did not finish"
        assert not download.failure, download.failure
        assert download.received == size
        assert download.digest.hexdigest() == sha256(payload)
        assert len(proxy.events("tls_reloaded")) == 2
    assert_reload_failures(proxy.events("tls_reload_failed"), cert, key)


def assert_reload_failures(failures: list[dict[str, Any]], cert: Path, key: Path) -> None:
    """The broken certificate, mismatched key and damaged key: each line names the file, the problem, and that the old certificates stay."""
    damaged = "cannot be decoded (damaged or truncated)"
    assert [failure["error"] for failure in failures] == [
        f"--tls-cert {cert}: its PEM certificate {damaged}",
        f"--tls-key {key}: the key does not match the certificate in {cert}",
        f"--tls-key {key}: its PEM private key {damaged}",
    ]
    for failure in failures:
        text = failure["log_format"].format(error=failure["error"])
        assert text.endswith("; the certificates loaded before stay in use"), text
        assert text.startswith("TLS reload failed: "), text


# -- 11. TLS to backends ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tls-prefix", "backend-tls-flag", "ip-address"])
@on_planes(TWISTED)
def test_backend_tls_verified(
    tmp_path: Path, serve: Serve, pki: PKI, form: str, plane: Plane
) -> None:
    """--to tls:localhost:P (or --backend-tls, or an IP backend) with --backend-ca relays 2 MiB intact and sends SNI."""
    pair = pki.pair("127.0.0.1" if form == "ip-address" else "localhost")
    backend = TLSBackend(serve, pair, tls_echo)
    to = {
        "tls-prefix": ["--to", f"tls:localhost:{backend.port}"],
        "backend-tls-flag": ["--to", f"localhost:{backend.port}", "--backend-tls"],
        "ip-address": ["--to", f"tls:127.0.0.1:{backend.port}"],
    }[form]
    with tls_proxy(tmp_path, plane, *to, "--backend-ca", str(pki.ca_path)) as proxy:
        digest = sha256(assert_echoes(proxy.address))
        [closed] = proxy.closed()
    assert backend.handshakes == 1
    # The TLS backend saw the whole payload, then close_notify (its recv() returned b"").
    assert backend.server.outcome() == digest
    assert backend.sni == ([None] if form == "ip-address" else ["localhost"])
    assert closed["backend"] == to[1], closed
    assert (closed["bytes_up"], closed["bytes_down"]) == (2 * MiB, 2 * MiB)


@on_planes(TWISTED)
def test_backend_ca_bundle(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """--backend-ca trusts every CA of a bundle file, not only its first."""
    second_ca, second_path = pki.other_ca("second-ca")
    bundle = pki.directory / "bundle.pem"
    bundle.write_bytes(pki.ca_path.read_bytes() + second_path.read_bytes())
    pair = write_pair(second_ca, pki.directory, "localhost", name="by-second")
    backend = TLSBackend(serve, pair, tls_echo)
    to = f"tls:localhost:{backend.port}"
    with tls_proxy(tmp_path, plane, "--to", to, "--backend-ca", str(bundle)) as proxy:
        digest = sha256(assert_echoes(proxy.address))
        proxy.closed()
    assert backend.server.outcome() == digest


def assert_backend_failed(proxy: Proxy) -> dict[str, Any]:
    """A plaintext client is cut off with no data and the tunnel logs the backend's failure."""
    assert plain_client_cut_off(proxy.address) == b""
    [closed] = proxy.closed()
    assert closed["close_kind"] == "error", closed
    assert closed["backend_address"] == "-", closed
    reason = closed["reason"].lower()
    assert reason.startswith("no backend connected"), closed
    assert any(word in reason for word in ("certificate", "verif", "mismatch", "tls", "ssl")), (
        closed
    )
    return closed


def tls11_only(pair: Pair, conn: socket.socket) -> None:
    """Backend: a server that speaks TLS 1.1 at most (and allows it), for one handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers(SECLEVEL0)
    with ctx.wrap_socket(conn, server_side=True) as tls:
        tls_echo(tls)


@on_planes(TWISTED)
def test_backend_tls_1_1_refused(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """TLS 1.2 is the minimum towards backends: a TLS 1.1-only backend fails the connection, logged in OpenSSL's words."""
    backend = serve(functools.partial(tls11_only, pki.pair("localhost")))
    to = f"tls:localhost:{split_address(backend.address)[1]}"
    with tls_proxy(tmp_path, plane, "--to", to, "--backend-ca", str(pki.ca_path)) as proxy:
        closed = assert_backend_failed(proxy)
    assert backend.accepted == 1
    # OpenSSL's reason, without its error-queue tuples.
    assert closed["reason"] == (
        f"no backend connected: {to}: TLS handshake failed: tlsv1 alert protocol version"
    )


#: Each bad backend certificate and the reason its tunnel must log: which name was
#: checked, against which CAs, and why it failed ({ca}: the --backend-ca file).
BAD_BACKEND_CERTIFICATES = {
    "wrong-name": "hostname mismatch, the certificate is for other.example"
    " (name checked: 'localhost'; CAs: --backend-ca {ca})",
    "unknown-ca": "unable to get local issuer certificate"
    " (name checked: 'localhost'; CAs: --backend-ca {ca})",
    "wrong-sni-name": "hostname mismatch, the certificate is for localhost"
    " (name checked: 'sni.example'; CAs: --backend-ca {ca})",
    "self-signed": "self-signed certificate (name checked: 'localhost'; CAs: --backend-ca {ca})",
    "system-cas": "unable to get local issuer certificate"
    " (name checked: 'localhost'; CAs: the system's CAs)",
}


@pytest.mark.parametrize("problem", list(BAD_BACKEND_CERTIFICATES))
@on_planes(TWISTED)
def test_backend_tls_refuses_bad_certificate(
    tmp_path: Path, serve: Serve, pki: PKI, problem: str, plane: Plane
) -> None:
    """A backend certificate for another name (or the --backend-sni name), from another CA, self-signed, or not in the system's CAs fails the connection; the log says which name, which CAs, and why."""
    if problem == "wrong-name":
        pair = pki.pair("other.example")
    elif problem in ("unknown-ca", "system-cas"):
        other_ca, _ = pki.other_ca("other-ca")
        pair = write_pair(other_ca, pki.directory, "localhost", name="untrusted")
    elif problem == "self-signed":
        own, _ = pki.other_ca("self-signed")
        cert, key = pki.directory / "self-signed.pem", pki.directory / "self-signed.key"
        own.cert_pem.write_to_path(str(cert))
        own.private_key_pem.write_to_path(str(key))
        pair = Pair(cert, key, cert)
    else:
        pair = pki.pair("localhost")
    backend = TLSBackend(serve, pair, tls_echo)
    args = ["--to", f"tls:localhost:{backend.port}"]
    if problem != "system-cas":
        args += ["--backend-ca", str(pki.ca_path)]
    if problem == "wrong-sni-name":
        args += ["--backend-sni", "sni.example"]
    with tls_proxy(tmp_path, plane, *args) as proxy:
        closed = assert_backend_failed(proxy)
    assert backend.server.accepted == 1
    if problem == "wrong-sni-name":
        assert backend.sni == ["sni.example"]
    why = BAD_BACKEND_CERTIFICATES[problem].format(ca=pki.ca_path)
    assert closed["reason"] == (
        f"no backend connected: tls:localhost:{backend.port}: certificate verify failed: {why}"
    )


@on_planes(TWISTED)
def test_backend_insecure(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """--backend-insecure relays to a backend whose certificate has another name and an unknown CA, and warns at start-up."""
    other_ca, _ = pki.other_ca("other-ca")
    pair = write_pair(other_ca, pki.directory, "other.example", name="untrusted")
    backend = TLSBackend(serve, pair, tls_echo)
    args = ("--to", f"tls:localhost:{backend.port}", "--backend-insecure")
    with tls_proxy(tmp_path, plane, *args) as proxy:
        warnings_logged = [
            e
            for e in json_events(proxy.process.stdout)
            if (e.get("log_level") or {}).get("name") == "warn"
            and str(e.get("log_namespace", "")).startswith("tunnelkit")
            and any(word in json.dumps(e).lower() for word in ("insecure", "not verified"))
        ]
        assert warnings_logged, f"no warning at start-up:\n{proxy.process.output}"
        assert_echoes(proxy.address)
        proxy.closed()
    assert backend.handshakes == 1


@on_planes(TWISTED)
def test_backend_sni(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """--backend-sni NAME is sent to an IP backend and its certificate is checked against NAME."""
    pair = pki.pair("sni.example")
    backend = TLSBackend(serve, pair, tls_echo)
    args = ("--to", f"tls:127.0.0.1:{backend.port}", "--backend-sni", "sni.example")
    with tls_proxy(tmp_path, plane, *args, "--backend-ca", str(pki.ca_path)) as proxy:
        assert_echoes(proxy.address)
        proxy.closed()
    assert backend.sni == ["sni.example"]


@on_planes(TWISTED)
def test_backend_tls_failover(tmp_path: Path, serve: Serve, pki: PKI, plane: Plane) -> None:
    """With two --to backends, a failed TLS handshake with the first moves on to the second."""
    bad = TLSBackend(serve, pki.pair("other.example"), tls_echo)
    good = TLSBackend(serve, pki.pair("localhost"), tls_echo)
    args = ["--to", f"tls:localhost:{bad.port}", "--to", f"tls:localhost:{good.port}"]
    with tls_proxy(tmp_path, plane, *args, "--backend-ca", str(pki.ca_path)) as proxy:
        assert_echoes(proxy.address)
        [closed] = proxy.closed()
    assert closed["backend"] == f"tls:localhost:{good.port}", closed
    assert closed["close_kind"] == "FIN", closed
    assert bad.server.accepted == 1
    assert good.handshakes == 1


def mute(conn: socket.socket) -> bytes:
    """Backend: accept the TCP connection, never answer the ClientHello; what came until EOF."""
    try:
        return recv_all(conn)
    except OSError:
        return b""


@on_planes(TWISTED)
def test_backend_handshake_within_connect_timeout(
    tmp_path: Path, serve: Serve, pki: PKI, plane: Plane
) -> None:
    """A backend that accepts TCP but never answers the handshake times out within --connect-timeout; the next --to is used."""
    stuck = serve(mute)
    good = TLSBackend(serve, pki.pair("localhost"), tls_echo)
    args = ["--to", f"tls:localhost:{split_address(stuck.address)[1]}"]
    args += ["--to", f"tls:localhost:{good.port}", "--backend-ca", str(pki.ca_path)]
    with tls_proxy(tmp_path, plane, *args, "--connect-timeout", "1") as proxy:
        assert_echoes(proxy.address)
        [closed] = proxy.closed()
    assert closed["backend"] == f"tls:localhost:{good.port}", closed
    assert stuck.accepted == 1
    assert good.handshakes == 1


@pytest.mark.parametrize("key_form", ["separate-key", "combined-pem", "no-cert"])
@on_planes(TWISTED)
def test_backend_client_certificate(
    tmp_path: Path, serve: Serve, pki: PKI, key_form: str, plane: Plane
) -> None:
    """--backend-cert/--backend-key present a client certificate to a backend that requires one."""
    client_ca, client_ca_path = pki.other_ca("client-ca")
    mine = write_pair(client_ca, pki.directory, "proxy.example", name="proxy-client")
    backend = TLSBackend(serve, pki.pair("localhost"), tls_echo, client_ca=client_ca_path)
    args = ["--to", f"tls:localhost:{backend.port}", "--backend-ca", str(pki.ca_path)]
    if key_form == "separate-key":
        args += ["--backend-cert", str(mine.cert), "--backend-key", str(mine.key)]
    elif key_form == "combined-pem":
        args += ["--backend-cert", str(mine.combined)]
    with tls_proxy(tmp_path, plane, *args) as proxy:
        if key_form == "no-cert":
            assert plain_client_cut_off(proxy.address) == b""
            [closed] = proxy.closed()
            assert closed["close_kind"] in ("error", "RST"), closed
            return
        assert_echoes(proxy.address)
        proxy.closed()
    assert backend.peer_certs == [leaf_der(mine)]


# -- 12. TLS half-close -----------------------------------------------------------------------


class LateReply:
    """Backend: read the request to EOF, then send a random reply and FIN; returns the request's SHA-256."""

    def __init__(self, size: int = 2 * MiB) -> None:
        self.reply = os.urandom(size)

    def __call__(self, conn: socket.socket) -> str:
        request = recv_all(conn)
        conn.sendall(self.reply)
        if isinstance(conn, ssl.SSLSocket):
            close_tls(conn)
        else:
            conn.shutdown(socket.SHUT_WR)
        return sha256(request)


#: How a TLS client ends its side.
FINISHES = ["close_notify+fin", "close_notify", "fin"]


@on_each_plane
@pytest.mark.parametrize("finish", FINISHES)
def test_tls_client_half_close_gets_late_reply(
    tmp_path: Path, serve: Serve, pki: PKI, finish: str, plane: Plane
) -> None:
    """A TLS client that ends its side (close_notify and/or FIN) still gets the reply the backend sends after seeing EOF, then close_notify; on a --tls-cert listener."""
    pair = pki.pair("localhost")
    assert_late_reply_after_half_close(
        tmp_path, serve, pki, finish=finish, plane=plane, tls=tls_args(pair)
    )


@on_planes(TWISTED)
@pytest.mark.parametrize("finish", FINISHES)
def test_ssl_listener_client_half_close_gets_late_reply(
    tmp_path: Path, serve: Serve, pki: PKI, finish: str, plane: Plane
) -> None:
    """The same on an ssl: listener (Twisted's own TLS)."""
    pair = pki.pair("localhost")
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
    assert_late_reply_after_half_close(
        tmp_path, serve, pki, finish=finish, plane=plane, tls=[], listen=listen
    )


def assert_late_reply_after_half_close(
    tmp_path: Path,
    serve: Serve,
    pki: PKI,
    *,
    finish: str,
    plane: Plane,
    tls: list[str],
    listen: str = "127.0.0.1:0",
) -> None:
    """A TLS client that ends its side with ``finish`` gets the backend's late reply, then close_notify."""
    late = LateReply()
    backend = serve(late)
    request = os.urandom(MiB)
    with tls_proxy(tmp_path, plane, *tls, "--to", backend.address, listen=listen) as proxy:
        pump = Pump(proxy.address, client_context(pki.ca_path), "localhost", finish)
        with pump:
            pump.run(request, timeout=30)
        assert backend.outcome() == sha256(request)
        [closed] = proxy.closed()
    assert pump.received == len(late.reply), f"got {pump.received} of {len(late.reply)} B"
    assert pump.digest.hexdigest() == sha256(late.reply)
    assert pump.peer_end == "close_notify", "the proxy ended the TLS leg without close_notify"
    assert pump.written_all_at == 0, "the backend replied before seeing EOF"
    assert (closed["close_kind"], closed["closed_by"]) == ("FIN", "client"), closed
    assert (closed["bytes_up"], closed["bytes_down"]) == (len(request), len(late.reply))


@pytest.mark.parametrize("client", ["plain-client", "tls-client"])
@on_planes(TWISTED)
def test_tls_backend_half_close_gets_late_reply(
    tmp_path: Path, serve: Serve, pki: PKI, client: str, plane: Plane
) -> None:
    """Through a TLS backend leg: the client's EOF reaches the backend as close_notify, and its later reply reaches the client."""
    late = LateReply()
    pair = pki.pair("localhost")
    backend = TLSBackend(serve, pair, late)
    request = os.urandom(MiB)
    args: list[str] = ["--to", f"tls:localhost:{backend.port}", "--backend-ca", str(pki.ca_path)]
    if client == "tls-client":
        args += tls_args(pair)
    with tls_proxy(tmp_path, plane, *args) as proxy:
        if client == "tls-client":
            pump = tls_exchange(proxy.address, client_context(pki.ca_path), "localhost", request)
            assert pump.peer_end == "close_notify"
            reply_digest, reply_size = pump.digest.hexdigest(), pump.received
        else:
            with connect(proxy.address) as sock:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                reply = recv_all(sock)
            reply_digest, reply_size = sha256(reply), len(reply)
        # The backend's recv() returned b"" only on close_notify (a bare FIN raises).
        assert backend.server.outcome() == sha256(request)
        [closed] = proxy.closed()
    assert reply_size == len(late.reply)
    assert reply_digest == sha256(late.reply)
    assert (closed["close_kind"], closed["closed_by"]) == ("FIN", "client"), closed


# -- 13. start-up errors ------------------------------------------------------------------------


def startup_case(case: str, pki: PKI) -> tuple[list[str], str]:
    """The arguments of a bad TLS set-up and what its one error line must say."""
    good = pki.pair("localhost")
    other = pki.pair("other.example")
    rsa = pki.ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    rsa_key = pki.directory / "rsa.key"
    rsa.private_key_pem.write_to_path(str(rsa_key))
    missing = pki.directory / "missing-file.pem"
    junk = pki.directory / "junk-cert.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n")
    damaged = pki.directory / "damaged.key"
    damaged.write_text("-----BEGIN PRIVATE KEY-----\nAAAAnot-a-key\n-----END PRIVATE KEY-----\n")
    encrypted = pki.directory / "encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(good.key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cert_only = pki.directory / "cert-only.pem"
    shutil.copyfile(good.cert, cert_only)
    to = ["--to", "127.0.0.1:9"]
    cases: dict[str, tuple[list[str], str]] = {
        "missing cert": (
            ["--tls-cert", str(missing), "--tls-key", str(good.key)],
            f"--tls-cert {missing}: No such file or directory",
        ),
        "missing key": (
            ["--tls-cert", str(good.cert), "--tls-key", str(missing)],
            f"--tls-key {missing}: No such file or directory",
        ),
        "key of another cert": (
            ["--tls-cert", str(good.cert), "--tls-key", str(other.key)],
            f"--tls-key {other.key}: the key does not match the certificate in {good.cert}",
        ),
        "RSA key, EC cert": (
            ["--tls-cert", str(good.cert), "--tls-key", str(rsa_key)],
            f"--tls-key {rsa_key}: the key does not match the certificate in {good.cert}",
        ),
        "junk cert": (
            ["--tls-cert", str(junk), "--tls-key", str(good.key)],
            f"--tls-cert {junk}: its PEM certificate cannot be decoded",
        ),
        "damaged key": (
            ["--tls-cert", str(good.cert), "--tls-key", str(damaged)],
            f"--tls-key {damaged}: its PEM private key cannot be decoded",
        ),
        "encrypted key": (
            ["--tls-cert", str(good.cert), "--tls-key", str(encrypted)],
            f"--tls-key {encrypted}: the private key is encrypted",
        ),
        "no key in cert file": (
            ["--tls-cert", str(cert_only)],
            f"--tls-cert {cert_only}: the file holds no private key;"
            " give the key's file with --tls-key",
        ),
        "missing client CA": (
            [*tls_args(good), "--tls-client-ca", str(missing)],
            f"--tls-client-ca {missing}: No such file or directory",
        ),
        "key as client CA": (
            [*tls_args(good), "--tls-client-ca", str(good.key)],
            f"--tls-client-ca {good.key}: no PEM certificate in the file",
        ),
        "missing backend CA": (
            ["--backend-tls", "--backend-ca", str(missing)],
            f"--backend-ca {missing}: No such file or directory",
        ),
        "junk backend CA": (
            ["--backend-tls", "--backend-ca", str(junk)],
            f"--backend-ca {junk}: its PEM certificate cannot be decoded",
        ),
        "backend cert without key": (
            ["--backend-tls", "--backend-cert", str(cert_only)],
            f"--backend-cert {cert_only}: the file holds no private key;"
            " give the key's file with --backend-key",
        ),
        "encrypted backend key": (
            ["--backend-tls", "--backend-cert", str(good.cert), "--backend-key", str(encrypted)],
            f"--backend-key {encrypted}: the private key is encrypted",
        ),
    }
    args, message = cases[case]
    return [*args, *to], message


STARTUP_CASES = [
    "missing cert",
    "missing key",
    "key of another cert",
    "RSA key, EC cert",
    "junk cert",
    "damaged key",
    "encrypted key",
    "no key in cert file",
    "missing client CA",
    "key as client CA",
    "missing backend CA",
    "junk backend CA",
    "backend cert without key",
    "encrypted backend key",
]


@pytest.mark.parametrize("case", STARTUP_CASES)
def test_bad_tls_files_are_one_line_errors(tmp_path: Path, pki: PKI, case: str) -> None:
    """A missing, broken, encrypted or mismatched TLS file: exit 1 with one 'tunnelkit: error:' line naming the option, the file and what is wrong, no traceback."""
    args, message = startup_case(case, pki)
    result = run(twistd_argv("--listen", "127.0.0.1:0", *args), cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    [line] = result.stdout.splitlines()
    assert line.startswith(f"tunnelkit: error: {message}"), line
