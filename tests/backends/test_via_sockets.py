"""``--via``: backends reached through upstream proxies, over real loopback sockets.

The proxies are tunnelkit's own CONNECT mode (in-process, also over TLS as an
``https://`` proxy), tinyproxy and microsocks (started here on 127.0.0.1,
skipped cleanly when not installed), and small scripted proxies in threads
for the answers a real one will not give on demand (a SOCKS5 ``0x02``, the
backend's first bytes in the same segment as the proxy's reply). Payloads
are random and checked by SHA-256 both ways, with a half-close in between;
every wait is bounded. ``--via`` relays on Twisted's plane only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import trustme
from certs import write_ca, write_pair
from loopback import (
    IO_TIMEOUT,
    BulkSender,
    Forwarder,
    LoopbackTestCase,
    MiB,
    connect,
    exchange,
    hashing_echo,
    recv_all,
    recv_exactly,
    sha256,
    split_address,
)
from planes import TWISTED_NO_SPLICE, TWISTED_SPLICE, on_planes
from processes import free_port, wait_until
from tls_clients import TLSBackend, tls_echo
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest

from tunnelkit.policy.htpasswd import make_entry

Inline = Generator[Deferred[Any], Any, None]

PAYLOAD = 2 * MiB
USER = "alice"
PASSWORD = secrets.token_urlsafe(12)


def echoes_half_closed(address: str, size: int = PAYLOAD) -> tuple[str, str, str]:
    """Send a random payload, then FIN, and read the echo to EOF: (sent, echoed) SHA-256s and the backend's."""
    payload = os.urandom(size)
    with connect(address) as sock:
        received = exchange(sock, payload)
    return sha256(payload), sha256(received), str(len(received))


def echoes_whole(address: str, size: int = PAYLOAD) -> tuple[str, str]:
    """Send a random payload and read its echo, without a half-close: (sent, echoed) SHA-256s.

    tinyproxy and microsocks close both ways at a client's first EOF, so a
    half-close is tested through tunnelkit's own CONNECT mode only.
    """
    payload = os.urandom(size)
    with connect(address) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        received = recv_exactly(sock, size)
        sender.join(IO_TIMEOUT)
    return sha256(payload), sha256(received)


def read_until_closed(address: str) -> bytes:
    """Connect and read until tunnelkit closes (a tunnel whose backend did not connect)."""
    with connect(address) as sock:
        return recv_all(sock)


def started(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    """``argv`` running until it accepts on 127.0.0.1:``port`` (bounded wait)."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{argv} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return False

    try:
        wait_until(accepting, f"{argv[0]} listening on {port}")
    except BaseException:
        process.kill()
        process.wait(IO_TIMEOUT)
        raise
    return process


@contextlib.contextmanager
def running(argv: list[str], port: int) -> Iterator[str]:
    """A third-party proxy for the ``with`` block; its address."""
    if shutil.which(argv[0]) is None:
        raise SkipTest(f"{argv[0]} is not installed (apt-get install {Path(argv[0]).name})")
    process = started(argv, port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(IO_TIMEOUT)


def tinyproxy_config(directory: Path, port: int, *, connect_ports: tuple[int, ...] = ()) -> Path:
    """A foreground tinyproxy on 127.0.0.1:``port`` for loopback clients; CONNECT to ``connect_ports`` only if given."""
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Allow 127.0.0.1",
        "LogLevel Critical",
        "MaxClients 20",
        f'PidFile "{directory / "tinyproxy.pid"}"',
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    path = directory / "tinyproxy.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def scripted(reply: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    """A scripted proxy's handler: ``reply`` answers, then the proxy waits for the client to close."""

    def handler(conn: socket.socket) -> None:
        reply(conn)
        recv_all(conn)

    return handler


def socks_refusing(code: int) -> Callable[[socket.socket], None]:
    """A SOCKS5 proxy that accepts no-auth, reads the request, and answers reply ``code``."""

    def reply(conn: socket.socket) -> None:
        recv_exactly(conn, 3)  # 05 01 00
        conn.sendall(b"\x05\x00")
        head = recv_exactly(conn, 5)
        recv_exactly(conn, head[4] + 2 if head[3] == 3 else 4 + 2 - 1)
        conn.sendall(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))

    return scripted(reply)


def silent_proxy(conn: socket.socket) -> bytes:
    """A proxy that reads and never answers; what it read once its connection ended (reset or closed)."""
    read = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(4096):
            read += chunk
    return read


def banner_proxy(conn: socket.socket) -> None:
    """An HTTP proxy that is its own backend: its 200 and the backend's banner in one segment, then an echo."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, "the client left before its CONNECT ended"
        head += chunk
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\nBANNER\n")
    hashing_echo(conn)


def temporary_directory(case: LoopbackTestCase) -> Path:
    """A directory of the test ``case``'s own, removed after it."""
    made = tempfile.TemporaryDirectory(prefix="tunnelkit-via-")
    case.addCleanup(made.cleanup)
    return Path(made.name)


def by_proxy(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records of the forwarder, and those of the CONNECT proxy running in the same process."""
    ours = [r for r in records if r.get("mode") != "connect"]
    return ours, [r for r in records if r.get("mode") == "connect"]


def microsocks(port: int) -> list[str]:
    """microsocks on 127.0.0.1:``port``, requiring USER and PASSWORD (RFC 1929)."""
    return ["/usr/bin/microsocks", "-i", "127.0.0.1", "-p", str(port), "-u", USER, "-P", PASSWORD]


class ViaTests(LoopbackTestCase):
    """Tunnels through upstream proxies: their data, their half-close, their refusals."""

    def connect_proxy(self, *args: str) -> Forwarder:
        """tunnelkit's own CONNECT mode, loopback targets allowed (as an upstream proxy)."""
        proxy = Forwarder(
            "--mode", "connect", "--allow-dest", "127.0.0.0/8", "--allow-dest", "::1", *args
        )
        self.addCleanup(lambda: proxy.stop() if proxy.service.running else None)
        return proxy

    def https_proxy(self) -> tuple[trustme.CA, Path, int]:
        """tunnelkit's CONNECT mode as an ``https://`` proxy for ``localhost``: its CA, a directory, its port."""
        ca = trustme.CA()
        directory = temporary_directory(self)
        pair = write_pair(ca, directory, "localhost")
        proxy = self.connect_proxy("--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
        return ca, directory, split_address(proxy.address)[1]

    @inlineCallbacks
    def assert_relays(self, fwd: Forwarder) -> Inline:
        sent, echoed, size = yield deferToThread(echoes_half_closed, fwd.address)
        self.assertEqual((echoed, size), (sent, str(PAYLOAD)))

    @inlineCallbacks
    def test_through_tunnelkit_connect(self) -> Inline:
        """Through tunnelkit's CONNECT mode, a payload and its echo pass intact around a half-close."""
        backend = self.serve(hashing_echo)
        proxy = self.connect_proxy()
        # A name that resolves here too is still the proxy's to resolve: it is sent as written.
        name = f"localhost:{split_address(backend.address)[1]}"
        fwd = self.forward("--to", name, "--via", f"http://{proxy.address}")
        self.assertFalse(fwd.native)
        yield from self.assert_relays(fwd)
        [record], [proxied] = by_proxy((yield fwd.closed(2)))
        self.assertEqual(record["backend"], name)
        self.assertEqual(record["backend_address"], proxy.address)
        self.assertEqual((record["bytes_up"], record["bytes_down"]), (PAYLOAD, PAYLOAD))
        self.assertEqual(proxied["target"], name)

    @inlineCallbacks
    def test_refusal_is_a_failed_attempt(self) -> Inline:
        """A proxy's 403 is logged with its status, and the next backend is tried through it."""
        refused, served = self.serve(hashing_echo), self.serve(hashing_echo)
        port = split_address(served.address)[1]
        proxy = self.connect_proxy("--allow-port", str(port))
        fwd = self.forward(
            "--to", refused.address, "--to", served.address, "--balance", "first",
            "--via", f"http://{proxy.address}",
        )  # fmt: skip
        yield from self.assert_relays(fwd)
        [record], proxied = by_proxy((yield fwd.closed(3)))
        self.assertEqual((record["backend"], record["attempts"]), (served.address, 2))
        self.assertEqual([r["status"] for r in proxied], [403, 200])

    @inlineCallbacks
    def test_refusal_logged_with_status(self) -> Inline:
        """The record of a tunnel every proxy refusal failed says the HTTP status and the proxy."""
        backend = self.serve(hashing_echo)
        proxy = self.connect_proxy("--allow-port", "1")
        fwd = self.forward("--to", backend.address, "--via", f"http://{proxy.address}")
        got = yield deferToThread(read_until_closed, fwd.address)
        self.assertEqual(got, b"")
        [record], _ = by_proxy((yield fwd.closed(2)))
        self.assertIn(
            f"via http://{proxy.address}: proxy refused CONNECT {backend.address}: HTTP 403 Forbidden",
            record["reason"],
        )

    @inlineCallbacks
    def test_tls_end_to_end(self) -> Inline:
        """``--to tls:NAME:PORT --via``: TLS from tunnelkit to the backend, its certificate verified."""
        ca = trustme.CA()
        directory = temporary_directory(self)
        backend = TLSBackend(self.serve, write_pair(ca, directory, "localhost"), tls_echo)
        proxy = self.connect_proxy()
        fwd = self.forward(
            "--to", f"tls:localhost:{backend.port}", "--backend-ca", str(write_ca(ca, directory)),
            "--via", f"http://{proxy.address}",
        )  # fmt: skip
        yield from self.assert_relays(fwd)
        self.assertEqual(backend.sni, ["localhost"])
        _, [proxied] = by_proxy((yield fwd.closed(2)))
        self.assertEqual(proxied["target"], f"localhost:{backend.port}")

    @inlineCallbacks
    def test_tls_to_the_proxy(self) -> Inline:
        """``--via https://``: TLS to the proxy (verified with --backend-ca), plain TCP inside to the backend."""
        ca, directory, port = self.https_proxy()
        backend = self.serve(hashing_echo)
        fwd = self.forward(
            "--to", backend.address, "--backend-ca", str(write_ca(ca, directory)),
            "--via", f"https://localhost:{port}",
        )  # fmt: skip
        yield from self.assert_relays(fwd)
        _, [proxied] = by_proxy((yield fwd.closed(2)))
        self.assertEqual(proxied["target"], backend.address)

    @inlineCallbacks
    def test_tls_in_tls(self) -> Inline:
        """``--via https://`` and a TLS backend: each certificate checked for its own name (--backend-sni is the backend's)."""
        ca, directory, port = self.https_proxy()
        backend = TLSBackend(self.serve, write_pair(ca, directory, "backend.test"), tls_echo)
        fwd = self.forward(
            "--to", f"tls:127.0.0.1:{backend.port}", "--backend-sni", "backend.test",
            "--backend-ca", str(write_ca(ca, directory)), "--via", f"https://localhost:{port}",
        )  # fmt: skip
        yield from self.assert_relays(fwd)
        self.assertEqual(backend.sni, ["backend.test"])

    @inlineCallbacks
    def test_proxy_certificate_verified(self) -> Inline:
        """An ``https://`` proxy whose certificate does not verify is a failed attempt that says so."""
        _, directory, port = self.https_proxy()
        backend = self.serve(hashing_echo)
        other = write_ca(trustme.CA(), directory, "other")
        fwd = self.forward(
            "--to",
            backend.address,
            "--backend-ca",
            str(other),
            "--via",
            f"https://localhost:{port}",
        )
        yield deferToThread(read_until_closed, fwd.address)
        records = yield fwd.closed(2)
        [reason] = [r["reason"] for r in records if r["reason"].startswith("no backend connected")]
        self.assertIn(f"via https://localhost:{port}: certificate verify failed", reason)
        self.assertIn("name checked: 'localhost'", reason)

    @inlineCallbacks
    def test_bytes_after_the_reply(self) -> Inline:
        """What the proxy sends in the same segment as its 200 reaches the client first, once."""
        proxy = self.serve(banner_proxy)
        fwd = self.forward("--to", "backend.invalid:22", "--via", f"http://{proxy.address}")

        def talk() -> tuple[bytes, bytes]:
            with connect(fwd.address) as sock:
                banner = recv_exactly(sock, 7)
                return banner, exchange(sock, b"hello")

        banner, echoed = yield deferToThread(talk)
        self.assertEqual((banner, echoed), (b"BANNER\n", b"hello"))

    @inlineCallbacks
    def test_socks5_refusal_code(self) -> Inline:
        """A SOCKS5 proxy's reply 0x02 is logged with its code and meaning."""
        proxy = self.serve(socks_refusing(0x02))
        fwd = self.forward("--to", "db.internal:5432", "--via", f"socks5://{proxy.address}")
        yield deferToThread(read_until_closed, fwd.address)
        [record] = yield fwd.closed()
        self.assertIn(
            f"via socks5://{proxy.address}: SOCKS5 proxy refused CONNECT db.internal:5432:"
            " reply 0x02 (connection not allowed by ruleset)",
            record["reason"],
        )

    @inlineCallbacks
    def test_through_tinyproxy(self) -> Inline:
        """Through tinyproxy (HTTP CONNECT), intact both ways; a port it refuses is a logged 403."""
        backend = self.serve(hashing_echo)
        port = split_address(backend.address)[1]
        directory = temporary_directory(self)
        listen = free_port()
        config = tinyproxy_config(directory, listen, connect_ports=(port,))
        with running(["/usr/bin/tinyproxy", "-d", "-c", str(config)], listen) as proxy:
            fwd = self.forward("--to", backend.address, "--via", f"http://{proxy}")
            sent, echoed = yield deferToThread(echoes_whole, fwd.address)
            self.assertEqual(echoed, sent)
            yield fwd.stop()
            refusing = self.forward("--to", "127.0.0.1:1", "--via", f"http://{proxy}")
            yield deferToThread(read_until_closed, refusing.address)
            [record] = yield refusing.closed()
        self.assertIn(
            f"via http://{proxy}: proxy refused CONNECT 127.0.0.1:1: HTTP 403", record["reason"]
        )

    @inlineCallbacks
    def test_through_microsocks_with_credentials(self) -> Inline:
        """Through microsocks with -u/-P (RFC 1929), intact both ways; a wrong password is a logged refusal."""
        backend = self.serve(hashing_echo)
        listen = free_port()
        argv = microsocks(listen)
        with running(argv, listen) as proxy:
            fwd = self.forward(
                "--to", backend.address, "--via", f"socks5://{USER}:{PASSWORD}@{proxy}"
            )
            sent, echoed = yield deferToThread(echoes_whole, fwd.address)
            self.assertEqual(echoed, sent)
            yield fwd.stop()
            wrong = self.forward("--to", backend.address, "--via", f"socks5://{USER}:nope@{proxy}")
            yield deferToThread(read_until_closed, wrong.address)
            [record] = yield wrong.closed()
        reason = record["reason"]
        self.assertIn(f"via socks5://{USER}:***@{proxy}: ", reason)
        self.assertNotIn("nope", reason)


class ViaChainTests(LoopbackTestCase):
    """Several ``--via``: a chain, each proxy reached through the one before (gost's chains)."""

    def connect_proxy(self, *args: str) -> Forwarder:
        proxy = Forwarder("--mode", "connect", "--allow-dest", "127.0.0.0/8", *args)
        self.addCleanup(proxy.stop)
        return proxy

    @inlineCallbacks
    def test_http_then_socks5(self) -> Inline:
        """Through tunnelkit's CONNECT mode, then microsocks with credentials: intact both ways."""
        backend = self.serve(hashing_echo)
        first = self.connect_proxy()
        listen = free_port()
        argv = microsocks(listen)
        with running(argv, listen) as second:
            fwd = self.forward(
                "--to", backend.address,
                "--via", f"http://{first.address}", "--via", f"socks5://{USER}:{PASSWORD}@{second}",
            )  # fmt: skip
            sent, echoed = yield deferToThread(echoes_whole, fwd.address)
            self.assertEqual(echoed, sent)
            records = yield fwd.closed(2)
        [proxied] = [r for r in records if r.get("mode") == "connect"]
        self.assertEqual(proxied["target"], second)

    @inlineCallbacks
    def test_tls_to_the_second_proxy(self) -> Inline:
        """An https:// proxy behind an http:// one: TLS to it inside the first tunnel, a half-close passed on."""
        ca = trustme.CA()
        directory = temporary_directory(self)
        pair = write_pair(ca, directory, "localhost")
        backend = self.serve(hashing_echo)
        first = self.connect_proxy("--allow-dest", "::1")
        second = self.connect_proxy("--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
        port = split_address(second.address)[1]
        fwd = self.forward(
            "--to", backend.address, "--backend-ca", str(write_ca(ca, directory)),
            "--via", f"http://{first.address}", "--via", f"https://localhost:{port}",
        )  # fmt: skip
        sent, echoed, size = yield deferToThread(echoes_half_closed, fwd.address)
        self.assertEqual((echoed, size), (sent, str(PAYLOAD)))
        targets = sorted(r["target"] for r in (yield fwd.closed(3)) if r.get("mode") == "connect")
        self.assertEqual(targets, sorted([backend.address, f"localhost:{port}"]))

    @inlineCallbacks
    def test_refusal_says_which_proxy(self) -> Inline:
        """The first proxy refusing the second is its refusal, said once, with its status."""
        backend = self.serve(hashing_echo)
        first = self.connect_proxy("--allow-port", str(split_address(backend.address)[1]))
        second = self.connect_proxy()
        fwd = self.forward(
            "--to", backend.address,
            "--via", f"http://{first.address}", "--via", f"http://{second.address}",
        )  # fmt: skip
        yield deferToThread(read_until_closed, fwd.address)
        records = yield fwd.closed(2)
        [reason] = [r["reason"] for r in records if r["reason"].startswith("no backend connected")]
        self.assertEqual(
            reason,
            f"no backend connected: {backend.address}: via http://{first.address}: proxy refused"
            f" CONNECT {second.address}: HTTP 403 Forbidden",
        )


class ViaSocks5ModeTests(LoopbackTestCase):
    """Through tunnelkit's own SOCKS5 mode."""

    def socks5_proxy(self, *args: str) -> Forwarder:
        proxy = Forwarder("--mode", "socks5", *args)
        self.addCleanup(proxy.stop)
        return proxy

    @inlineCallbacks
    def test_with_credentials(self) -> Inline:
        """Through --mode socks5 with --auth-file (RFC 1929), intact both ways around a half-close."""
        directory = temporary_directory(self)
        users = directory / "users"
        users.write_text(make_entry(USER, PASSWORD) + "\n")
        backend = self.serve(hashing_echo)
        proxy = self.socks5_proxy("--allow-dest", "127.0.0.0/8", "--auth-file", str(users))
        fwd = self.forward(
            "--to", backend.address, "--via", f"socks5://{USER}:{PASSWORD}@{proxy.address}"
        )
        sent, echoed, size = yield deferToThread(echoes_half_closed, fwd.address)
        self.assertEqual((echoed, size), (sent, str(PAYLOAD)))

    @inlineCallbacks
    def test_policy_refusal(self) -> Inline:
        """A target the SOCKS5 mode's policy refuses is reply 0x02 in the forwarder's record."""
        backend = self.serve(hashing_echo)
        proxy = self.socks5_proxy()
        fwd = self.forward("--to", backend.address, "--via", f"socks5://{proxy.address}")
        yield deferToThread(read_until_closed, fwd.address)
        records = yield fwd.closed(2)
        [reason] = [r["reason"] for r in records if r["reason"].startswith("no backend connected")]
        self.assertIn("reply 0x02 (connection not allowed by ruleset)", reason)


class ViaAttemptTests(LoopbackTestCase):
    """The negotiation is part of the connect attempt: bounded, cancelled, failed, health-checked."""

    @inlineCallbacks
    def test_proxy_by_name(self) -> Inline:
        """A proxy given by name (resolved here, per connection) relays intact around a half-close."""
        backend = self.serve(hashing_echo)
        proxy = Forwarder("--mode", "connect", "--allow-dest", "127.0.0.0/8")
        self.addCleanup(proxy.stop)
        port = split_address(proxy.address)[1]
        fwd = self.forward("--to", backend.address, "--via", f"http://localhost:{port}")
        sent, echoed, size = yield deferToThread(echoes_half_closed, fwd.address)
        self.assertEqual((echoed, size), (sent, str(PAYLOAD)))

    @inlineCallbacks
    def test_silent_proxy_times_out(self) -> Inline:
        """A proxy that never answers is cut at --connect-timeout: its connection closed, the record a timeout."""
        proxy = self.serve(silent_proxy)
        fwd = self.forward(
            "--to",
            "db.internal:5432",
            "--via",
            f"http://{proxy.address}",
            "--connect-timeout",
            "0.5",
        )
        yield deferToThread(read_until_closed, fwd.address)
        [record] = yield fwd.closed()
        self.assertEqual(record["close_kind"], "timeout")
        self.assertIn("db.internal:5432: connect timeout (0.5 s)", record["reason"])
        # The proxy saw its connection end: the attempt left nothing open.
        got = yield deferToThread(proxy.outcome)
        self.assertTrue(got.startswith(b"CONNECT db.internal:5432 HTTP/1.1\r\n"), got)

    @inlineCallbacks
    def test_proxy_closes(self) -> Inline:
        """A proxy that closes without answering fails the attempt, and the record says so."""
        proxy = self.serve(lambda conn: conn.recv(1))
        fwd = self.forward("--to", "db.internal:5432", "--via", f"socks5://{proxy.address}")
        yield deferToThread(read_until_closed, fwd.address)
        [record] = yield fwd.closed()
        self.assertIn(
            "the proxy closed the connection without answering the SOCKS5 greeting",
            record["reason"],
        )

    @inlineCallbacks
    def test_health_checks_go_through_the_proxy(self) -> Inline:
        """Health checks dial through --via: a backend the proxy refuses goes down, with the 403 said."""
        backend = self.serve(hashing_echo)
        proxy = Forwarder("--mode", "connect", "--allow-dest", "127.0.0.0/8", "--allow-port", "1")
        self.addCleanup(proxy.stop)
        downs: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if event.get("event") == "backend_down":
                downs.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.forward(
            "--to", backend.address, "--via", f"http://{proxy.address}",
            "--health-interval", "0.1", "--fall", "1",
        )  # fmt: skip
        for _ in range(int(IO_TIMEOUT / 0.02)):
            if downs:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        [down] = downs
        self.assertIn("HTTP 403 Forbidden", down["reason"])


@on_planes(TWISTED_SPLICE, TWISTED_NO_SPLICE)
class ViaRelayTests(LoopbackTestCase):
    """A tunnel through a proxy is relayed like any other: with and without splice(2)."""

    def via_connect(self, backend: str, *args: str) -> Forwarder:
        """A forwarder to ``backend`` through tunnelkit's CONNECT mode."""
        proxy = Forwarder("--mode", "connect", "--allow-dest", "127.0.0.0/8")
        self.addCleanup(proxy.stop)
        return self.forward("--to", backend, "--via", f"http://{proxy.address}", *args)

    @inlineCallbacks
    def test_half_close_through_connect(self) -> Inline:
        """Through tunnelkit's CONNECT mode, a payload and its echo pass intact around a half-close."""
        backend = self.serve(hashing_echo)
        fwd = self.via_connect(backend.address)
        sent, echoed, size = yield deferToThread(echoes_half_closed, fwd.address)
        self.assertEqual((echoed, size), (sent, str(PAYLOAD)))
        self.assertEqual((yield deferToThread(backend.outcome)), sent)
        records = yield fwd.closed(2)
        [ours] = [r for r in records if r.get("mode") != "connect"]
        # The proxy's connection is the backend leg's own socket: splice(2) takes it.
        self.assertEqual(ours.get("spliced", False), self.plane is TWISTED_SPLICE)

    @inlineCallbacks
    def test_backpressure(self) -> Inline:
        """A client that reads nothing stops the backend behind the proxy; then every byte arrives intact."""
        bulk = BulkSender()
        backend = self.serve(bulk)
        fwd = self.via_connect(backend.address)
        size = 128 * MiB  # far beyond what the kernels and both proxies buffer (18-36 MiB here)

        def stall_then_read() -> tuple[int, int, str]:
            with connect(fwd.address) as sock:
                sock.sendall(b"%d\n" % size)
                stalled_at = bulk.wait_stalled(size)
                received, digest = 0, hashlib.sha256()
                while chunk := sock.recv(MiB):
                    received += len(chunk)
                    digest.update(chunk)
            return stalled_at, received, digest.hexdigest()

        stalled_at, received, digest = yield deferToThread(stall_then_read)
        self.assertLess(
            stalled_at, size, "the backend sent everything to a reader that read nothing"
        )
        self.assertEqual((received, digest), (size, (yield deferToThread(backend.outcome))))
