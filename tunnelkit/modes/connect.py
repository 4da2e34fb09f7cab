"""HTTP CONNECT proxy mode: read one request head, check it, then relay.

The seed article's CONNECT proxy hijacked the connection and lost whatever the
client had already sent after the header; here the request is parsed from the
client leg's reads (:meth:`Leg.intercept`), the bytes after the blank line are
held for the target (:meth:`Leg.hold`) and reach it first, exactly once, after
the ``200``. Each request then goes through the phases
(:mod:`tunnelkit.relay.phases`), in order:

1. identify: the header deadline (408) and the parser's limits (400/405/414/431/505);
2. route: ``Proxy-Authorization`` against ``--auth-file`` (407), then the
   destination policy with one name lookup, both decided as for SOCKS5 by
   :mod:`tunnelkit.modes.proxy_route` (403; 502 when the name does not
   resolve; 504 when resolving times out);
3. connect: to a checked address (502 refused, 504 timeout).

Every failure is a fixed short response followed by a close: nothing after the
request head is ever parsed as a new request.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol

from tunnelkit.modes.connect_request import (
    ConnectRequest,
    ConnectRequestParser,
    Headers,
    RequestError,
    proxy_credentials,
)
from tunnelkit.modes.proxy_route import ProxyRouter, ProxySettings
from tunnelkit.relay.phases import Mode, Refused, Route, time_left
from tunnelkit.relay.tunnel import CloseKind, Leg, Tunnel

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
REALM = 'Basic realm="tunnelkit"'


def response(status: int, headers: Headers = ()) -> bytes:
    """A complete error response with a fixed body: never a byte of the request."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode("ascii")
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _discard(data: bytes) -> None:
    """Bytes after a refused request head: never parsed, never relayed."""


class _HeadReader:
    """The identify phase of one client: its request head, within the header deadline."""

    def __init__(self, tunnel: Tunnel, header_timeout: float) -> None:
        self.tunnel = tunnel
        self.header_timeout = header_timeout
        self.parser = ConnectRequestParser()
        self.result: Deferred[ConnectRequest] = Deferred()

    def begin(self) -> Deferred[ConnectRequest]:
        self.tunnel.arm("header", time_left(self.tunnel, self.header_timeout), self._too_slow)
        self.tunnel.client.intercept(self._feed)
        return self.result

    def _too_slow(self) -> None:
        timeout = self.header_timeout
        refused = Refused(
            f"no complete request head in {timeout:g} s", CloseKind.TIMEOUT, status=408
        )
        self.result.errback(refused)

    def _feed(self, data: bytes) -> None:
        outcome = self.parser.feed(data)
        if outcome is None:
            return
        if isinstance(outcome, RequestError):
            refused = Refused(
                f"bad request: {outcome.reason}", status=outcome.status, headers=outcome.headers
            )
            self.result.errback(refused)
            return
        # Later bytes are held for the target, and reach it first, once.
        self.tunnel.disarm("header")
        self.tunnel.client.intercept(None)
        self.tunnel.client.hold(outcome.rest)
        self.tunnel.details["target"] = outcome.authority
        self.tunnel.backend_name = outcome.authority
        self.result.callback(outcome)


class ConnectMode(Mode):
    """An HTTP CONNECT proxy: identify reads the request head, route checks it and picks the target."""

    name = "connect"

    def __init__(self, settings: ProxySettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.router = ProxyRouter(settings, clock)

    def identify(self, tunnel: Tunnel) -> Deferred[ConnectRequest]:
        return _HeadReader(tunnel, self.settings.header_timeout).begin()

    def route(self, tunnel: Tunnel, request: ConnectRequest) -> Deferred[Route]:
        return Deferred.fromCoroutine(self._route(tunnel, request))

    async def _route(self, tunnel: Tunnel, request: ConnectRequest) -> Route:
        await self._authenticate(tunnel, request)
        return await self.router.route(tunnel, request.host, request.port)

    async def _authenticate(self, tunnel: Tunnel, request: ConnectRequest) -> None:
        if not self.router.authenticates:
            return
        credentials = proxy_credentials(request.headers)
        if credentials is not None and await self.router.check_user(
            tunnel, credentials.user, credentials.password
        ):
            return
        raise Refused(
            "proxy authentication required",
            status=407,
            headers=(("Proxy-Authenticate", REALM),),
        )

    def established(self, tunnel: Tunnel, backend: Leg) -> None:
        tunnel.details["status"] = 200
        tunnel.client.transport.write(ESTABLISHED)

    def refuse(self, tunnel: Tunnel, refused: Refused) -> None:
        """A fixed short response, then the close: nothing after the head is ever parsed."""
        tunnel.disarm("header")
        tunnel.client.intercept(_discard)
        tunnel.details["status"] = refused.status
        client = tunnel.client
        if not client.lost:
            client.transport.write(response(refused.status, refused.headers))
        tunnel.fail(refused.reason, refused.kind)

    def overloaded(self) -> Protocol | None:
        return _Overloaded()


class _Overloaded(Protocol):
    """Answers 503 to a client that arrived at the connection cap, then closes."""

    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(response(503))
        self.transport.loseConnection()
