"""What tunnelkit says to an upstream proxy to reach a backend through it, without I/O.

Each negotiation is a small state machine fed the proxy's bytes in any
chunking: :meth:`Negotiation.start` gives the first bytes to send, and
:meth:`Negotiation.feed` answers with nothing (more is needed), a
:class:`Send` (the next message), a :class:`Through` (the tunnel is open;
``rest`` is what the proxy sent past its reply, the backend's first bytes,
which must not be lost) or a :class:`Refusal` (the proxy's refusal, in words
that carry its HTTP status or SOCKS reply code). Memory is bounded: a reply
that does not end within :data:`MAX_HEAD` bytes is a refusal (a SOCKS5 reply
is at most 262 bytes by its own format).

* HTTP CONNECT (RFC 9110 §9.3.6): ``CONNECT host:port``, Basic credentials
  in ``Proxy-Authorization``; any 2xx opens the tunnel, whatever headers
  came with it.
* SOCKS5 (RFC 1928, RFC 1929): the greeting offers "no authentication", and
  username/password when credentials are given; the request names the
  backend by address or by domain name, for the proxy to resolve.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import struct

import attrs

#: The most of a proxy's reply kept while waiting for its end.
MAX_HEAD = 16384


@attrs.frozen
class Send:
    """Send ``data`` to the proxy, then keep reading."""

    data: bytes


@attrs.frozen
class Through:
    """The proxy connected the backend; ``rest`` came from the backend after the reply."""

    rest: bytes


@attrs.frozen
class Refusal:
    """The proxy refused, or did not speak its protocol; ``reason`` says how."""

    reason: str


Step = Send | Through | Refusal


class Negotiation:
    """One proxy negotiation for one connection (see the module docstring)."""

    def start(self) -> bytes:
        """What to send once connected to the proxy."""
        raise NotImplementedError

    def feed(self, data: bytes) -> Step | None:
        """The proxy sent ``data``: what next (``None``: read more)."""
        raise NotImplementedError

    def closed(self) -> str:
        """Why the negotiation failed, when the proxy closed before it ended."""
        raise NotImplementedError


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?: ([^\r\n]*))?\r?\n")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_PRINTABLE = re.compile(rb"[^\x20-\x7e]")


class HTTPConnect(Negotiation):
    """``CONNECT host:port`` to an HTTP proxy; a 2xx status opens the tunnel."""

    def __init__(
        self, host: str, port: int, user: str | None = None, password: str | None = None
    ) -> None:
        self.authority = _authority(host, port)
        self.credentials = user is not None
        self.user, self.password = user, password
        self.head = b""

    def start(self) -> bytes:
        lines = [f"CONNECT {self.authority} HTTP/1.1", f"Host: {self.authority}"]
        if self.user is not None:
            pair = f"{self.user}:{self.password or ''}".encode()
            lines.append(f"Proxy-Authorization: Basic {base64.b64encode(pair).decode('ascii')}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def feed(self, data: bytes) -> Step | None:
        self.head += data
        end = _END_OF_HEAD.search(self.head)
        if end is None:
            if len(self.head) > MAX_HEAD or not _could_be_http(self.head):
                return self._refusal()
            return None
        status = _STATUS_LINE.match(self.head[: end.end()])
        if status is None:
            return self._refusal()
        code = int(status[1])
        if 200 <= code < 300:
            return Through(self.head[end.end() :])
        phrase = _PRINTABLE.sub(b"?", status[2] or b"")[:80].decode("ascii").strip()
        said = f"{code} {phrase}".rstrip()
        if code == 407:
            sent = "the credentials of --via were refused" if self.credentials else "--via has none"
            return Refusal(f"proxy authentication required: HTTP {said} ({sent})")
        return Refusal(f"proxy refused CONNECT {self.authority}: HTTP {said}")

    def _refusal(self) -> Refusal:
        start = _PRINTABLE.sub(b"?", self.head[:40]).decode("ascii")
        return Refusal(f"not an HTTP proxy: its reply to CONNECT began {start!r}")

    def closed(self) -> str:
        if not self.head:
            return "the proxy closed the connection without answering CONNECT"
        return "the proxy closed the connection in the middle of its reply to CONNECT"


def _could_be_http(head: bytes) -> bool:
    """Whether ``head`` may still become a status line (a SOCKS or TLS answer does not)."""
    prefix = b"HTTP/1."
    return head[: len(prefix)] == prefix[: len(head)]


#: RFC 1928's reply codes.
SOCKS5_REPLIES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}

_NO_AUTH, _USER_PASSWORD, _NO_METHOD = 0x00, 0x02, 0xFF
_IPV4, _DOMAIN, _IPV6 = 0x01, 0x03, 0x04


class Socks5Connect(Negotiation):
    """A SOCKS5 CONNECT: greeting, username/password if the proxy asks, then the request."""

    def __init__(
        self, host: str, port: int, user: str | None = None, password: str | None = None
    ) -> None:
        self.host, self.port = host, port
        self.user, self.password = user, password
        self.buffer = b""
        #: What is awaited: the method choice, the auth status, then the reply.
        self.state = "method"

    def start(self) -> bytes:
        methods = [_NO_AUTH] if self.user is None else [_NO_AUTH, _USER_PASSWORD]
        return bytes([5, len(methods), *methods])

    def feed(self, data: bytes) -> Step | None:
        """One step at a time: after a :class:`Send`, ``feed(b"")`` reads on in what is held."""
        self.buffer += data
        handler = {"method": self._method, "auth": self._auth, "reply": self._reply}[self.state]
        return handler()

    def _take(self, size: int) -> bytes | None:
        if len(self.buffer) < size:
            return None
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def _method(self) -> Step | None:
        choice = self._take(2)
        if choice is None:
            return None
        if choice[0] != 5:
            return Refusal(f"not a SOCKS5 proxy: it answered the greeting with {choice.hex()}")
        method = choice[1]
        if method == _NO_AUTH:
            self.state = "reply"
            return Send(self._request())
        if method == _USER_PASSWORD and self.user is not None:
            self.state = "auth"
            return Send(self._credentials())
        if method == _NO_METHOD:
            offered = "no authentication" if self.user is None else "none or username/password"
            return Refusal(f"SOCKS5 proxy accepts no method offered ({offered}): reply 0xff")
        return Refusal(f"SOCKS5 proxy chose a method not offered: 0x{method:02x}")

    def _credentials(self) -> bytes:
        assert self.user is not None
        user, password = self.user.encode(), (self.password or "").encode()
        return bytes([1, len(user)]) + user + bytes([len(password)]) + password

    def _auth(self) -> Step | None:
        status = self._take(2)
        if status is None:
            return None
        if status[1] != 0:
            return Refusal(
                f"SOCKS5 proxy refused the credentials of --via: status 0x{status[1]:02x}"
            )
        self.state = "reply"
        return Send(self._request())

    def _request(self) -> bytes:
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            name = self.host.encode()  # a HOST:PORT name, at most 255 bytes (config.model)
            target = bytes([_DOMAIN, len(name)]) + name
        else:
            target = bytes([_IPV4 if address.version == 4 else _IPV6]) + address.packed
        return bytes([5, 1, 0]) + target + struct.pack("!H", self.port)

    def _reply(self) -> Step | None:
        if len(self.buffer) < 5:
            return None
        version, code, _, kind, first = self.buffer[:5]
        if version != 5:
            return Refusal(f"not a SOCKS5 proxy: it answered CONNECT with {self.buffer[:5].hex()}")
        if code != 0:
            what = SOCKS5_REPLIES.get(code, "unassigned")
            return Refusal(
                f"SOCKS5 proxy refused CONNECT {_authority(self.host, self.port)}:"
                f" reply 0x{code:02x} ({what})"
            )
        sizes = {_IPV4: 4, _IPV6: 16, _DOMAIN: 1 + first}
        if kind not in sizes:
            return Refusal(f"SOCKS5 proxy replied with an unknown address type 0x{kind:02x}")
        reply = self._take(4 + sizes[kind] + 2)
        if reply is None:
            return None
        self.state = "through"
        return Through(self.buffer)

    def closed(self) -> str:
        stage = {"method": "greeting", "auth": "credentials", "reply": "CONNECT"}
        return (
            "the proxy closed the connection without answering the SOCKS5"
            f" {stage.get(self.state, 'CONNECT')}"
        )


def negotiation(
    kind: str, host: str, port: int, user: str | None, password: str | None
) -> Negotiation:
    """The negotiation with a proxy of ``kind`` (``http`` or ``socks5``) for ``host:port``."""
    make = HTTPConnect if kind == "http" else Socks5Connect
    return make(host, port, user, password)
