"""HTTP CONNECT proxy mode: read one request head, check it, then relay.

The seed article's CONNECT proxy hijacked the connection and lost whatever the
client had already sent after the header; here the request is parsed from the
client leg's reads (:meth:`Leg.intercept`), the bytes after the blank line are
held for the target (:meth:`Leg.hold`) and reach it first, exactly once, after
the ``200``. Each request then goes through the phases
(:mod:`tunnelkit.relay.phases`), in order:

1. identify: the header deadline (408) and the parser's limits (400/405/414/431/505);
2. route: ``Proxy-Authorization`` against ``--auth-file`` (407), checked in a
   thread on every request, never cached; then the destination policy, with
   one name lookup whose answer is the only one used (403; 502 when the name
   does not resolve; 504 when resolving times out);
3. connect: to a checked address (502 refused, 504 timeout).

Every failure is a fixed short response followed by a close: nothing after the
request head is ever parsed as a new request.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol

from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.backends.resolver import IPAddress, Resolve, ResolveError
from tunnelkit.modes.connect_request import (
    ConnectRequest,
    ConnectRequestParser,
    Headers,
    RequestError,
    proxy_credentials,
)
from tunnelkit.policy.targets import Decision, Refusal, TargetPolicy
from tunnelkit.relay.phases import Mode, Refused, Route, time_left
from tunnelkit.relay.tunnel import CloseKind, Tunnel

#: ``authenticate(user, password)`` fires with whether they match.
Authenticate = Callable[[str, str], Deferred[bool]]

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


@attrs.frozen
class ConnectSettings:
    """Everything a CONNECT listener decides with, built once from the options.

    ``fixed`` dials the ``--to`` backends instead of the requested target (the
    target is still checked); ``outbound`` is the reactor the target endpoints
    connect with (the socket-option-tuned one).
    """

    policy: TargetPolicy
    resolve: Resolve
    outbound: Any
    connect_timeout: float
    header_timeout: float
    authenticate: Authenticate | None = None
    fixed: BackendGroup | None = None
    parser: Callable[[], ConnectRequestParser] = ConnectRequestParser


def _refusal(decision: Decision) -> Refused:
    refusal = decision.refusal
    assert refusal is not None
    if refusal is Refusal.NO_ADDRESS:
        return Refused("target has no address", status=502)
    shown = decision.refused_address or decision.target
    why = f"target refused by policy: {refusal.value}"
    if decision.rule is not None:
        why += f" ({decision.rule})"
    return Refused(f"{why}: {shown}:{decision.port}", status=403)


def _discard(data: bytes) -> None:
    """Bytes after a refused request head: never parsed, never relayed."""


class _HeadReader:
    """The identify phase of one client: its request head, within the header deadline."""

    def __init__(self, tunnel: Tunnel, settings: ConnectSettings) -> None:
        self.tunnel = tunnel
        self.settings = settings
        self.parser = settings.parser()
        self.result: Deferred[ConnectRequest] = Deferred()

    def begin(self) -> Deferred[ConnectRequest]:
        self.tunnel.arm(
            "header", time_left(self.tunnel, self.settings.header_timeout), self._too_slow
        )
        self.tunnel.client.intercept(self._feed)
        return self.result

    def _too_slow(self) -> None:
        timeout = self.settings.header_timeout
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

    def __init__(self, settings: ConnectSettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock

    def identify(self, tunnel: Tunnel) -> Deferred[ConnectRequest]:
        return _HeadReader(tunnel, self.settings).begin()

    def route(self, tunnel: Tunnel, request: ConnectRequest) -> Deferred[Route]:
        return Deferred.fromCoroutine(self._route(tunnel, request))

    async def _route(self, tunnel: Tunnel, request: ConnectRequest) -> Route:
        await self._authenticate(tunnel, request)
        decision = await self._decide(tunnel, request)
        group = self.settings.fixed or BackendGroup(
            [self._backend(address, request.port) for address in decision.addresses],
            self.clock,
            self.settings.connect_timeout,
        )
        return Route(group)

    async def _authenticate(self, tunnel: Tunnel, request: ConnectRequest) -> None:
        check = self.settings.authenticate
        if check is None:
            return
        credentials = proxy_credentials(request.headers)
        if credentials is not None:
            tunnel.details["user"] = credentials.user
            pending = check(credentials.user, credentials.password)
            tunnel.pending = pending
            if await pending:
                return
        raise Refused(
            "proxy authentication required",
            status=407,
            headers=(("Proxy-Authenticate", REALM),),
        )

    async def _decide(self, tunnel: Tunnel, request: ConnectRequest) -> Decision:
        policy = self.settings.policy
        decision = policy.precheck(request.host, request.port)
        if decision is None:
            resolving = self.settings.resolve(request.host, request.port)
            resolving.addTimeout(self.settings.connect_timeout, self.clock)
            tunnel.pending = resolving
            try:
                addresses = await resolving
            except ResolveError as e:
                raise Refused(str(e), status=502) from None
            except TimeoutError:
                raise Refused(
                    f"resolving {request.host!r} timed out", CloseKind.TIMEOUT, status=504
                ) from None
            decision = policy.decide(request.host, request.port, addresses)
        if not decision.allowed:
            raise _refusal(decision)
        return decision

    def _backend(self, address: IPAddress, port: int) -> Backend:
        endpoint = host_endpoint(
            self.settings.outbound, str(address), port, self.settings.connect_timeout
        )
        name = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return Backend(name, endpoint)

    def established(self, tunnel: Tunnel) -> None:
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
