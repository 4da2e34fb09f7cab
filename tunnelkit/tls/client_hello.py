"""A TLS ClientHello read from a client's first bytes: the server name and the ALPN offer.

SNI routing (``--mode sni``) must choose a backend before a single byte goes
anywhere, without terminating TLS: it reads the client's first flight, finds
the ``server_name`` (RFC 6066) and ``application_layer_protocol_negotiation``
(RFC 7301) extensions, and relays the bytes untouched, so the client
verifies the backend's own certificate.

:class:`ClientHelloParser` is fed the bytes as they come, in any chunking, and
gives the same outcome for the same bytes however they were split: ``None``
(more is needed), a :class:`ClientHello`, or a :class:`HelloError`. The
ClientHello may span any number of TLS records (each at most 2**14 bytes, as
RFC 8446 5.1 says) and segments; what it may take in all is bounded
(:data:`MAX_HELLO`, HAProxy's default buffer), so a client cannot make the
proxy hold more. Parsing is strict (every length must agree with its
container, no extension twice, a host name of letters, digits, ``-``,
``_`` and dots) and never raises on hostile input: a malformed hello is an
error outcome with a fixed reason. The parser imports nothing from the
reactor.
"""

from __future__ import annotations

import re
import struct

import attrs

#: Most bytes of the first flight read for a ClientHello, record headers
#: included (HAProxy reads ``req.ssl_sni`` from one 16 KiB buffer). A
#: browser's hello, post-quantum key share included, is under 2 KiB.
MAX_HELLO = 16384

#: The largest TLSPlaintext fragment (RFC 8446 5.1).
MAX_RECORD = 16384

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_ALPN = 16
_HOST_NAME = 0
_RECORD_HEADER = 5
_EXTENSION_HEADER = struct.Struct("!HH")  # type, length
_MESSAGE_HEADER = 4

#: Alert descriptions (RFC 8446 6.2) a refusal may send before closing.
DECODE_ERROR = 50
INTERNAL_ERROR = 80
UNRECOGNIZED_NAME = 112

#: A host name as it may appear in SNI: LDH labels (and ``_``, which some
#: internal names use), dot-separated; a trailing dot is tolerated here and
#: dropped when routing.
_NAME = re.compile(rb"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")


@attrs.frozen
class ClientHello:
    """What routing needs from a ClientHello."""

    #: The ``host_name`` of the ``server_name`` extension, as sent; ``None`` without one.
    server_name: str | None
    #: The ALPN protocols offered, in the client's order; empty without the extension.
    alpn: tuple[bytes, ...]
    #: Bytes of the records that carried it (what follows belongs to later messages).
    size: int


@attrs.frozen
class HelloError:
    """Why the first bytes are not a ClientHello that can be routed."""

    reason: str
    #: The TLS alert to send the client before closing; ``None``: the bytes
    #: are not TLS, or too big to judge, and a plain close says enough.
    alert: int | None = DECODE_ERROR


class _Malformed(Exception):
    """Raised inside the parser only; :meth:`ClientHelloParser.feed` turns it into a HelloError."""

    def __init__(self, reason: str, alert: int | None = DECODE_ERROR) -> None:
        super().__init__(reason)
        self.error = HelloError(reason, alert)


class ClientHelloParser:
    """Reads one ClientHello from the client's first bytes, fed in any chunking.

    Once it has given an outcome it keeps giving that outcome and ignores
    further bytes.
    """

    def __init__(self, limit: int = MAX_HELLO) -> None:
        self.limit = limit
        #: Bytes of the record being read (its header first).
        self._record = bytearray()
        #: The handshake message, gathered from the records' fragments.
        self._message = bytearray()
        #: Bytes of the complete records read so far.
        self._consumed = 0
        self._outcome: ClientHello | HelloError | None = None

    def feed(self, data: bytes) -> ClientHello | HelloError | None:
        """Take the next bytes; the outcome once there is one, else ``None``."""
        if self._outcome is not None or not data:
            return self._outcome
        try:
            self._outcome = self._read(memoryview(data))
        except _Malformed as e:
            self._outcome = e.error
        return self._outcome

    def _read(self, data: memoryview) -> ClientHello | None:
        at = 0
        while at < len(data):
            needed = _RECORD_HEADER - len(self._record)
            if needed > 0:
                self._record += data[at : at + needed]
                at += min(needed, len(data) - at)
                self._check_header()
                continue
            needed = _RECORD_HEADER + self._record_length() - len(self._record)
            self._record += data[at : at + needed]
            at += min(needed, len(data) - at)
            if len(self._record) == _RECORD_HEADER + self._record_length():
                hello = self._record_done()
                if hello is not None:
                    return hello
        return None

    def _record_length(self) -> int:
        return int.from_bytes(self._record[3:5], "big")

    def _check_header(self) -> None:
        """Judge the record header as far as it has come (so garbage fails at its first byte)."""
        header = self._record
        if header[0] != _HANDSHAKE:
            if self._consumed == 0:
                raise _Malformed(f"not a TLS handshake (first byte 0x{header[0]:02x})", None)
            raise _Malformed(f"a record of type {header[0]} inside the ClientHello")
        if len(header) > 1 and header[1] != 3:
            if self._consumed == 0:
                raise _Malformed(f"not a TLS record (version byte 0x{header[1]:02x})", None)
            raise _Malformed(f"a record of version {header[1]}.{header[2:3].hex()}")
        if len(header) < _RECORD_HEADER:
            return
        length = self._record_length()
        if length == 0:
            raise _Malformed("an empty handshake record")
        if length > MAX_RECORD:
            raise _Malformed(f"a record of {length} bytes (at most {MAX_RECORD})")
        if self._consumed + _RECORD_HEADER + length > self.limit:
            raise self._too_big()

    def _too_big(self) -> _Malformed:
        return _Malformed(f"the ClientHello takes more than {self.limit} bytes", None)

    def _record_done(self) -> ClientHello | None:
        self._message += self._record[_RECORD_HEADER:]
        self._consumed += len(self._record)
        self._record.clear()
        message = self._message
        if len(message) < _MESSAGE_HEADER:
            return None
        if message[0] != _CLIENT_HELLO:
            raise _Malformed(f"handshake message {message[0]} where a ClientHello must be")
        length = int.from_bytes(message[1:4], "big")
        if _MESSAGE_HEADER + length + _RECORD_HEADER > self.limit:
            raise self._too_big()
        end = _MESSAGE_HEADER + length
        if len(message) < end:
            return None
        if len(message) > end:
            raise _Malformed("bytes after the ClientHello in its record")
        name, alpn = _hello_body(memoryview(message)[_MESSAGE_HEADER:end])
        return ClientHello(name, alpn, self._consumed)


class _Reader:
    """Bounds-checked reads from one length-delimited part of the hello."""

    def __init__(self, data: memoryview, what: str) -> None:
        self.data = data
        self.what = what
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, size: int) -> memoryview:
        if size > self.left:
            raise _Malformed(f"{self.what} cut short")
        part = self.data[self.at : self.at + size]
        self.at += size
        return part

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        """The next ``<length><bytes>`` as a reader of its own."""
        return _Reader(self.take(self.number(length_size)), what)

    def end(self) -> None:
        if self.left:
            raise _Malformed(f"{self.left} bytes left over in {self.what}")


def _hello_body(body: memoryview) -> tuple[str | None, tuple[bytes, ...]]:
    """The server name and ALPN offer of a ClientHello body (RFC 8446 4.1.2)."""
    hello = _Reader(body, "the ClientHello")
    version = hello.number(2)
    if version >> 8 != 3:
        raise _Malformed(f"ClientHello version 0x{version:04x}")
    hello.take(32)  # random
    if hello.vector(1, "the session id").left > 32:
        raise _Malformed("a session id longer than 32 bytes")
    suites = hello.vector(2, "the cipher suites").left
    if suites == 0 or suites % 2:
        raise _Malformed(f"cipher suites of {suites} bytes")
    if hello.vector(1, "the compression methods").left == 0:
        raise _Malformed("no compression method")
    if not hello.left:
        return None, ()  # no extensions at all (TLS 1.2 allows it)
    extensions = hello.vector(2, "the extensions")
    hello.end()
    return _extensions(extensions)


def _extensions(extensions: _Reader) -> tuple[str | None, tuple[bytes, ...]]:
    """The server name and ALPN offer among the extensions.

    Walked by offset: a browser's hello has some twenty extensions and two
    matter here (a reader per extension made parsing three times slower).
    """
    data, at, end = extensions.data, 0, len(extensions.data)
    seen: set[int] = set()
    name: str | None = None
    alpn: tuple[bytes, ...] = ()
    while at < end:
        if end - at < _EXTENSION_HEADER.size:
            raise _Malformed("the extensions cut short")
        kind, length = _EXTENSION_HEADER.unpack_from(data, at)
        if kind in seen:
            raise _Malformed(f"extension {kind} twice")
        seen.add(kind)
        at += _EXTENSION_HEADER.size
        if length > end - at:
            raise _Malformed("the extensions cut short")
        if kind == _SERVER_NAME:
            name = _server_name(_Reader(data[at : at + length], f"extension {kind}"))
        elif kind == _ALPN:
            alpn = _alpn(_Reader(data[at : at + length], f"extension {kind}"))
        at += length
    return name, alpn


def _server_name(extension: _Reader) -> str | None:
    """The ``host_name`` of a ``server_name`` extension (RFC 6066 3)."""
    names = extension.vector(2, "the server name list")
    extension.end()
    if not names.left:
        raise _Malformed("an empty server name list")
    host: str | None = None
    while names.left:
        kind = names.number(1)
        name = bytes(names.vector(2, "a server name").data)
        if kind != _HOST_NAME:
            continue  # no other name type is defined; a server ignores it
        if host is not None:
            raise _Malformed("two host names in the server name list")
        if len(name) > 254 or not _NAME.fullmatch(name):
            raise _Malformed(f"server name {name[:64]!r} is not a host name")
        host = name.decode("ascii")
    return host


def _alpn(extension: _Reader) -> tuple[bytes, ...]:
    """The protocol names of an ALPN extension (RFC 7301 3.1)."""
    protocols = extension.vector(2, "the ALPN list")
    extension.end()
    if not protocols.left:
        raise _Malformed("an empty ALPN list")
    offered = []
    while protocols.left:
        protocol = bytes(protocols.vector(1, "an ALPN protocol").data)
        if not protocol:
            raise _Malformed("an empty ALPN protocol name")
        offered.append(protocol)
    return tuple(offered)
