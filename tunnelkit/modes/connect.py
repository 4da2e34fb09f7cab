"""HTTP CONNECT proxy mode: read one request head, check it, then relay.

The seed article's CONNECT proxy hijacked the connection and lost whatever the
client had already sent after the header; here the request is parsed from the
client leg's reads (:meth:`Leg.intercept`), the bytes after the blank line are
held for the target (:meth:`Leg.hold`) and reach it first, exactly once, after
the ``200``. Each request then goes through, in order:

1. the header deadline (408) and the parser's limits (400/405/414/431/505);
2. ``Proxy-Authorization`` against ``--auth-file`` (407), checked in a thread
   on every request, never cached;
3. the destination policy, with one name lookup whose answer is the only one
   used (403; 502 when the name does not resolve; 504 when resolving times out);
4. the connection to a checked address (502 refused, 504 timeout).

Every failure is a fixed short response followed by a close: nothing after the
request head is ever parsed as a new request.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.backends.dialer import Backend, Dialed, Dialer, host_endpoint
from tunnelkit.backends.resolver import IPAddress, Resolve, ResolveError
from tunnelkit.modes.connect_request import (
    ConnectRequest,
    ConnectRequestParser,
    Headers,
    RequestError,
    proxy_credentials,
)
from tunnelkit.modes.forward import dial_backend, join_dialed, why_not_connected
from tunnelkit.policy.targets import Decision, Refusal, TargetPolicy
from tunnelkit.relay.factory import TunnelFactory
from tunnelkit.relay.tunnel import CloseKind, Tunnel

log = Logger(namespace="tunnelkit.connect")

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
    fixed: Dialer | None = None
    parser: Callable[[], ConnectRequestParser] = ConnectRequestParser


class _Answer(Exception):
    """End the request with ``status``; ``reason`` and ``kind`` are for the log."""

    def __init__(
        self, status: int, reason: str, kind: CloseKind = CloseKind.ERROR, headers: Headers = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind
        self.headers = headers


def _refusal_answer(decision: Decision) -> _Answer:
    refusal = decision.refusal
    assert refusal is not None
    if refusal is Refusal.NO_ADDRESS:
        return _Answer(502, "target has no address")
    shown = decision.refused_address or decision.target
    why = f"target refused by policy: {refusal.value}"
    if decision.rule is not None:
        why += f" ({decision.rule})"
    return _Answer(403, f"{why}: {shown}:{decision.port}")


def _discard(data: bytes) -> None:
    """Bytes after a refused request head: never parsed, never relayed."""


class ConnectSession:
    """One client's CONNECT request, from the first byte to the join or the refusal."""

    def __init__(self, tunnel: Tunnel, settings: ConnectSettings, clock: IReactorTime) -> None:
        self.tunnel = tunnel
        self.settings = settings
        self.clock = clock
        self.parser = settings.parser()

    def begin(self) -> None:
        """Read the request head within the header deadline."""
        self.tunnel.details["mode"] = "connect"
        self.tunnel.arm("header", self.settings.header_timeout, self._too_slow)
        self.tunnel.client.intercept(self._feed)

    def _head_done(self, then: Callable[[bytes], None] | None) -> None:
        """Stop parsing: later bytes go to ``then`` (``None``: held for the target)."""
        self.tunnel.disarm("header")
        self.tunnel.client.intercept(then)

    def _too_slow(self) -> None:
        self._refuse(
            _Answer(
                408,
                f"no complete request head in {self.settings.header_timeout:g} s",
                CloseKind.TIMEOUT,
            )
        )

    def _feed(self, data: bytes) -> None:
        outcome = self.parser.feed(data)
        if outcome is None:
            return
        if isinstance(outcome, RequestError):
            self._refuse(
                _Answer(outcome.status, f"bad request: {outcome.reason}", headers=outcome.headers)
            )
            return
        self._head_done(None)
        self.tunnel.client.hold(outcome.rest)
        self.tunnel.details["target"] = outcome.authority
        self.tunnel.backend_name = outcome.authority
        Deferred.fromCoroutine(self._serve(outcome)).addErrback(self._crashed)

    def _crashed(self, failure: Failure) -> None:
        """A bug, not bad input: log it and reset the tunnel rather than leak it."""
        log.failure("CONNECT request handling failed", failure, event="connect_error")
        self.tunnel.abort("internal error", CloseKind.ERROR)

    def _refuse(self, answer: _Answer) -> None:
        self._head_done(_discard)
        self.tunnel.details["status"] = answer.status
        client = self.tunnel.client
        if not client.lost:
            client.transport.write(response(answer.status, answer.headers))
        self.tunnel.fail(answer.reason, answer.kind)

    async def _serve(self, request: ConnectRequest) -> None:
        try:
            await self._authenticate(request)
            decision = await self._decide(request)
            dialed = await self._dial(request, decision)
        except CancelledError:
            return  # the client left; the relay has already accounted for it
        except _Answer as answer:
            self._refuse(answer)
            return
        self.tunnel.details["status"] = 200
        self.tunnel.client.transport.write(ESTABLISHED)
        join_dialed(self.tunnel, dialed)

    async def _authenticate(self, request: ConnectRequest) -> None:
        check = self.settings.authenticate
        if check is None:
            return
        credentials = proxy_credentials(request.headers)
        if credentials is not None:
            self.tunnel.details["user"] = credentials.user
            pending = check(credentials.user, credentials.password)
            self.tunnel.pending = pending
            if await pending:
                return
        raise _Answer(
            407, "proxy authentication required", headers=(("Proxy-Authenticate", REALM),)
        )

    async def _decide(self, request: ConnectRequest) -> Decision:
        policy = self.settings.policy
        decision = policy.precheck(request.host, request.port)
        if decision is None:
            resolving = self.settings.resolve(request.host, request.port)
            resolving.addTimeout(self.settings.connect_timeout, self.clock)
            self.tunnel.pending = resolving
            try:
                addresses = await resolving
            except ResolveError as e:
                raise _Answer(502, str(e)) from None
            except TimeoutError:
                raise _Answer(
                    504, f"resolving {request.host!r} timed out", CloseKind.TIMEOUT
                ) from None
            decision = policy.decide(request.host, request.port, addresses)
        if not decision.allowed:
            raise _refusal_answer(decision)
        return decision

    async def _dial(self, request: ConnectRequest, decision: Decision) -> Dialed:
        dialer = self.settings.fixed or Dialer(
            [self._backend(address, request.port) for address in decision.addresses],
            self.clock,
            self.settings.connect_timeout,
        )
        try:
            return await dial_backend(self.tunnel, dialer)
        except CancelledError:
            raise
        except Exception:
            reason, kind = why_not_connected(Failure())
            raise _Answer(504 if kind is CloseKind.TIMEOUT else 502, reason, kind) from None

    def _backend(self, address: IPAddress, port: int) -> Backend:
        endpoint = host_endpoint(
            self.settings.outbound, str(address), port, self.settings.connect_timeout
        )
        name = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return Backend(name, endpoint)


class _Overloaded(Protocol):
    """Answers 503 to a client that arrived at the connection cap, then closes."""

    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(response(503))
        self.transport.loseConnection()


class ConnectFactory(TunnelFactory):
    """Accepts CONNECT proxy clients on one listener."""

    def __init__(self, *, settings: ConnectSettings, **common: Any) -> None:
        super().__init__(**common)
        self.settings = settings

    def start(self, tunnel: Tunnel) -> None:
        ConnectSession(tunnel, self.settings, self.clock).begin()

    def overloaded(self) -> Protocol | None:
        return _Overloaded()
