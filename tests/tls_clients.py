"""TLS peers for end-to-end tests: Python ``ssl`` clients and threaded TLS backends.

Clients are blocking :class:`ssl.SSLSocket` objects, or, where a test needs
to drive both directions at once or to choose exactly how it stops writing
(close_notify, TCP FIN, or both), an :class:`ssl.SSLObject` over memory BIOs
pumped by one thread with a selector. Every socket operation has a timeout and
every loop a bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from certs import Pair
from loopback import IO_TIMEOUT, MiB, ThreadedServer, connect

#: Most bytes buffered towards the socket before the pump stops producing more.
_HIGH_WATER = MiB
_CHUNK = 256 * 1024


# -- contexts ---------------------------------------------------------------


def client_context(
    ca: Path | None = None,
    *,
    cert: Pair | None = None,
    alpn: list[str] | None = None,
    check_hostname: bool = True,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting ``ca`` (or nothing checked when ``ca`` is None)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.check_hostname = check_hostname
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def server_context(
    pair: Pair, *, client_ca: Path | None = None, sni_seen: list[str | None] | None = None
) -> ssl.SSLContext:
    """A server context for ``pair``; records each client's SNI name in ``sni_seen``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    if sni_seen is not None:
        seen = sni_seen

        def record(sslobj: Any, name: str | None, context: ssl.SSLContext) -> None:
            seen.append(name)

        ctx.sni_callback = record
    return ctx


def der_sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def leaf_der(pair: Pair) -> bytes:
    """The DER form of the first (leaf) certificate of ``pair.cert``."""
    pem = pair.cert.read_text()
    end = "-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(pem[: pem.index(end) + len(end)])


# -- blocking clients ---------------------------------------------------------


def tls_connect(
    address: str, ctx: ssl.SSLContext, server_hostname: str | None, timeout: float = IO_TIMEOUT
) -> ssl.SSLSocket:
    """A TCP connection to ``address`` with a completed TLS handshake (raises if it fails)."""
    sock = connect(address, timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


def served_certificate(address: str, ctx: ssl.SSLContext, server_hostname: str | None) -> bytes:
    """The DER certificate the server presents for ``server_hostname``."""
    with tls_connect(address, ctx, server_hostname) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def tls_ping(address: str, ctx: ssl.SSLContext, server_hostname: str | None) -> ssl.SSLSocket:
    """Connect, handshake and see 4 random bytes come back from an echo backend."""
    tls = tls_connect(address, ctx, server_hostname)
    try:
        token = os.urandom(4)
        tls.sendall(token)
        got = b""
        while len(got) < 4 and (chunk := tls.recv(4 - len(got))):
            got += chunk
        assert got == token, f"echo returned {got!r}, expected {token!r}"
    except BaseException:
        tls.close()
        raise
    return tls


def refused(
    address: str, ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[bool, BaseException | None]:
    """Whether a connection that handshakes and echoes a byte fails; and how it failed.

    With TLS 1.3 a server's refusal of the client's certificate reaches the
    client only after its own handshake completed, so the refusal may show on
    the first read. A connection that echoes is *not* refused.
    """
    try:
        tls = tls_connect(address, ctx, server_hostname)
    except (ssl.SSLError, OSError) as e:
        return True, e
    with tls:
        try:
            tls.sendall(b"x")
            data = tls.recv(1)
        except (ssl.SSLError, OSError) as e:
            return True, e
        return data != b"x", None


# -- a one-thread full-duplex client ----------------------------------------

#: SSL_KEY_UPDATE_REQUESTED: the peer must answer with a KeyUpdate of its own.
_KEY_UPDATE_REQUESTED = 1


def request_key_update(tls: ssl.SSLObject) -> None:
    """Queue a TLS 1.3 KeyUpdate that asks for the peer's (sent by the next write or handshake call).

    Python's ssl has no call for it: this calls ``SSL_key_update`` of the
    libssl Python's ssl module links, on the ``SSL *`` of its
    ``_ssl._SSLSocket`` (checked: OpenSSL must name its protocol TLSv1.3).
    """
    libssl = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
    libssl.SSL_get_version.restype = ctypes.c_char_p
    libssl.SSL_get_version.argtypes = [ctypes.c_void_p]
    libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    inner = tls._sslobj  # type: ignore[attr-defined]
    # After ob_refcnt, ob_type and the socket weak reference (CPython's PySSLSocket).
    pointer = ctypes.c_void_p.from_address(id(inner) + 3 * ctypes.sizeof(ctypes.c_void_p))
    assert libssl.SSL_get_version(pointer.value) == b"TLSv1.3", "not the SSL * of a TLS 1.3 client"
    assert libssl.SSL_key_update(pointer.value, _KEY_UPDATE_REQUESTED) == 1, "SSL_key_update failed"


class Pump:
    """One TLS connection driven over memory BIOs: it writes, stops writing as asked, and reads.

    ``finish`` says how the client ends its direction once the payload is
    written: ``"close_notify+fin"`` (close_notify, then TCP FIN),
    ``"close_notify"`` (close_notify only, the TCP write side stays open) or
    ``"fin"`` (a TCP FIN with no close_notify).
    """

    def __init__(
        self,
        address: str,
        ctx: ssl.SSLContext,
        server_hostname: str | None,
        finish: str = "close_notify+fin",
    ) -> None:
        assert finish in ("close_notify+fin", "close_notify", "fin")
        self.finish = finish
        self.sock = connect(address)
        self.sock.setblocking(False)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        self.handshaken = False
        self.to_socket = bytearray()
        self.digest = hashlib.sha256()
        self.received = 0
        #: How the server's direction ended: "close_notify" or "fin" (TCP EOF without it).
        self.peer_end: str | None = None
        self.tcp_eof = False
        self.fin_sent = False
        self.written_all_at: int | None = None
        self._payload = b""
        self._offset = 0
        self._finished = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Pump:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_tls(self) -> None:
        for _ in range(10_000):
            try:
                data = self.tls.read(_CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.peer_end = "close_notify"
                return
            except ssl.SSLEOFError:
                self.peer_end = "fin"
                return
            if not data:
                self.peer_end = "close_notify"
                return
            self.digest.update(data)
            self.received += len(data)

    def stall_then_update_keys(self, seconds: float, updates: int) -> None:
        """Handshake, read nothing for ``seconds``, then send ``updates`` KeyUpdates asking for the server's."""
        deadline = time.monotonic() + IO_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while not self.handshaken:
                try:
                    self.tls.do_handshake()
                    self.handshaken = True
                except ssl.SSLWantReadError:
                    pass
                self._flush()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no TLS handshake")
                if not self.handshaken:
                    self._wait(selector, remaining)
        time.sleep(seconds)
        for _ in range(updates):
            request_key_update(self.tls)
            self.tls.do_handshake()  # writes the KeyUpdate
            self._flush()

    def run(self, payload: bytes, timeout: float = 60.0) -> None:
        """Send ``payload``, end the client's direction, read until the server's ends."""
        self._payload = payload
        self._offset = 0
        self._finished = False
        deadline = time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        try:
            while True:
                self._produce()
                self._flush()
                if self._finished and not self.to_socket and (self.peer_end or self.tcp_eof):
                    if self.peer_end is None:
                        self.peer_end = "fin"
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"TLS exchange not done in {timeout:g} s: sent {self._offset} of "
                        f"{len(payload)} B, received {self.received} B"
                    )
                self._wait(selector, remaining)
                if self.tcp_eof and not self.handshaken:
                    self.tls.do_handshake()  # raises the handshake's failure
        finally:
            selector.close()

    def _produce(self) -> None:
        """Handshake, encrypt more of the payload, end our direction when done, decrypt."""
        if not self.handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            self.handshaken = True
        payload = self._payload
        while self._offset < len(payload) and len(self.to_socket) < _HIGH_WATER:
            self._offset += self.tls.write(payload[self._offset : self._offset + _CHUNK])
            self.to_socket += self.outgoing.read()
        if self._offset == len(payload) and not self._finished:
            self._finished = True
            self.written_all_at = self.received
            if self.finish != "fin":
                # unwrap() calls SSL_shutdown twice, the second time reading: decrypt
                # what has come first, or it would count as data after our close_notify.
                if self.peer_end is None:
                    self._read_tls()
                with contextlib.suppress(ssl.SSLWantReadError):
                    self.tls.unwrap()
        if self.peer_end is None:
            self._read_tls()

    def _flush(self) -> None:
        """Send what is encrypted; then the TCP FIN when it is due."""
        self.to_socket += self.outgoing.read()
        while self.to_socket:
            try:
                sent = self.sock.send(self.to_socket)
            except BlockingIOError:
                break
            del self.to_socket[:sent]
        fin_due = self._finished and self.finish != "close_notify"
        if fin_due and not self.to_socket and not self.fin_sent:
            self.sock.shutdown(socket.SHUT_WR)
            self.fin_sent = True

    def _wait(self, selector: selectors.BaseSelector, remaining: float) -> None:
        """Wait (at most ``remaining`` s, and a second) until the socket can move data; move it in."""
        want = 0 if self.tcp_eof else selectors.EVENT_READ
        if self.to_socket:
            want |= selectors.EVENT_WRITE
        if not want:
            return
        selector.modify(self.sock, want)
        for _key, mask in selector.select(min(remaining, 1.0)):
            if mask & selectors.EVENT_READ:
                self._receive()

    def _receive(self) -> None:
        for _ in range(64):
            try:
                data = self.sock.recv(_CHUNK)
            except BlockingIOError:
                return
            if not data:
                self.tcp_eof = True
                self.incoming.write_eof()
                return
            self.incoming.write(data)


def tls_exchange(
    address: str,
    ctx: ssl.SSLContext,
    server_hostname: str | None,
    payload: bytes,
    *,
    finish: str = "close_notify+fin",
    timeout: float = 60.0,
) -> Pump:
    """Send ``payload`` and end the client's direction while reading all the server sends."""
    pump = Pump(address, ctx, server_hostname, finish)
    with pump:
        pump.run(payload, timeout)
    return pump


# -- TLS backends ------------------------------------------------------------


class TLSBackend:
    """A :class:`ThreadedServer` whose handler runs on a TLS connection made with ``ctx``.

    Handshake failures are kept in :attr:`failures` (and re-raised by
    :meth:`ThreadedServer.outcome`), the client's SNI names in :attr:`sni`,
    and its certificates in :attr:`peer_certs`.
    """

    def __init__(
        self,
        serve: Callable[..., ThreadedServer],
        pair: Pair,
        handler: Callable[[ssl.SSLSocket], Any],
        *,
        client_ca: Path | None = None,
    ) -> None:
        self.sni: list[str | None] = []
        self.ctx = server_context(pair, client_ca=client_ca, sni_seen=self.sni)
        self.handler = handler
        self.failures: list[BaseException] = []
        self.peer_certs: list[bytes | None] = []
        self.handshakes = 0
        self._lock = threading.Lock()
        self.server = serve(self._serve)
        self.address = self.server.address

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def _serve(self, conn: socket.socket) -> Any:
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except BaseException as e:
            with self._lock:
                self.failures.append(e)
            raise
        with self._lock:
            self.handshakes += 1
            self.peer_certs.append(tls.getpeercert(binary_form=True))
        return self.handler(tls)


def close_tls(tls: ssl.SSLSocket) -> None:
    """Send close_notify (if the connection still allows it), then a TCP FIN."""
    raw: socket.socket = tls
    with contextlib.suppress(ssl.SSLError, OSError, ValueError):
        raw = tls.unwrap()
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_WR)


def tls_echo(tls: ssl.SSLSocket) -> str:
    """Send back every byte until EOF, then close_notify and FIN; the SHA-256 of what came."""
    digest = hashlib.sha256()
    while data := tls.recv(_CHUNK):
        digest.update(data)
        tls.sendall(data)
    close_tls(tls)
    return digest.hexdigest()
