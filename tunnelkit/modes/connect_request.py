"""Incremental parser for the head of an HTTP CONNECT request.

A CONNECT proxy reads a request head, answers it, and from then on relays raw
bytes. Two classic bugs live at that boundary, and this module exists to rule
them out without a reactor in sight:

* **Lost or duplicated pipelined bytes.** A client may send its TLS
  ClientHello in the same segment as the header. :meth:`ConnectRequestParser.feed`
  returns every byte after the blank line in :attr:`ConnectRequest.rest`,
  exactly once, whatever the chunking (Go's Hijack/bufio bug class).
* **Lenient parsing.** Request smuggling lives in the gaps between parsers, so
  the grammar is strict: CRLF only (no bare CR or LF), no NUL or other control
  bytes, no obs-fold, no whitespace before the colon, no ``Content-Length`` or
  ``Transfer-Encoding`` (a CONNECT request has no body), one ``Host`` at most,
  single spaces in the request line, authority form only.

Memory stays bounded: only the current incomplete line is kept between calls,
and a limit is enforced as soon as the bytes seen prove it crossed, before the
line ends. The outcome depends only on the bytes, never on how they were split:
each problem is found at the earliest byte that proves it.

Status codes: 400 for grammar errors; 405 with ``Allow: CONNECT`` for any other
method; 505 for an HTTP version other than 1.0 and 1.1; 414 for a request line
over the limit (RFC 9112 section 3 says a too-long request-target MUST get 414,
and nginx does the same); 431 (RFC 6585, as Squid answers) for a header
section over its byte or field-count limit.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from http import HTTPStatus

import attrs

#: Header fields in arrival order: names as sent (ASCII), values decoded as
#: Latin-1 (so obs-text survives) with surrounding spaces and tabs removed.
Headers = tuple[tuple[str, str], ...]

DEFAULT_MAX_REQUEST_LINE = 8192
DEFAULT_MAX_HEADER_BYTES = 16384
DEFAULT_MAX_HEADERS = 100

_CR = 0x0D
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# Field values: VCHAR, obs-text, SP and HTAB; every other control byte is refused.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_NUL_OR_CR = re.compile(rb"[\x00\r]")
# Ports are 1 to 5 digits with no sign and no leading zero: one spelling per port.
_PORT = rb"(?P<port>[1-9][0-9]{0,4})"
_V6_HOST = rb"\[(?P<v6>[0-9A-Fa-f:.]+)\]"
_NAME_HOST = rb"(?P<name>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?)"
_AUTHORITY = re.compile(rb"(?:" + _V6_HOST + rb"|" + _NAME_HOST + rb"):" + _PORT)
_HOST_FIELD = re.compile(rb"(?:" + _V6_HOST + rb"|" + _NAME_HOST + rb")(?::" + _PORT + rb")?")
_BASIC = re.compile(r"([A-Za-z]+) +([A-Za-z0-9+/]+=*)")


class Reason(enum.StrEnum):
    """Why a request head was refused: fixed text, safe to log and never echoing input."""

    EMPTY_REQUEST_LINE = "empty request line"
    BAD_REQUEST_LINE = "malformed request line"
    BAD_METHOD = "invalid method"
    BAD_VERSION = "malformed HTTP version"
    UNSUPPORTED_VERSION = "unsupported HTTP version"
    METHOD_NOT_ALLOWED = "method not allowed"
    BAD_AUTHORITY = "request target is not host:port"
    NUL = "NUL byte"
    BARE_CR = "bare CR"
    BARE_LF = "bare LF"
    OBS_FOLD = "obs-fold header line"
    NO_COLON = "header line without colon"
    BAD_HEADER_NAME = "invalid header name"
    SPACE_BEFORE_COLON = "whitespace before colon"
    BAD_HEADER_VALUE = "invalid header value"
    BODY_FRAMING = "Content-Length or Transfer-Encoding on CONNECT"
    DUPLICATE_HOST = "more than one Host header"
    BAD_HOST = "invalid Host header"
    REQUEST_LINE_TOO_LONG = "request line too long"
    HEADERS_TOO_LARGE = "header section too large"
    TOO_MANY_HEADERS = "too many header fields"


@attrs.frozen
class RequestError:
    """A request head that must be answered with ``status`` and then a close.

    ``headers`` are the extra response headers the status needs (``Allow`` for
    405). Nothing here comes from the request, so a response built from it can
    never reflect the client's bytes.
    """

    status: int
    reason: Reason
    headers: Headers = ()

    @property
    def phrase(self) -> str:
        """The standard reason phrase for :attr:`status`."""
        return HTTPStatus(self.status).phrase


def _redact(headers: Headers) -> str:
    shown = [(n, "<redacted>" if n.lower() == "proxy-authorization" else v) for n, v in headers]
    return repr(tuple(shown))


@attrs.frozen
class ConnectRequest:
    """A well-formed CONNECT request head.

    ``host`` is the authority's host as sent (an IPv6 literal without its
    brackets): it is not yet checked against any policy. ``rest`` holds the
    bytes that followed the blank line in the last chunk fed; they belong to the
    tunnel and must reach the target exactly once. The repr hides
    ``Proxy-Authorization`` values and the content of ``rest``.
    """

    method: str
    host: str
    port: int
    version: str
    headers: Headers = attrs.field(repr=_redact)
    rest: bytes = attrs.field(repr=lambda rest: f"<{len(rest)} bytes>")

    @property
    def authority(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def header_values(self, name: str) -> list[str]:
        """Values of every field called ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for field, value in self.headers if field.lower() == wanted]


@attrs.frozen
class BasicCredentials:
    """A user name and password from ``Proxy-Authorization: Basic``; the repr hides the password."""

    user: str
    password: str = attrs.field(repr=False)


def _parse_authority(target: bytes, pattern: re.Pattern[bytes]) -> tuple[str, int | None] | None:
    """Host and port of ``host:port`` or ``[v6]:port``; ``None`` if malformed."""
    m = pattern.fullmatch(target)
    if m is None:
        return None
    if m["v6"] is not None:
        host = m["v6"].decode("ascii")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host = m["name"].decode("ascii")
        labels = host.removesuffix(".").split(".")
        if len(host.removesuffix(".")) > 253 or any(len(label) > 63 for label in labels):
            return None
    port = None if m["port"] is None else int(m["port"])
    if port is not None and port > 65535:
        return None
    return host, port


class _Refused(Exception):
    """Raised inside the parser to stop at the first problem; never escapes :meth:`feed`."""

    def __init__(self, status: int, reason: Reason, headers: Headers = ()) -> None:
        super().__init__(reason)
        self.error = RequestError(status, reason, headers)


class ConnectRequestParser:
    """Parse one CONNECT request head from bytes in any chunking.

    Call :meth:`feed` with each chunk read from the client until it returns a
    :class:`ConnectRequest` or a :class:`RequestError`; feeding more after that
    is a bug and raises :class:`RuntimeError`. Between calls the parser holds at
    most one incomplete line, which a limit keeps below
    ``max(max_request_line, max_header_bytes) + 1`` bytes; during a call it
    holds that plus the chunk.

    ``max_request_line`` bounds the request line without its CRLF;
    ``max_header_bytes`` bounds the header section after it (each field line
    with its CRLF, plus the final CRLF); ``max_headers`` bounds the number of
    field lines.
    """

    def __init__(
        self,
        *,
        max_request_line: int = DEFAULT_MAX_REQUEST_LINE,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        if min(max_request_line, max_header_bytes, max_headers) < 1:
            raise ValueError("parser limits must be positive")
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self._buf = bytearray()
        self._scanned = 0  # bytes of the current line already checked for NUL and bare CR
        self._target: tuple[str, int, str] | None = None  # host, port, version
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._seen_host = False
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held for the current incomplete line (the parser's whole buffer)."""
        return len(self._buf)

    def feed(self, data: bytes) -> ConnectRequest | RequestError | None:
        """Add ``data``; return the outcome once the head is complete or invalid, else ``None``."""
        if self._done:
            raise RuntimeError("feed() called after the request head was complete")
        self._buf += data
        result: ConnectRequest | RequestError | None
        try:
            result = self._parse()
        except _Refused as refused:
            result = refused.error
        if result is not None:
            self._done = True
            self._buf = bytearray()
        return result

    def _parse(self) -> ConnectRequest | None:
        while self._target is None:
            line = self._take_line(self.max_request_line, 414, Reason.REQUEST_LINE_TOO_LONG)
            if line is None:
                return None
            self._target = self._request_line(line)
        while True:
            budget = self.max_header_bytes - self._header_bytes - 2
            line = self._take_line(budget, 431, Reason.HEADERS_TOO_LARGE)
            if line is None:
                return None
            if not line:
                host, port, version = self._target
                rest = bytes(self._buf)
                return ConnectRequest("CONNECT", host, port, version, tuple(self._headers), rest)
            self._header_bytes += len(line) + 2
            self._header_line(line)

    def _take_line(self, allowed: int, status: int, too_long: Reason) -> bytes | None:
        """Remove and return the next complete line without its CRLF, or refuse it.

        A line whose content exceeds ``allowed`` bytes is refused with
        ``status`` and ``too_long`` as soon as that is certain. Each problem is
        placed at the first byte that proves it and the earliest wins (a byte
        problem on a tie), so the answer does not depend on the chunking.
        """
        buf = self._buf
        if not buf:
            return None
        lf = buf.find(b"\n", self._scanned)
        complete = lf != -1
        end = lf if complete else len(buf)
        ends_with_cr = end > 0 and buf[end - 1] == _CR
        content = end - 1 if ends_with_cr else end
        byte_problem: tuple[int, Reason] | None = None
        # Any CR before ``content`` is followed by something other than LF.
        m = _NUL_OR_CR.search(buf, self._scanned, content)
        if m is not None:
            byte_problem = (m.start(), Reason.NUL if buf[m.start()] == 0 else Reason.BARE_CR)
        elif complete and not ends_with_cr:
            byte_problem = (end, Reason.BARE_LF)
        if content > allowed:
            limit_at = max(allowed, 0)
            if byte_problem is None or byte_problem[0] > limit_at:
                raise _Refused(status, too_long)
        if byte_problem is not None:
            raise _Refused(400, byte_problem[1])
        if not complete:
            self._scanned = content
            return None
        line = bytes(buf[:content])
        del buf[: end + 1]
        self._scanned = 0
        return line

    def _request_line(self, line: bytes) -> tuple[str, int, str]:
        """``(host, port, version)`` of a CONNECT request line, or refuse it."""
        if not line:
            raise _Refused(400, Reason.EMPTY_REQUEST_LINE)
        parts = line.split(b" ")
        if len(parts) != 3:
            raise _Refused(400, Reason.BAD_REQUEST_LINE)
        method, target, version = parts
        if not _TOKEN.fullmatch(method):
            raise _Refused(400, Reason.BAD_METHOD)
        if not _VERSION.fullmatch(version):
            raise _Refused(400, Reason.BAD_VERSION)
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _Refused(505, Reason.UNSUPPORTED_VERSION)
        if method != b"CONNECT":
            raise _Refused(405, Reason.METHOD_NOT_ALLOWED, (("Allow", "CONNECT"),))
        authority = _parse_authority(target, _AUTHORITY)
        if authority is None or authority[1] is None:
            raise _Refused(400, Reason.BAD_AUTHORITY)
        return authority[0], authority[1], version.decode("ascii")

    def _header_line(self, line: bytes) -> None:
        """Record one field line, or refuse it."""
        if len(self._headers) >= self.max_headers:
            raise _Refused(431, Reason.TOO_MANY_HEADERS)
        if line[:1] in (b" ", b"\t"):
            raise _Refused(400, Reason.OBS_FOLD)
        name, colon, value = line.partition(b":")
        if not colon:
            raise _Refused(400, Reason.NO_COLON)
        if name[-1:] in (b" ", b"\t"):
            raise _Refused(400, Reason.SPACE_BEFORE_COLON)
        if not _TOKEN.fullmatch(name):
            raise _Refused(400, Reason.BAD_HEADER_NAME)
        value = value.strip(b" \t")
        if _BAD_VALUE_BYTE.search(value):
            raise _Refused(400, Reason.BAD_HEADER_VALUE)
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            raise _Refused(400, Reason.BODY_FRAMING)
        if lowered == b"host":
            # RFC 9112 section 3.2: more than one Host, or an invalid one, is a 400.
            if self._seen_host:
                raise _Refused(400, Reason.DUPLICATE_HOST)
            if _parse_authority(value, _HOST_FIELD) is None:
                raise _Refused(400, Reason.BAD_HOST)
            self._seen_host = True
        self._headers.append((name.decode("ascii"), value.decode("latin-1")))


def _basic_token(headers: Headers) -> str | None:
    """The token68 of the one ``Proxy-Authorization: Basic`` field, if exactly one exists."""
    values = [value for name, value in headers if name.lower() == "proxy-authorization"]
    m = _BASIC.fullmatch(values[0]) if len(values) == 1 else None
    return m[2] if m is not None and m[1].lower() == "basic" else None


def _strict_b64decode(token: str) -> bytes | None:
    """Decode canonical base64 only: right alphabet, padding and zero trailing bits."""
    try:
        raw = base64.b64decode(token, validate=True)
    except binascii.Error:
        return None
    return raw if base64.b64encode(raw).decode("ascii") == token else None


def proxy_credentials(headers: Headers) -> BasicCredentials | None:
    """The Basic credentials in ``Proxy-Authorization``, or ``None`` if unusable.

    Anything doubtful counts as missing, so the caller answers 407: no field or
    more than one, another scheme, base64 that is not canonical (bad alphabet,
    padding or trailing bits), text that is not UTF-8, no colon, an empty user
    name, or control characters (RFC 7617 section 2).
    """
    token = _basic_token(headers)
    raw = None if token is None else _strict_b64decode(token)
    try:
        text = None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        return None
    user, colon, password = text.partition(":")
    return BasicCredentials(user, password) if colon and user else None
