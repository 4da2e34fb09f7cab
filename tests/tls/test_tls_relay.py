"""TLS legs over real loopback sockets, in-process: half-close, resets, handshake limits, backend TLS.

The forwarder runs on this process's reactor (``loopback.Forwarder``);
clients and backends are blocking sockets in threads. TLS clients are
pyOpenSSL connections over blocking sockets, so a test can send close_notify
(``shutdown()``) and go on reading, which Python's ``ssl`` module cannot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import trustme
from certs import Pair, write_ca, write_pair
from loopback import (
    IO_TIMEOUT,
    LoopbackTestCase,
    MiB,
    connect,
    cyclic_garbage,
    digest_then_reply,
    echo,
    echo_through,
    recv_all,
    recv_outcome,
    reset,
    sha256,
)
from OpenSSL import SSL
from planes import TWISTED, on_each_plane, on_planes
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread

from tunnelkit.engine import driver as native
from tunnelkit.tls.transport import RelayTLSProtocol

Inline = Generator[Deferred[Any], Any, None]


class TLSClient:
    """A blocking pyOpenSSL client: reads and writes whole buffers, and can half-close."""

    def __init__(self, address: str, ca: Path, name: str = "localhost") -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(str(ca))
        context.set_verify(SSL.VERIFY_PEER)
        self.sock = connect(address)
        # pyOpenSSL wants a blocking socket; the kernel's own timeouts bound every call.
        self.sock.settimeout(None)
        limit = struct.pack("ll", int(IO_TIMEOUT), 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self.conn = SSL.Connection(context, self.sock)
        self.conn.set_tlsext_host_name(name.encode())
        self.conn.set_connect_state()
        self.conn.do_handshake()

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def close_notify(self) -> None:
        """Send close_notify; reading goes on (OpenSSL allows it until the peer's)."""
        self.conn.shutdown()

    def read_to_end(self) -> tuple[bytes, str]:
        """Everything until the peer ends: ``close_notify``, ``EOF`` (no close_notify) or ``RST``."""
        chunks = []
        while True:
            try:
                chunks.append(self.conn.recv(MiB))
            except SSL.ZeroReturnError:
                return b"".join(chunks), "close_notify"
            except SSL.SysCallError as e:
                how = "RST" if e.args[0] == 104 else "EOF"
                return b"".join(chunks), how
            except SSL.Error:
                return b"".join(chunks), "EOF"

    def close(self) -> None:
        self.sock.close()


def tls_echo(context: ssl.SSLContext) -> Callable[[socket.socket], int]:
    """Backend: TLS server that echoes until the client's close_notify, then sends its own."""

    def handler(conn: socket.socket) -> int:
        tls = context.wrap_socket(conn, server_side=True)
        total = 0
        while data := tls.recv(256 * 1024):
            tls.sendall(data)
            total += len(data)
        tls.unwrap()
        return total

    return handler


def tls_digest_then_reply(context: ssl.SSLContext, reply: bytes) -> Callable[[socket.socket], str]:
    """Backend: TLS server that reads to the client's end, then replies with a digest and ``reply``."""

    def handler(conn: socket.socket) -> str:
        tls = context.wrap_socket(conn, server_side=True)
        digest = hashlib.sha256()
        while data := tls.recv(256 * 1024):
            digest.update(data)
        tls.sendall(digest.digest() + reply)
        tls.unwrap()
        return digest.hexdigest()

    return handler


class StalledHandshake:
    """Backend: reads the ClientHello (then sets :attr:`hello`) and never answers it."""

    def __init__(self) -> None:
        self.hello = threading.Event()

    def __call__(self, conn: socket.socket) -> tuple[bytes, str]:
        if conn.recv(1 << 16):
            self.hello.set()
        return recv_outcome(conn)


class TLSTestCase(LoopbackTestCase):
    """A CA and a certificate for ``localhost``/127.0.0.1 per test."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tunnelkit-tls-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.ca = trustme.CA()
        self.ca_file = write_ca(self.ca, self.dir)
        self.pair = write_pair(self.ca, self.dir, "localhost", "127.0.0.1")

    def terminate(self, *args: str, pair: Pair | None = None) -> Any:
        pair = pair or self.pair
        return self.forward("--tls-cert", str(pair.cert), "--tls-key", str(pair.key), *args)

    def server_context(self, *identities: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(*identities).configure_cert(context)
        return context


class TLSEngineChoiceTests(TLSTestCase):
    def test_engine_by_default(self) -> None:
        """With the default --engine auto, TLS is terminated by the engine (when it is built)."""
        fwd = self.terminate("--to", "127.0.0.1:9")
        assert fwd.native is native.built()


@on_each_plane
class TerminationTests(TLSTestCase):
    """A TLS client leg: both ways at once, half-close, resets."""

    @inlineCallbacks
    def test_both_ways_at_once(self) -> Inline:
        """8 MiB up and its echo down through a TLS client leg at the same time, hash-checked."""
        backend = self.serve(echo)
        fwd = self.terminate("--to", backend.address)
        payload = os.urandom(8 * MiB)

        def client() -> tuple[bytes, str]:
            tls = TLSClient(fwd.address, self.ca_file)
            # Writing 8 MiB while the echo comes back needs a reader: send in slices.
            received = []
            view = memoryview(payload)
            for start in range(0, len(payload), 256 * 1024):
                tls.send(bytes(view[start : start + 256 * 1024]))
                tls.sock.setblocking(False)
                try:
                    while True:
                        received.append(tls.conn.recv(MiB))
                except SSL.WantReadError:
                    pass
                finally:
                    tls.sock.setblocking(True)
            tls.close_notify()
            rest, how = tls.read_to_end()
            tls.close()
            return b"".join(received) + rest, how

        answer, how = yield deferToThread(client)
        assert sha256(answer) == sha256(payload)
        assert how == "close_notify"
        assert backend.outcome() == len(payload)
        [record] = yield fwd.closed(1)
        assert record["tls_version"] in ("TLSv1.2", "TLSv1.3")
        assert record["sni"] == "localhost"
        assert (record["bytes_up"], record["bytes_down"]) == (len(payload), len(payload))

    @inlineCallbacks
    def late_reply(self, finish: Callable[[TLSClient], None]) -> Inline:
        """The client sends 1 MiB and ends its input with ``finish``; the backend reads to EOF, then replies 2 MiB."""
        reply = os.urandom(2 * MiB)
        backend = self.serve(digest_then_reply(reply))
        fwd = self.terminate("--to", backend.address)
        payload = os.urandom(MiB)

        def client() -> tuple[bytes, str]:
            tls = TLSClient(fwd.address, self.ca_file)
            tls.send(payload)
            finish(tls)
            try:
                return tls.read_to_end()
            finally:
                tls.close()

        answer, how = yield deferToThread(client)
        assert backend.outcome() == (len(payload), sha256(payload))
        assert answer == hashlib.sha256(payload).digest() + reply
        assert how == "close_notify"
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("client", "FIN")

    def test_close_notify_is_a_half_close(self) -> Deferred[None]:
        """The backend's reply, sent after it read the client's close_notify as EOF, reaches the client."""
        return self.late_reply(TLSClient.close_notify)

    def test_fin_without_close_notify_is_a_half_close(self) -> Deferred[None]:
        """A TCP FIN with no close_notify also ends the client's input and the reply still comes back."""
        return self.late_reply(lambda tls: tls.sock.shutdown(socket.SHUT_WR))

    @inlineCallbacks
    def test_backend_fin_sends_close_notify_and_keeps_reading(self) -> Inline:
        """The backend finishes first: the client gets close_notify, and what it sends after still arrives."""
        banner = os.urandom(10_000)
        late = os.urandom(300_000)

        def backend_handler(conn: socket.socket) -> str:
            conn.sendall(banner)
            conn.shutdown(socket.SHUT_WR)
            return sha256(recv_all(conn))

        backend = self.serve(backend_handler)
        fwd = self.terminate("--to", backend.address)

        def client() -> tuple[bytes, str]:
            tls = TLSClient(fwd.address, self.ca_file)
            try:
                got = tls.read_to_end()
                tls.send(late)
                tls.close_notify()
                return got
            finally:
                tls.close()

        answer, how = yield deferToThread(client)
        assert (answer, how) == (banner, "close_notify")
        # Waiting for the record first: outcome() blocks the reactor that relays the bytes.
        [record] = yield fwd.closed(1)
        assert backend.outcome() == sha256(late)
        assert (record["closed_by"], record["close_kind"]) == ("backend", "FIN")

    @inlineCallbacks
    def test_backend_reset_is_a_reset(self) -> Inline:
        """An RST from the backend reaches the TLS client as an RST, not as a clean close_notify."""
        backend = self.serve(lambda conn: (conn.recv(10), reset(conn)))
        fwd = self.terminate("--to", backend.address)

        def client() -> tuple[bytes, str]:
            tls = TLSClient(fwd.address, self.ca_file)
            tls.send(b"hello")
            try:
                return tls.read_to_end()
            finally:
                tls.close()

        answer, how = yield deferToThread(client)
        assert (answer, how) == (b"", "RST")
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("backend", "RST")


@on_each_plane
class HandshakeTests(TLSTestCase):
    """Clients that never complete a handshake."""

    @inlineCallbacks
    def test_silent_and_garbage_clients_never_reach_the_backend(self) -> Inline:
        """A silent client times out, a plaintext one fails; neither dials the backend; each logs once."""
        backend = self.serve(echo)
        fwd = self.terminate("--to", backend.address, "--tls-handshake-timeout", "0.5")

        def clients() -> tuple[tuple[bytes, str], tuple[bytes, str]]:
            with connect(fwd.address) as garbage:
                garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
                garbage_outcome = recv_outcome(garbage)
            with connect(fwd.address) as silent:
                silent.settimeout(5)
                return garbage_outcome, recv_outcome(silent)

        garbage_outcome, silent_outcome = yield deferToThread(clients)
        assert garbage_outcome == (b"", "EOF")
        assert silent_outcome == (b"", "RST")
        records = yield fwd.closed(2)
        assert [(r["close_kind"], r["backend"]) for r in records] == [
            ("error", "-"),
            ("timeout", "-"),
        ]
        assert records[0]["reason"].startswith("TLS handshake failed: ")
        assert records[1]["reason"] == "TLS handshake timeout (0.5 s)"
        assert backend.accepted == 0
        assert fwd.service.ports[0].factory.creator.handshake_failures == 2


@on_planes(TWISTED)
class BackendTLSTests(TLSTestCase):
    """A TLS backend leg and CONNECT over TLS, which Twisted relays on either --engine."""

    @inlineCallbacks
    def test_https_proxy(self) -> Inline:
        """--mode connect over TLS: the CONNECT request and the tunnel both ride the client's TLS."""
        backend = self.serve(echo)
        fwd = self.terminate("--mode", "connect", "--allow-dest", "127.0.0.1")
        payload = os.urandom(MiB)

        def client() -> tuple[bytes, bytes]:
            tls = TLSClient(fwd.address, self.ca_file)
            try:
                tls.send(f"CONNECT {backend.address} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += tls.conn.recv(1)
                tls.send(payload)
                tls.close_notify()
                return head, tls.read_to_end()[0]
            finally:
                tls.close()

        head, answer = yield deferToThread(client)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert sha256(answer) == sha256(payload)
        [record] = yield fwd.closed(1)
        assert (record["status"], record["sni"]) == (200, "localhost")

    @inlineCallbacks
    def test_ended_tls_tunnels_are_freed_without_the_collector(self) -> Inline:
        """TLS legs, the handshake leg and a TLS backend end in no reference cycle."""
        backend = self.serve(tls_echo(self.server_context("127.0.0.1")))
        fwd = self.terminate(
            "--to", backend.address, "--backend-tls", "--backend-ca", str(self.ca_file)
        )

        def client() -> bytes:
            tls = TLSClient(fwd.address, self.ca_file)
            try:
                tls.send(b"x" * 1000)
                tls.close_notify()
                return tls.read_to_end()[0]
            finally:
                tls.close()

        with cyclic_garbage() as cycles:
            for _ in range(5):
                answer = yield deferToThread(client)
                assert answer == b"x" * 1000
            yield fwd.closed(5)
        assert not cycles, cycles

    @inlineCallbacks
    def test_verified_backend(self) -> Inline:
        """tls:HOST:PORT with --backend-ca: a hash-checked echo through a verified TLS backend."""
        backend = self.serve(tls_echo(self.server_context("localhost")))
        port = backend.address.rpartition(":")[2]
        fwd = self.forward("--to", f"tls:localhost:{port}", "--backend-ca", str(self.ca_file))
        payload = os.urandom(3 * MiB)
        answer = yield deferToThread(echo_through, fwd.address, payload)
        assert sha256(answer) == sha256(payload)
        assert backend.outcome() == len(payload)

    @inlineCallbacks
    def test_backend_half_close_delivers_late_reply(self) -> Inline:
        """The client's FIN becomes close_notify to the TLS backend, whose later reply comes back."""
        reply = os.urandom(MiB)
        backend = self.serve(tls_digest_then_reply(self.server_context("127.0.0.1"), reply))
        fwd = self.forward(
            "--to", backend.address, "--backend-tls", "--backend-ca", str(self.ca_file)
        )
        payload = os.urandom(500_000)
        answer = yield deferToThread(echo_through, fwd.address, payload)
        assert answer == hashlib.sha256(payload).digest() + reply
        assert backend.outcome() == sha256(payload)

    def tls_forward(self, *args: str) -> Any:
        """A forwarder whose backends get TLS verified against the test CA."""
        return self.forward("--backend-tls", "--backend-ca", str(self.ca_file), *args)

    @inlineCallbacks
    def test_wrong_name_fails_over_to_next_backend(self) -> Inline:
        """A backend whose certificate names another host is a failed attempt: the next one is used."""
        wrong = self.serve(tls_echo(self.server_context("other.example")))
        right = self.serve(tls_echo(self.server_context("127.0.0.1")))
        fwd = self.tls_forward("--to", wrong.address, "--to", right.address)
        answer = yield deferToThread(echo_through, fwd.address, b"ping")
        assert answer == b"ping"
        assert right.outcome() == 4
        [record] = yield fwd.closed(1)
        assert record["backend"] == right.address

    @inlineCallbacks
    def test_wrong_name_alone_closes_the_client(self) -> Inline:
        """With no other backend, a refused certificate closes the client and says why."""
        wrong = self.serve(tls_echo(self.server_context("other.example")))
        fwd = self.tls_forward("--to", wrong.address)

        def client() -> tuple[bytes, str]:
            with connect(fwd.address) as sock:
                sock.sendall(b"ping")
                return recv_outcome(sock)

        answer, _ = yield deferToThread(client)
        assert answer == b""
        [record] = yield fwd.closed(1)
        assert record["close_kind"] == "error"
        assert record["reason"].startswith("no backend connected: ")
        assert record["backend"] == "-"

    @inlineCallbacks
    def test_silent_handshake_times_out_and_fails_over(self) -> Inline:
        """A backend that accepts but never answers the handshake costs one connect timeout, then the next is used."""
        stalled_handler = StalledHandshake()
        stalled = self.serve(stalled_handler)
        right = self.serve(tls_echo(self.server_context("127.0.0.1")))
        fwd = self.tls_forward(
            "--connect-timeout", "0.5", "--to", stalled.address, "--to", right.address
        )
        answer = yield deferToThread(echo_through, fwd.address, b"ping")
        assert answer == b"ping"
        [record] = yield fwd.closed(1)
        assert record["backend"] == right.address
        assert stalled.outcome() == (b"", "RST")

    @inlineCallbacks
    def test_client_leaving_during_backend_handshake(self) -> Inline:
        """A client that resets while the backend handshake is pending cancels it, and the tunnel ends once."""
        stalled_handler = StalledHandshake()
        stalled = self.serve(stalled_handler)
        fwd = self.tls_forward("--to", stalled.address)

        def client() -> None:
            sock = connect(fwd.address)
            assert stalled_handler.hello.wait(IO_TIMEOUT), "no ClientHello reached the backend"
            reset(sock)

        yield deferToThread(client)
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"], record["backend"]) == (
            "client",
            "RST",
            "-",
        )
        # From a thread: the abort completes on the reactor that outcome() would block.
        seen = yield deferToThread(stalled.outcome)
        assert seen == (b"", "RST")
        assert fwd.tunnels == []


@on_planes(TWISTED)
class PortableTerminationTests(TerminationTests):
    """TerminationTests with bulk TLS through pyOpenSSL's calls only (no tls_direct)."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(RelayTLSProtocol, "direct_openssl", False)


@on_planes(TWISTED)
class PortableBackendTLSTests(BackendTLSTests):
    """BackendTLSTests with bulk TLS through pyOpenSSL's calls only (no tls_direct)."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(RelayTLSProtocol, "direct_openssl", False)
