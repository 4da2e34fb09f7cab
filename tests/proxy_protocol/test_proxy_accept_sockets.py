"""``--accept-proxy-protocol`` over real loopback sockets (Twisted's plane: it reads first).

A trusted proxy's header is read first and strictly; the client address it
carries is the one the client policy judges, the record names (with the
proxy as ``proxied_by``), balancing hashes and the onward header says. No
one else may connect; a bad, missing or late header closes the client
without a backend ever being dialled.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import Any

import trustme
from certs import write_ca, write_pair
from loopback import (
    LoopbackTestCase,
    connect,
    echo,
    recv_all,
    recv_exactly,
    recv_outcome,
    sha256,
    split_address,
)
from planes import TWISTED, on_planes
from test_proxy_send_sockets import read_header
from tls_clients import client_context
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread

from tunnelkit.proxy_protocol.build import PP2_TYPE_AUTHORITY, v1, v2

Inline = Generator[Deferred[Any], Any, None]

FOREIGN = ("203.0.113.7", 4242)
FRONT = ("198.51.100.9", 443)


def send_and_close(address: str, data: bytes) -> bytes:
    """Send ``data`` and EOF to ``address``; everything that came back until EOF."""
    with connect(address) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def trickle(address: str, parts: list[bytes]) -> bytes:
    """Send each part in its own segment (TCP_NODELAY), then EOF; what came back."""
    with connect(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in parts:
            sock.sendall(part)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


ACCEPT = ("--accept-proxy-protocol", "--trusted-proxies", "127.0.0.1")


@on_planes(TWISTED)
class AcceptTests(LoopbackTestCase):
    """A trusted proxy's PROXY header"""

    @inlineCallbacks
    def test_the_carried_address_is_recorded_and_sent_on(self) -> Inline:
        """v1 in, v2 out: the backend gets the carried client and destination, then every byte."""
        backend = self.serve(read_header)
        forwarder = self.forward("--to", backend.address, *ACCEPT, "--proxy-protocol", "v2")
        payload = os.urandom(200 * 1024)
        reply = yield deferToThread(send_and_close, forwarder.address, v1(FOREIGN, FRONT) + payload)
        raw, _header, digest = yield deferToThread(backend.outcome)
        (record,) = yield forwarder.closed(1)
        self.assertEqual((reply, digest), (b"ok", sha256(payload)))
        self.assertEqual(raw, v2(FOREIGN, FRONT))
        self.assertEqual(record["client"], "203.0.113.7:4242")
        self.assertEqual(split_address(record["proxied_by"])[0], "127.0.0.1")
        self.assertEqual(record["bytes_up"], len(payload))

    @inlineCallbacks
    def test_a_header_split_over_segments_with_data_behind_it(self) -> Inline:
        """A v2 header cut at every few bytes, the payload behind it: read whole, nothing lost."""
        backend = self.serve(echo)
        forwarder = self.forward("--to", backend.address, *ACCEPT)
        header, payload = v2(FOREIGN, FRONT), os.urandom(4096)
        parts = [header[i : i + 5] for i in range(0, len(header), 5)] + [payload]
        got = yield deferToThread(trickle, forwarder.address, parts)
        (record,) = yield forwarder.closed(1)
        self.assertEqual(sha256(got), sha256(payload))
        self.assertEqual(record["client"], "203.0.113.7:4242")

    @inlineCallbacks
    def test_the_client_policy_judges_the_carried_address(self) -> Inline:
        """--deny-client refuses the address the header carries, not the proxy's: no backend dialled."""
        backend = self.serve(echo)
        forwarder = self.forward(
            "--to", backend.address, *ACCEPT, "--deny-client", "203.0.113.0/24"
        )
        got = yield deferToThread(send_and_close, forwarder.address, v1(FOREIGN, FRONT) + b"x")
        (record,) = yield forwarder.closed(1)
        self.assertEqual(got, b"")
        self.assertEqual(record["client"], "203.0.113.7:4242")
        self.assertEqual(record["reason"], "client refused by the client policy")
        self.assertEqual(backend.accepted, 0)
        # Another carried address passes the same policy from the same proxy.
        other = ("192.0.2.1", 1)
        got = yield deferToThread(send_and_close, forwarder.address, v1(other, FRONT) + b"ping")
        self.assertEqual(got, b"ping")

    @inlineCallbacks
    def test_untrusted_sources_are_refused_unread(self) -> Inline:
        """A peer outside --trusted-proxies is closed at once: its header is never read nor believed."""
        backend = self.serve(echo)
        forwarder = self.forward(
            "--to", backend.address, "--accept-proxy-protocol", "--trusted-proxies", "10.0.0.0/8"
        )

        def client() -> bytes:
            with connect(forwarder.address) as sock:
                try:
                    sock.sendall(v1(FOREIGN, FRONT) + b"x")
                except OSError:
                    return b""  # closed before it could send
                return recv_outcome(sock)[0]

        got = yield deferToThread(client)
        self.assertEqual(got, b"")
        factory: Any = forwarder.service.ports[0].factory
        self.assertEqual(factory.counters.refused_client_policy, 1)
        self.assertEqual((backend.accepted, forwarder.records), (0, []))

    @inlineCallbacks
    def test_a_bad_header_is_refused(self) -> Inline:
        """No header (a direct client's HTTP request): closed, the reason recorded, no backend."""
        backend = self.serve(echo)
        forwarder = self.forward("--to", backend.address, *ACCEPT)
        got = yield deferToThread(send_and_close, forwarder.address, b"GET / HTTP/1.1\r\n\r\n")
        (record,) = yield forwarder.closed(1)
        self.assertEqual(got, b"")
        self.assertEqual(record["reason"], "bad PROXY header: no PROXY protocol header")
        self.assertEqual(backend.accepted, 0)

    @inlineCallbacks
    def test_a_late_header_times_out(self) -> Inline:
        """Half a header and silence: closed at --header-timeout, recorded as a timeout."""
        backend = self.serve(echo)
        forwarder = self.forward("--to", backend.address, *ACCEPT, "--header-timeout", "0.3")
        sock = connect(forwarder.address)
        self.addCleanup(sock.close)
        sock.sendall(b"PROXY TCP4 ")
        got = yield deferToThread(recv_all, sock)
        (record,) = yield forwarder.closed(1)
        self.assertEqual(got, b"")
        self.assertEqual(
            (record["close_kind"], record["reason"]), ("timeout", "PROXY header timeout (0.3 s)")
        )
        self.assertEqual(backend.accepted, 0)

    @inlineCallbacks
    def test_a_local_header_keeps_the_socket_address(self) -> Inline:
        """LOCAL (the proxy's own health check): relayed, the socket's address recorded."""
        backend = self.serve(echo)
        forwarder = self.forward("--to", backend.address, *ACCEPT)
        got = yield deferToThread(send_and_close, forwarder.address, v2(None, None) + b"ping")
        (record,) = yield forwarder.closed(1)
        self.assertEqual(got, b"ping")
        self.assertEqual(split_address(record["client"])[0], "127.0.0.1")
        self.assertNotIn("proxied_by", record)

    @inlineCallbacks
    def test_connect_mode_reads_its_request_after_the_header(self) -> Inline:
        """Header, CONNECT head and data in one segment: each part reaches its reader, in order."""
        backend = self.serve(echo)
        host, port = split_address(backend.address)
        forwarder = self.forward("--mode", "connect", "--allow-dest", "127.0.0.1", *ACCEPT)
        request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

        def client() -> bytes:
            with connect(forwarder.address) as sock:
                sock.sendall(v1(FOREIGN, FRONT) + request + b"ping")
                head = recv_exactly(sock, len(b"HTTP/1.1 200 Connection established\r\n\r\n"))
                sock.shutdown(socket.SHUT_WR)
                return head + recv_all(sock)

        got = yield deferToThread(client)
        (record,) = yield forwarder.closed(1)
        self.assertEqual(got, b"HTTP/1.1 200 Connection established\r\n\r\nping")
        self.assertEqual(record["client"], "203.0.113.7:4242")


@on_planes(TWISTED)
class AcceptBeforeTLSTests(LoopbackTestCase):
    """A trusted proxy's PROXY header in clear before the TLS that tunnelkit terminates"""

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        ca = trustme.CA()
        self.pair = write_pair(ca, directory, "proxied.example")
        self.context = client_context(write_ca(ca, directory))

    def tls_forward(self, backend: str, *extra: str) -> Any:
        return self.forward(
            "--to", backend, *ACCEPT, "--proxy-protocol", "v2",
            "--tls-cert", str(self.pair.cert), "--tls-key", str(self.pair.key), *extra,
        )  # fmt: skip

    @inlineCallbacks
    def test_the_header_comes_before_the_handshake(self) -> Inline:
        """Header first, then TLS on the same connection: the carried client is sent on with the SNI."""
        backend = self.serve(partial(read_header, size=5))
        forwarder = self.tls_forward(backend.address)

        def talk() -> bytes:
            sock = connect(forwarder.address)
            sock.sendall(v1(FOREIGN, FRONT))
            with self.context.wrap_socket(sock, server_hostname="proxied.example") as tls:
                tls.sendall(b"hello")
                return tls.recv(16)

        reply = yield deferToThread(talk)
        _raw, header, digest = yield deferToThread(backend.outcome)
        self.assertEqual((reply, digest), (b"ok", sha256(b"hello")))
        self.assertEqual((header.source, header.destination), (FOREIGN, FRONT))
        self.assertEqual(dict(header.tlvs)[PP2_TYPE_AUTHORITY], b"proxied.example")

    @inlineCallbacks
    def test_a_refused_client_gets_no_handshake(self) -> Inline:
        """A carried address the client policy denies: closed before any TLS, the reason recorded."""
        backend = self.serve(echo)
        forwarder = self.tls_forward(backend.address, "--deny-client", "203.0.113.0/24")

        def talk() -> str:
            sock = connect(forwarder.address)
            sock.sendall(v1(FOREIGN, FRONT))
            try:
                self.context.wrap_socket(sock, server_hostname="proxied.example").close()
            except (ssl.SSLError, OSError) as e:
                sock.close()
                return type(e).__name__
            return "handshaken"

        outcome = yield deferToThread(talk)
        (record,) = yield forwarder.closed(1)
        self.assertNotEqual(outcome, "handshaken")
        self.assertEqual(record["reason"], "client refused by the client policy")
        self.assertEqual(record["client"], "203.0.113.7:4242")
        self.assertEqual(backend.accepted, 0)
