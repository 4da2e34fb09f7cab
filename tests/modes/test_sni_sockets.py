"""SNI routing over real loopback sockets, in-process: each client reaches the backend of its name.

The forwarder runs on this process's reactor (``loopback.Forwarder``); the
backends are TLS echo servers in threads, each with its own certificate
from one test CA, and the clients are Python ``ssl`` clients in threads that
verify the certificate they are served against that CA: a client that
reaches the wrong backend fails its handshake. Payloads are random and
checked by SHA-256 both ways.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import write_ca, write_pair
from hellos import real_hello
from loopback import (
    Forwarder,
    LoopbackTestCase,
    MiB,
    connect,
    recv_outcome,
    refusing_address,
    sha256,
)
from planes import TWISTED, TWISTED_SPLICE, on_planes
from tls_clients import (
    TLSBackend,
    client_context,
    der_sha256,
    leaf_der,
    served_certificate,
    tls_echo,
    tls_exchange,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

Inline = Generator[Deferred[Any], Any, None]


class SniTestCase(LoopbackTestCase):
    """A CA per test, and TLS echo backends for the names a test asks for."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tunnelkit-sni-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.ca = trustme.CA()
        self.ca_file = write_ca(self.ca, self.dir)
        self.client = client_context(self.ca_file)

    def backend(self, *names: str) -> TLSBackend:
        """A TLS echo backend whose certificate names ``names``."""
        pair = write_pair(
            self.ca, self.dir, *names, name=f"{names[0].replace('*', 'star')}-{os.urandom(3).hex()}"
        )
        backend = TLSBackend(self.serve, pair, tls_echo)
        backend.leaf = der_sha256(leaf_der(pair))  # type: ignore[attr-defined]
        return backend

    def sni(self, *args: str) -> Forwarder:
        return self.forward("--mode", "sni", *args)


@on_planes(TWISTED, TWISTED_SPLICE)
class RoutingTests(SniTestCase):
    """Two backends with their own certificates behind one port, chosen by the client's name."""

    @inlineCallbacks
    def test_each_name_reaches_its_backend(self) -> Inline:
        """a.test and b.test each handshake with their own backend (verified) and echo 1 MiB both ways."""
        a, b = self.backend("a.test"), self.backend("*.b.test")
        fwd = self.sni("--route", f"a.test={a.address}", "--route", f"*.b.test={b.address}")
        payload = os.urandom(MiB)
        for name, backend in (("a.test", a), ("www.b.test", b)):
            pump = yield deferToThread(tls_exchange, fwd.address, self.client, name, payload)
            assert pump.digest.hexdigest() == sha256(payload)
            assert backend.server.outcome() == sha256(payload)
            assert backend.sni[-1] == name  # the client's own hello reached it
        records = yield fwd.closed(2)
        assert [(r["sni"], r["route"], r["mode"]) for r in records] == [
            ("a.test", "a.test", "sni"),
            ("www.b.test", "*.b.test", "sni"),
        ]
        assert [r["bytes_up"] > MiB for r in records] == [True, True]
        assert [r["backend"] for r in records] == [a.address, b.address]

    @inlineCallbacks
    def test_the_client_sees_the_backends_certificate(self) -> Inline:
        """The certificate served is the backend's own: tunnelkit terminates nothing."""
        a, b = self.backend("a.test"), self.backend("b.test")
        fwd = self.sni("--route", f"a.test={a.address}", "--to", b.address)
        for name, backend in (("a.test", a), ("b.test", b)):
            der = yield deferToThread(served_certificate, fwd.address, self.client, name)
            assert der_sha256(der) == backend.leaf  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_hello_read_in_small_pieces(self) -> Inline:
        """With --read-size 64 the proxy reads the hello in a dozen pieces; it still routes, held whole."""
        a, default = self.backend("a.test"), self.backend("other.test")
        fwd = self.sni(
            "--route", f"a.test={a.address}", "--to", default.address, "--read-size", "64"
        )
        payload = os.urandom(256 * 1024)
        pump = yield deferToThread(tls_exchange, fwd.address, self.client, "a.test", payload)
        assert pump.digest.hexdigest() == sha256(payload)
        assert a.sni == ["a.test"]

    @inlineCallbacks
    def test_unknown_name_and_no_sni_go_to_the_default(self) -> Inline:
        """A name no route takes, and a client without SNI, reach the --to backend."""
        a, default = self.backend("a.test"), self.backend("other.test")
        fwd = self.sni("--route", f"a.test={a.address}", "--to", default.address)
        unchecked = client_context(None)
        yield deferToThread(tls_exchange, fwd.address, self.client, "other.test", b"x")
        yield deferToThread(tls_exchange, fwd.address, unchecked, None, b"y")
        assert default.sni == ["other.test", None]
        records = yield fwd.closed(2)
        assert [r["route"] for r in records] == ["default", "default"]
        assert "sni" not in records[1]

    @inlineCallbacks
    def test_the_same_name_twice_balances(self) -> Inline:
        """Two routes of one name make one group: clients take turns (round-robin)."""
        first, second = self.backend("a.test"), self.backend("a.test")
        fwd = self.sni("--route", f"a.test={first.address}", "--route", f"A.test.={second.address}")
        for _ in range(4):
            yield deferToThread(tls_exchange, fwd.address, self.client, "a.test", b"x")
        assert (first.handshakes, second.handshakes) == (2, 2)


@on_planes(TWISTED)
class RefusalTests(SniTestCase):
    """Clients no backend takes are closed, with the TLS alert that names the cause."""

    @inlineCallbacks
    def test_unknown_name_without_default(self) -> Inline:
        """The client's handshake fails with unrecognized_name; no backend is dialled."""
        a = self.backend("a.test")
        fwd = self.sni("--route", f"a.test={a.address}")
        failure = yield deferToThread(_handshake_failure, fwd.address, self.client, "z.test")
        assert "UNRECOGNIZED_NAME" in failure
        [record] = yield fwd.closed(1)
        assert record["reason"] == "no route for SNI 'z.test' and no default backend"
        assert (record["backend"], record["sni"]) == ("-", "z.test")
        assert a.server.accepted == 0

    @inlineCallbacks
    def test_backend_down(self) -> Inline:
        """A route whose backend refuses: the client hears internal_error, the record says why."""
        fwd = self.sni("--route", "a.test=127.0.0.1:9", "--connect-retries", "0")
        failure = yield deferToThread(_handshake_failure, fwd.address, self.client, "a.test")
        assert "INTERNAL_ERROR" in failure
        [record] = yield fwd.closed(1)
        assert record["reason"].startswith("no backend connected: 127.0.0.1:9")

    @inlineCallbacks
    def test_not_tls(self) -> Inline:
        """Plain HTTP is closed at its first byte, without an answer, and reaches no backend."""
        default = self.backend("a.test")
        fwd = self.sni("--to", default.address)
        answer, how = yield deferToThread(_send_and_read, fwd.address, b"GET / HTTP/1.1\r\n\r\n")
        assert (answer, how) == (b"", "EOF")
        [record] = yield fwd.closed(1)
        assert record["reason"] == "bad ClientHello: not a TLS handshake (first byte 0x47)"
        assert default.server.accepted == 0

    @inlineCallbacks
    def test_too_big(self) -> Inline:
        """A hello that says it is 32 KiB long is closed from its first record, without an answer."""
        default = self.backend("a.test")
        fwd = self.sni("--to", default.address)
        claim = b"\x16\x03\x01\x00\x04\x01\x00\x80\x00"
        answer, how = yield deferToThread(_send_and_read, fwd.address, claim)
        assert (answer, how) == (b"", "EOF")
        [record] = yield fwd.closed(1)
        assert record["reason"] == "bad ClientHello: the ClientHello takes more than 16384 bytes"
        assert default.server.accepted == 0

    @inlineCallbacks
    def test_header_deadline(self) -> Inline:
        """Half a hello, then silence: closed at --header-timeout, logged as a timeout."""
        default = self.backend("a.test")
        fwd = self.sni("--to", default.address, "--header-timeout", "0.3")
        answer, how = yield deferToThread(_send_and_read, fwd.address, real_hello("a.test")[:100])
        assert (answer, how) == (b"", "EOF")
        [record] = yield fwd.closed(1)
        assert (record["close_kind"], record["reason"]) == (
            "timeout",
            "no complete ClientHello in 0.3 s",
        )
        assert default.server.accepted == 0


@on_planes(TWISTED)
class HealthTests(SniTestCase):
    """A route's backends are checked like --to's."""

    @inlineCallbacks
    def test_route_backends_are_health_checked(self) -> Inline:
        """--health-interval takes a route's dead backend out of its group before any client meets it."""
        up = self.backend("a.test")
        down = self.enterContext(refusing_address())
        went_down: Deferred[dict[str, Any]] = Deferred()

        def observe(event: dict[str, Any]) -> None:
            if event.get("event") == "backend_down" and not went_down.called:
                went_down.callback(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        fwd = self.sni(
            *("--route", f"a.test={down}", "--route", f"a.test={up.address}"),
            *("--health-interval", "0.1", "--fall", "1", "--connect-retries", "0"),
        )
        event = yield went_down.addTimeout(10, reactor)
        assert event["backend"] == down
        for _ in range(3):
            yield deferToThread(tls_exchange, fwd.address, self.client, "a.test", b"x")
        assert up.handshakes == 3


def _handshake_failure(address: str, ctx: ssl.SSLContext, name: str) -> str:
    """The client's error when its handshake fails (the test fails if it succeeds)."""
    sock = connect(address)
    try:
        ctx.wrap_socket(sock, server_hostname=name).close()
    except ssl.SSLError as e:
        return str(e)
    finally:
        sock.close()
    raise AssertionError("the handshake succeeded")


def _send_and_read(address: str, data: bytes) -> tuple[bytes, str]:
    with connect(address) as sock:
        sock.sendall(data)
        return recv_outcome(sock)


def test_engine_native_refuses_sni() -> None:
    """--engine native says that the engine does not read a ClientHello."""
    with pytest.raises(SystemExit) as caught:
        Forwarder("--mode", "sni", "--to", "127.0.0.1:1", "--engine", "native")
    assert "--mode sni reads a request first" in str(caught.value.code)
