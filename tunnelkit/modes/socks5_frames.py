"""Incremental parser of a SOCKS5 client's negotiation, and the server's replies (RFC 1928, RFC 1929).

A SOCKS5 client speaks three frames before its bytes are relayed: the
greeting (the methods it offers), the username/password sub-negotiation when
that method is chosen, and the request. Many clients send them without
waiting for each answer, often with the first bytes for the target behind
the request. :class:`NegotiationParser` reads them from bytes in any
chunking, and promises, with no reactor in sight:

* **The outcome depends only on the bytes**, never on how they were split:
  the frames found and the first problem, each at the earliest byte that
  proves it.
* **Nothing after the request is lost or parsed**: it is handed back in
  :attr:`Request.rest`, once.
* **Bounded memory**: the parser keeps at most one incomplete frame (a
  greeting of 257 bytes, a sub-negotiation of 513, a request of 262) and
  stops at the request, after which the caller holds what follows.
* **No exception escapes** :meth:`NegotiationParser.feed` on any input: a
  problem is a :class:`FrameError` carrying the exact bytes to answer
  before the close (``05 FF``, ``01 01``, a reply with its code, or
  nothing), with a fixed reason that never echoes the client's bytes.

The method is chosen here, since it depends only on the greeting and on
whether the listener authenticates: with ``--auth-file`` only 0x02
(username/password) is ever chosen, without it only 0x00 (no
authentication); a greeting that offers neither gets ``05 FF``.
"""

from __future__ import annotations

import enum
import ipaddress

import attrs

VERSION = 5
#: RFC 1929's sub-negotiation version.
AUTH_VERSION = 1

NO_AUTHENTICATION = 0x00
USERNAME_PASSWORD = 0x02
NO_ACCEPTABLE_METHOD = 0xFF

CONNECT = 1

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The largest frame of each kind: what the parser may hold between calls.
MAX_GREETING = 2 + 255
MAX_CREDENTIALS = 3 + 255 + 255
MAX_REQUEST = 4 + 1 + 255 + 2


class Reply(enum.IntEnum):
    """The REP field of a SOCKS5 reply (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Reason(enum.StrEnum):
    """Why a negotiation was ended: fixed text, safe to log, never echoing the client."""

    NOT_SOCKS5 = "not a SOCKS5 greeting"
    NO_ACCEPTABLE_METHOD = "no acceptable authentication method offered"
    BAD_AUTH_VERSION = "username/password sub-negotiation of an unknown version"
    EMPTY_USER = "empty user name"
    CREDENTIALS_NOT_UTF8 = "user name or password is not UTF-8"
    BAD_REQUEST_VERSION = "request of another SOCKS version"
    UNSUPPORTED_COMMAND = "command not supported (only CONNECT)"
    BAD_RESERVED = "reserved byte of the request is not 0"
    UNSUPPORTED_ADDRESS_TYPE = "address type not supported"
    BAD_NAME = "domain name empty or not printable ASCII"
    PORT_ZERO = "target port 0"


def reply(code: Reply, bound: tuple[IPAddress, int] | None = None) -> bytes:
    """A reply frame; ``bound`` is BND.ADDR and BND.PORT (``0.0.0.0:0`` when not connected)."""
    address, port = bound or (ipaddress.IPv4Address(0), 0)
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes((VERSION, code, 0, atyp)) + address.packed + port.to_bytes(2, "big")


def method_selection(method: int) -> bytes:
    """The server's answer to the greeting."""
    return bytes((VERSION, method))


def auth_status(ok: bool) -> bytes:
    """The server's answer to the username/password sub-negotiation (RFC 1929)."""
    return bytes((AUTH_VERSION, 0 if ok else 1))


def select_method(offered: bytes, authenticates: bool) -> int:
    """The one method this listener accepts, if offered, else :data:`NO_ACCEPTABLE_METHOD`."""
    wanted = USERNAME_PASSWORD if authenticates else NO_AUTHENTICATION
    return wanted if wanted in offered else NO_ACCEPTABLE_METHOD


@attrs.frozen
class Greeting:
    """A greeting whose offer holds the listener's method: ``method`` is the one chosen."""

    method: int


@attrs.frozen
class Credentials:
    """RFC 1929 username and password; the repr hides the password."""

    user: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class Request:
    """A CONNECT request: the target as sent, not yet checked.

    ``host`` is an address in its standard text form (IPv6 without brackets)
    or the domain name as sent (printable ASCII). ``rest`` holds the bytes that
    followed the request in the chunk fed; they belong to the target and must
    reach it exactly once.
    """

    host: str
    port: int
    rest: bytes = attrs.field(repr=lambda rest: f"<{len(rest)} bytes>")

    @property
    def authority(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class FrameError:
    """A negotiation that ends: ``answer`` is sent (it may be empty), then the connection closes.

    ``reply`` is the reply code in ``answer`` when it is a reply to a request.
    """

    reason: Reason
    answer: bytes = b""
    reply: Reply | None = None


Frame = Greeting | Credentials | Request | FrameError


def _request_error(reason: Reason, code: Reply) -> FrameError:
    return FrameError(reason, reply(code), code)


class _Stop(Exception):
    """Raised inside the parser at the first problem; never escapes :meth:`NegotiationParser.feed`."""

    def __init__(self, error: FrameError) -> None:
        super().__init__(error.reason)
        self.error = error


class _Stage(enum.Enum):
    GREETING = "greeting"
    CREDENTIALS = "credentials"
    REQUEST = "request"
    DONE = "done"


class NegotiationParser:
    """Parse one client's greeting, sub-negotiation and request from bytes in any chunking.

    ``authenticates``: the listener requires username/password (only that
    method is chosen). Each :meth:`feed` returns the frames its bytes
    completed, in order; the list ends with the :class:`Request` or the
    first :class:`FrameError`, after which the parser is :attr:`done` and
    feeding it more is a bug (:class:`RuntimeError`).
    """

    def __init__(self, *, authenticates: bool) -> None:
        self.authenticates = authenticates
        self._stage = _Stage.GREETING
        self._buf = bytearray()

    @property
    def done(self) -> bool:
        """True once the request or a problem was returned."""
        return self._stage is _Stage.DONE

    @property
    def buffered(self) -> int:
        """Bytes held of the current incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; the frames it completed, in order (empty while a frame is incomplete)."""
        if self.done:
            raise RuntimeError("feed() called after the negotiation was over")
        self._buf += data
        frames: list[Frame] = []
        try:
            while not self.done:
                frame = self._next()
                if frame is None:
                    break
                frames.append(frame)
        except _Stop as stop:
            frames.append(stop.error)
            self._stage = _Stage.DONE
        if self.done:
            self._buf = bytearray()
        return frames

    def _next(self) -> Frame | None:
        if self._stage is _Stage.GREETING:
            return self._greeting()
        if self._stage is _Stage.CREDENTIALS:
            return self._credentials()
        return self._request()

    def _take(self, size: int) -> bytes:
        taken = bytes(self._buf[:size])
        del self._buf[:size]
        return taken

    def _greeting(self) -> Greeting | None:
        buf = self._buf
        if buf and buf[0] != VERSION:
            raise _Stop(FrameError(Reason.NOT_SOCKS5))
        if len(buf) < 2:
            return None
        if len(buf) < 2 + buf[1]:
            return None
        offered = self._take(2 + buf[1])[2:]
        method = select_method(offered, self.authenticates)
        if method == NO_ACCEPTABLE_METHOD:
            raise _Stop(FrameError(Reason.NO_ACCEPTABLE_METHOD, method_selection(method)))
        self._stage = _Stage.CREDENTIALS if method == USERNAME_PASSWORD else _Stage.REQUEST
        return Greeting(method)

    def _credentials(self) -> Credentials | None:
        buf = self._buf
        failed = auth_status(False)
        if buf and buf[0] != AUTH_VERSION:
            raise _Stop(FrameError(Reason.BAD_AUTH_VERSION, failed))
        if len(buf) > 1 and buf[1] == 0:
            raise _Stop(FrameError(Reason.EMPTY_USER, failed))
        if len(buf) < 2 or len(buf) < 3 + buf[1]:
            return None
        plen_at = 2 + buf[1]
        end = plen_at + 1 + buf[plen_at]
        if len(buf) < end:
            return None
        frame = self._take(end)
        try:
            user = frame[2:plen_at].decode("utf-8")
            password = frame[plen_at + 1 :].decode("utf-8")
        except UnicodeDecodeError:
            raise _Stop(FrameError(Reason.CREDENTIALS_NOT_UTF8, failed)) from None
        self._stage = _Stage.REQUEST
        return Credentials(user, password)

    def _request(self) -> Request | None:
        buf = self._buf
        checks = (
            (VERSION, Reason.BAD_REQUEST_VERSION),
            (CONNECT, Reason.UNSUPPORTED_COMMAND),
            (0, Reason.BAD_RESERVED),
        )
        for index, (expected, reason) in enumerate(checks[: len(buf)]):
            if buf[index] != expected:
                raise _Stop(self._bad_request(reason))
        if len(buf) < 4:
            return None
        atyp = buf[3]
        end = self._address_end(atyp)
        if end is None or len(buf) < end + 2:
            return None
        frame = self._take(end + 2)
        port = int.from_bytes(frame[end:], "big")
        if port == 0:
            raise _Stop(_request_error(Reason.PORT_ZERO, Reply.GENERAL_FAILURE))
        if atyp == ATYP_DOMAIN:
            host = frame[5:end].decode("ascii")
        else:
            host = str(ipaddress.ip_address(frame[4:end]))
        rest = self._take(len(buf))
        self._stage = _Stage.DONE
        return Request(host, port, rest)

    def _address_end(self, atyp: int) -> int | None:
        """Where the request's DST.ADDR ends (DST.PORT follows), once known; refuses a bad one."""
        buf = self._buf
        if atyp == ATYP_IPV4:
            return 4 + 4
        if atyp == ATYP_IPV6:
            return 4 + 16
        if atyp != ATYP_DOMAIN:
            code = Reply.ADDRESS_TYPE_NOT_SUPPORTED
            raise _Stop(_request_error(Reason.UNSUPPORTED_ADDRESS_TYPE, code))
        if len(buf) < 5:
            return None
        end = 5 + buf[4]
        name = buf[5 : min(end, len(buf))]
        if buf[4] == 0 or any(byte < 0x21 or byte > 0x7E for byte in name):
            raise _Stop(_request_error(Reason.BAD_NAME, Reply.GENERAL_FAILURE))
        return end

    @staticmethod
    def _bad_request(reason: Reason) -> FrameError:
        """A request that cannot be served: not SOCKS5 (a close), else a reply saying why."""
        if reason is Reason.BAD_REQUEST_VERSION:
            return FrameError(reason)
        if reason is Reason.UNSUPPORTED_COMMAND:
            return _request_error(reason, Reply.COMMAND_NOT_SUPPORTED)
        return _request_error(reason, Reply.GENERAL_FAILURE)
