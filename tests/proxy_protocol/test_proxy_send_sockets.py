"""``--proxy-protocol v1|v2`` over real loopback sockets, on the engine and on Twisted.

The backend reads the header with tunnelkit's own strict reader and hashes
everything after it: the header must come first, say the client's address
and the listener's, be the very bytes the Python builder makes (so both
planes send the same), and not one byte of the client's may be lost or
counted as the header.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import write_ca, write_pair
from loopback import (
    IO_TIMEOUT,
    LoopbackTestCase,
    connect,
    recv_all,
    recv_exactly,
    recv_outcome,
    sha256,
    split_address,
)
from planes import ENGINE, SPLICE_VARIANTS, on_each_plane, on_planes
from tls_clients import client_context
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread

from tunnelkit.engine import driver
from tunnelkit.proxy_protocol.build import (
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    v1,
    v2,
)
from tunnelkit.proxy_protocol.parse import HeaderReader, ProxyHeader

Inline = Generator[Deferred[Any], Any, None]


def read_header(conn: socket.socket, size: int | None = None) -> tuple[bytes, ProxyHeader, str]:
    """Backend: the raw header, what it says, and the SHA-256 of what follows; replies ``ok``.

    What follows is everything until EOF, or ``size`` bytes.
    """
    reader, raw, header = HeaderReader(), b"", None
    while header is None:
        chunk = conn.recv(4096)
        assert chunk, "EOF before a whole PROXY header"
        raw += chunk
        header = reader.feed(chunk)
    rest = reader.rest
    rest += recv_all(conn) if size is None else recv_exactly(conn, size - len(rest))
    conn.sendall(b"ok")
    return raw[: len(raw) - len(reader.rest)], header, sha256(rest)


def send_and_close(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and EOF; what came back until EOF."""
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def tlvs(header: ProxyHeader) -> dict[int, bytes]:
    return dict(header.tlvs)


def sub_tlvs(ssl_tlv: bytes) -> dict[int, bytes]:
    """The SSL TLV's sub-TLVs (after its client byte and verify word)."""
    found, at = {}, 5
    while at < len(ssl_tlv):
        kind, length = ssl_tlv[at], int.from_bytes(ssl_tlv[at + 1 : at + 3], "big")
        found[kind] = ssl_tlv[at + 3 : at + 3 + length]
        at += 3 + length
    return found


@on_planes(*SPLICE_VARIANTS)
class SendTests(LoopbackTestCase):
    """The header each backend gets first (before spliced bytes too)"""

    @inlineCallbacks
    def _sent(self, version: str, *extra: str) -> Inline:
        backend = self.serve(read_header)
        forwarder = self.forward("--to", backend.address, "--proxy-protocol", version, *extra)
        payload = os.urandom(300 * 1024)
        sock = connect(forwarder.address)
        client = split_address(f"{sock.getsockname()[0]}:{sock.getsockname()[1]}")
        reply = yield deferToThread(send_and_close, sock, payload)
        raw, header, digest = yield deferToThread(backend.outcome)
        (record,) = yield forwarder.closed(1)
        self.assertEqual(reply, b"ok")
        self.assertEqual(digest, sha256(payload))
        self.assertEqual(record["bytes_up"], len(payload))  # the header is not the client's
        if self.plane is not None and "on" in self.plane.args:
            self.assertTrue(record.get("spliced"), record)  # the header went first all the same
        return raw, header, client, split_address(forwarder.address)

    @inlineCallbacks
    def test_v1_says_the_client_and_the_listener(self) -> Inline:
        """v1: the client's address and the one it connected to, then every byte of the client's."""
        raw, header, client, listener = yield self._sent("v1")
        self.assertEqual(raw, v1(client, listener))
        self.assertEqual((header.source, header.destination), (client, listener))

    @inlineCallbacks
    def test_v2_says_the_client_and_the_listener(self) -> Inline:
        """v2: the same addresses in binary, no TLV for a plain client."""
        raw, header, client, listener = yield self._sent("v2")
        self.assertEqual(raw, v2(client, listener))
        self.assertEqual(header.tlvs, ())

    @inlineCallbacks
    def test_the_header_goes_before_bytes_sent_while_connecting(self) -> Inline:
        """A client that sends everything and its FIN before the backend accepts: header first still."""
        backend = self.serve(read_header)
        forwarder = self.forward("--to", backend.address, "--proxy-protocol", "v1")
        payload = os.urandom(1000)
        sock = connect(forwarder.address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = yield deferToThread(recv_all, sock)
        sock.close()
        raw, _header, digest = yield deferToThread(backend.outcome)
        self.assertEqual((reply, digest), (b"ok", sha256(payload)))
        self.assertTrue(raw.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "))

    @inlineCallbacks
    def test_a_unix_listener_sends_unknown(self) -> Inline:
        """A UNIX client has no address to say: v1 UNKNOWN, as HAProxy sends."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "tk.sock")
        backend = self.serve(read_header)
        self.forward("--to", backend.address, "--proxy-protocol", "v1", listen=f"unix:{path}")
        sock = connect(path)
        reply = yield deferToThread(send_and_close, sock, b"hello")
        raw, _header, digest = yield deferToThread(backend.outcome)
        self.assertEqual((reply, raw, digest), (b"ok", b"PROXY UNKNOWN\r\n", sha256(b"hello")))


@on_each_plane
class SendTLSTests(LoopbackTestCase):
    """The v2 TLVs of a client whose TLS tunnelkit terminated"""

    @inlineCallbacks
    def test_v2_says_alpn_sni_version_and_the_client_certificate(self) -> Inline:
        """ALPN, the SNI name as authority, and the SSL TLV with the version and the client's CN."""
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        ca = trustme.CA()
        server = write_pair(ca, directory, "proxied.example")
        client_cert = write_pair(ca, directory, name="client", common_name="alice")
        ca_file = write_ca(ca, directory)
        backend = self.serve(partial(read_header, size=5))
        forwarder = self.forward(
            "--to", backend.address, "--proxy-protocol", "v2",
            "--tls-cert", str(server.cert), "--tls-key", str(server.key),
            "--alpn", "http/1.1", "--tls-client-ca", str(ca_file),
        )  # fmt: skip
        context = client_context(ca_file, cert=client_cert, alpn=["http/1.1"])

        def talk() -> tuple[bytes, str]:
            sock = connect(forwarder.address)
            with context.wrap_socket(sock, server_hostname="proxied.example") as tls:
                tls.sendall(b"hello")
                reply = tls.recv(16)
                return reply, str(tls.version())

        reply, version = yield deferToThread(talk)
        _raw, header, digest = yield deferToThread(backend.outcome, IO_TIMEOUT)
        self.assertEqual((reply, digest), (b"ok", sha256(b"hello")))
        found = tlvs(header)
        self.assertEqual(found[PP2_TYPE_ALPN], b"http/1.1")
        self.assertEqual(found[PP2_TYPE_AUTHORITY], b"proxied.example")
        ssl_tlv = found[PP2_TYPE_SSL]
        self.assertEqual(ssl_tlv[:5], b"\x07\x00\x00\x00\x00")  # SSL, cert (conn, sess), verified
        subs = sub_tlvs(ssl_tlv)
        self.assertEqual(subs[PP2_SUBTYPE_SSL_CN], b"alice")
        self.assertEqual(subs[PP2_SUBTYPE_SSL_VERSION].decode(), version)


def test_the_engine_checks_its_proxy_settings() -> None:
    """A version other than 0, 1 or 2, or TLVs that are not callable, are refused when the profile is made."""
    from tunnelkit.engine import _engine

    args = ([("b", "127.0.0.1", 1)], 4096, 4096, "off", 0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="proxy_protocol must be 0"):
        _engine.Profile(*args, proxy_protocol=3)
    with pytest.raises(TypeError, match="proxy_tlvs must be callable"):
        _engine.Profile(*args, proxy_protocol=2, proxy_tlvs=5)  # type: ignore[arg-type]


@on_planes(ENGINE)
class EngineTLVFailureTests(LoopbackTestCase):
    """The engine when Python cannot make a TLS client's TLVs"""

    @inlineCallbacks
    def test_a_failed_header_ends_the_tunnel_with_its_reason(self) -> Inline:
        """No header, no relay: the backend gets nothing, the record says why."""
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        ca = trustme.CA()
        server = write_pair(ca, directory, "proxied.example")
        context = client_context(write_ca(ca, directory))

        def broken(connection: Any) -> bytes:
            raise RuntimeError("no TLVs today")

        self.patch(driver, "_proxy_tlvs", lambda: broken)
        reported: list[Any] = []
        self.patch(sys, "unraisablehook", reported.append)
        backend = self.serve(recv_outcome)
        forwarder = self.forward(
            "--to", backend.address, "--proxy-protocol", "v2",
            "--tls-cert", str(server.cert), "--tls-key", str(server.key),
        )  # fmt: skip

        def talk() -> bytes:
            sock = connect(forwarder.address)
            try:
                with context.wrap_socket(sock, server_hostname="proxied.example") as tls:
                    tls.sendall(b"hello")
                    return tls.recv(16)
            except OSError:  # reset (ssl's errors are OSErrors too)
                return b""
            finally:
                sock.close()

        reply = yield deferToThread(talk)
        (record,) = yield forwarder.closed(1)
        received = yield deferToThread(backend.outcome)
        self.assertEqual((reply, received[0]), (b"", b""))
        self.assertEqual(record["reason"], "the PROXY header could not be made")
        self.assertEqual([str(each.exc_value) for each in reported], ["no TLVs today"])
