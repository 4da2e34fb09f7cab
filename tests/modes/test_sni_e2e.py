"""SNI routing end to end: ``twistd -n tunnelkit --config FILE`` with ``mode = "sni"``, curl and openssl.

One process, from a TOML file, routes ``a.test`` and ``*.b.test`` to two
HTTPS backends in threads, each with its own certificate from one test CA;
curl (``--resolve``, ``--cacert``) and ``openssl s_client -servername
-verify_hostname`` must verify the backend's own certificate and get its
page. A name no route takes fails the client's handshake with TLS's
``unrecognized_name``. Every wait is bounded.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trustme
from certs import write_ca, write_pair
from loopback import ThreadedServer
from processes import Process, assert_clean_stop, tunnel_closed_events, twistd
from tls_clients import TLSBackend, close_tls

CLIENT_TIMEOUT = 20


def http_page(name: str) -> Any:
    """A handler answering one HTTP request with a page naming ``name``."""
    body = f"backend {name}\n".encode()

    def handler(tls: ssl.SSLSocket) -> None:
        request = b""
        while b"\r\n\r\n" not in request and (chunk := tls.recv(4096)):
            request += chunk
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        tls.sendall(head.encode() + body)
        close_tls(tls)

    return handler


@attrs.frozen
class Setup:
    process: Process
    port: int
    ca: Path


@pytest.fixture(scope="module")
def sni_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """twistd serving the file's sni listener, and its two backends."""
    cwd = tmp_path_factory.mktemp("sni")
    ca = trustme.CA()
    ca_file = write_ca(ca, cwd)
    servers = []
    routes = []
    for route, identity in (("a.test", "a.test"), ("*.b.test", "*.b.test")):
        pair = write_pair(ca, cwd, identity)
        backend = TLSBackend(ThreadedServer, pair, http_page(identity))
        servers.append(backend.server)
        routes.append(f"{route}={backend.address}")
    config = cwd / "tunnelkit.toml"
    config.write_text(
        f'[[listener]]\nlisten = "127.0.0.1:0"\nmode = "sni"\nroute = {routes!r}\n'.replace(
            "'", '"'
        )
        + "header-timeout = 2\n"
    )
    json_log = ("--logger", "tunnelkit.json_log.observer")
    process = twistd("--config", str(config), cwd=cwd, twistd_options=json_log)
    try:
        with process:
            [address] = process.wait_listening()
            yield Setup(process, int(address.rpartition(":")[2]), ca_file)
            assert_clean_stop(process, process.stop())
    finally:
        for server in servers:
            server.close()


def _record(setup: Setup, sni: str) -> dict[str, Any]:
    def found(text: str) -> dict[str, Any] | None:
        return next((e for e in tunnel_closed_events(text) if e.get("sni") == sni), None)

    return setup.process.wait_for(found, f"tunnel_closed of {sni}", 10)


def _curl(setup: Setup, name: str) -> subprocess.CompletedProcess[str]:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    argv = [curl, "-sS", "--max-time", "10", "--cacert", str(setup.ca)]
    argv += ["--resolve", f"{name}:{setup.port}:127.0.0.1", f"https://{name}:{setup.port}/"]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)


@pytest.mark.parametrize(("name", "page"), [("a.test", "a.test"), ("www.B.test", "*.b.test")])
def test_curl_verifies_each_backend(sni_proxy: Setup, name: str, page: str) -> None:
    """curl verifies the routed backend's own certificate for its name and gets that backend's page."""
    done = _curl(sni_proxy, name)
    assert (done.returncode, done.stdout) == (0, f"backend {page}\n"), done.stderr
    record = _record(sni_proxy, name.lower())  # curl sends the name in lower case
    assert (record["mode"], record["route"]) == ("sni", page)
    assert "h2" in record["alpn_offered"].split(",")


def test_openssl_s_client_verifies_the_backend(sni_proxy: Setup) -> None:
    """openssl s_client -servername x.b.test verifies the *.b.test backend's certificate and reads its page."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    argv = [openssl, "s_client", "-connect", f"127.0.0.1:{sni_proxy.port}", "-servername"]
    argv += ["x.b.test", "-verify_hostname", "x.b.test", "-CAfile", str(sni_proxy.ca)]
    argv += ["-verify_return_error", "-ign_eof", "-brief"]
    done = subprocess.run(
        argv,
        check=False,
        input="GET / HTTP/1.0\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert "Verification: OK" in done.stderr
    assert done.stdout.endswith("backend *.b.test\n"), done.stdout
    assert _record(sni_proxy, "x.b.test")["route"] == "*.b.test"


def test_unknown_name_fails_the_handshake_with_unrecognized_name(sni_proxy: Setup) -> None:
    """Without a default backend, a name no route takes gets TLS's unrecognized_name alert."""
    done = _curl(sni_proxy, "c.test")
    assert done.returncode == 35, done.stderr  # CURLE_SSL_CONNECT_ERROR
    assert "unrecognized name" in done.stderr
    record = _record(sni_proxy, "c.test")
    assert record["reason"] == "no route for SNI 'c.test' and no default backend"
