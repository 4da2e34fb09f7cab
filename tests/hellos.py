"""ClientHellos for SNI tests: real ones from Python's ssl, and crafted ones, field by field."""

from __future__ import annotations

import contextlib
import os
import ssl
import struct


def real_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a Python ``ssl`` client (OpenSSL's ClientHello, TLS 1.3 key shares)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def vector(length_size: int, data: bytes) -> bytes:
    """``data`` after its length in ``length_size`` bytes."""
    return len(data).to_bytes(length_size, "big") + data


def sni_extension(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    """A ``server_name`` extension listing ``names``."""
    entries = b"".join(bytes([name_type]) + vector(2, name) for name in names)
    return 0, vector(2, entries)


def alpn_extension(*protocols: bytes) -> tuple[int, bytes]:
    """An ALPN extension offering ``protocols``."""
    return 16, vector(2, b"".join(vector(1, protocol) for protocol in protocols))


def hello_body(
    extensions: list[tuple[int, bytes]] | None,
    *,
    version: int = 0x0303,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello message body; ``extensions=None`` leaves the extensions block out."""
    body = struct.pack("!H", version) + os.urandom(32)
    body += vector(1, session_id) + vector(2, suites) + vector(1, compression)
    if extensions is not None:
        body += vector(
            2, b"".join(struct.pack("!H", kind) + vector(2, d) for kind, d in extensions)
        )
    return body


def handshake(body: bytes, kind: int = 1) -> bytes:
    """A handshake message of ``kind`` (1: ClientHello) around ``body``."""
    return bytes([kind]) + vector(3, body)


def records(message: bytes, size: int = 16384, version: bytes = b"\x03\x01") -> bytes:
    """``message`` cut into handshake records of at most ``size`` bytes."""
    return b"".join(
        b"\x16" + version + vector(2, message[at : at + size])
        for at in range(0, len(message), size)
    )


def crafted(extensions: list[tuple[int, bytes]] | None, **fields: object) -> bytes:
    """A ClientHello in one record."""
    return records(handshake(hello_body(extensions, **fields)))  # type: ignore[arg-type]
