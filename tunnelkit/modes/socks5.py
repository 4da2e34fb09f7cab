"""SOCKS5 proxy mode (RFC 1928 CONNECT, RFC 1929 username/password): negotiate, check, then relay.

The client's frames are parsed from the client leg's reads
(:meth:`Leg.intercept`) by :mod:`tunnelkit.modes.socks5_frames`, whatever
their chunking; the bytes after the request are held for the target
(:meth:`Leg.hold`) and reach it first, exactly once, after the success
reply. Each client then goes through the phases
(:mod:`tunnelkit.relay.phases`), in order:

1. identify: the greeting (with ``--auth-file`` only username/password is
   chosen; no acceptable method: ``05 FF`` and a close), the RFC 1929
   sub-negotiation (checked in a thread; ``01 01`` and a close on failure)
   and the request, all under one ``--header-timeout`` from the accept;
   BIND and UDP ASSOCIATE get 0x07, an unknown address type 0x08;
2. route: the destination policy with one name lookup, decided exactly as
   for CONNECT (:mod:`tunnelkit.modes.proxy_route`): a refusal is 0x02,
   a name that does not resolve (or not in time) 0x04;
3. connect: to a checked address; refused 0x05, network unreachable 0x03,
   host unreachable or timed out 0x04, anything else 0x01.

The success reply's BND.ADDR and BND.PORT are the local address of the
connection to the target. Every failure is one reply (or the sub-negotiation's
status, or nothing when the client does not speak SOCKS5) followed by a
close: nothing after a refused frame is ever parsed.
"""

from __future__ import annotations

import errno
import ipaddress
from collections import deque

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from tunnelkit.backends.group import BackendsUnavailable
from tunnelkit.backends.resolver import ResolveError
from tunnelkit.modes.proxy_route import ProxyRouter, ProxySettings
from tunnelkit.modes.socks5_frames import (
    Credentials,
    Frame,
    FrameError,
    Greeting,
    IPAddress,
    NegotiationParser,
    Reply,
    Request,
    auth_status,
    method_selection,
    reply,
)
from tunnelkit.relay.phases import Mode, Refused, Route, time_left
from tunnelkit.relay.tunnel import CloseKind, Leg, Tunnel

#: Replies by the class of the lookup or connect error.
_REPLY_BY_ERROR: tuple[tuple[type[BaseException], Reply], ...] = (
    (ResolveError, Reply.HOST_UNREACHABLE),
    (error.ConnectionRefusedError, Reply.CONNECTION_REFUSED),
    (error.NoRouteError, Reply.NETWORK_UNREACHABLE),
    (error.TCPTimedOutError, Reply.HOST_UNREACHABLE),
)
#: Replies by errno, for connect errors Twisted gives no class of their own.
_REPLY_BY_ERRNO = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.HOST_UNREACHABLE,
}


class _Answered(Refused):
    """A refusal during the negotiation, whose ``answer`` (possibly nothing) the frames decided."""

    def __init__(
        self,
        reason: str,
        answer: bytes,
        code: Reply | None = None,
        kind: CloseKind = CloseKind.ERROR,
    ) -> None:
        super().__init__(reason, kind)
        self.answer = answer
        self.code = code


def reply_code(refused: Refused) -> Reply:
    """The reply for a refusal of the route or connect phase (see the module docstring)."""
    if refused.status == 403:
        return Reply.NOT_ALLOWED
    if refused.kind is CloseKind.TIMEOUT:
        return Reply.HOST_UNREACHABLE
    cause = refused.cause
    if isinstance(cause, BackendsUnavailable):
        cause = cause.cause  # the last attempt's
    for kind, code in _REPLY_BY_ERROR:
        if isinstance(cause, kind):
            return code
    number = getattr(cause, "osError", None)
    return (
        _REPLY_BY_ERRNO.get(number, Reply.GENERAL_FAILURE)
        if isinstance(number, int)
        else Reply.GENERAL_FAILURE
    )


def _bound(backend: Leg) -> tuple[IPAddress, int] | None:
    """BND.ADDR and BND.PORT: the local end of the connection to the target, if it is IP."""
    local = backend.transport.getHost()
    host, port = getattr(local, "host", None), getattr(local, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None  # a UNIX --to backend: the reply says 0.0.0.0:0
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]), port
    except ValueError:
        return None


def _discard(data: bytes) -> None:
    """Bytes after a refused frame: never parsed, never relayed."""


class _Negotiation:
    """The identify phase of one client: greeting, sub-negotiation and request, within one deadline.

    Frames are parsed as soon as they arrive, but acted on in order: while
    the credentials are being checked, a request read behind them waits (and
    what follows it is already held for the target, so memory stays bounded
    by the leg's hold).
    """

    def __init__(self, tunnel: Tunnel, router: ProxyRouter, header_timeout: float) -> None:
        self.tunnel = tunnel
        self.router = router
        self.header_timeout = header_timeout
        self.parser = NegotiationParser(authenticates=router.authenticates)
        self.frames: deque[Frame] = deque()
        self.checking = False
        self.result: Deferred[Request] = Deferred()

    def begin(self) -> Deferred[Request]:
        tunnel = self.tunnel
        tunnel.arm("header", time_left(tunnel, self.header_timeout), self._too_slow)
        tunnel.client.intercept(self._feed)
        return self.result

    def _too_slow(self) -> None:
        reason = f"no complete SOCKS5 negotiation in {self.header_timeout:g} s"
        self._end(_Answered(reason, b"", kind=CloseKind.TIMEOUT))

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        frames = parser.feed(data)
        if parser.done:
            last = frames[-1]
            client = self.tunnel.client
            if isinstance(last, Request):
                # What follows belongs to the target: held, behind the request's rest, once.
                client.intercept(None)
                client.hold(last.rest)
            else:
                client.intercept(_discard)
        self.frames.extend(frames)
        self._advance()

    def _advance(self) -> None:
        while self.frames and not self.checking and not self.result.called:
            frame = self.frames.popleft()
            if isinstance(frame, Greeting):
                self.tunnel.client.transport.write(method_selection(frame.method))
            elif isinstance(frame, Credentials):
                self._check(frame)
            elif isinstance(frame, Request):
                self._identified(frame)
            else:
                self._refused_frame(frame)

    def _refused_frame(self, frame: FrameError) -> None:
        self._end(_Answered(f"bad SOCKS5 negotiation: {frame.reason}", frame.answer, frame.reply))

    def _check(self, credentials: Credentials) -> None:
        self.checking = True
        checking = self.router.check_user(self.tunnel, credentials.user, credentials.password)
        checking.addCallbacks(self._checked, self._check_failed)

    def _checked(self, ok: bool) -> None:
        self.checking = False
        self.tunnel.pending = None
        if self.result.called:
            return  # the deadline passed while the check ran
        if not ok:
            self._end(_Answered("authentication failed", auth_status(False)))
            return
        self.tunnel.client.transport.write(auth_status(True))
        self._advance()

    def _check_failed(self, failure: Failure) -> None:
        self.checking = False
        if not self.result.called:
            self.result.errback(failure)  # cancelled: the client left; else a bug, logged

    def _identified(self, request: Request) -> None:
        tunnel = self.tunnel
        tunnel.disarm("header")
        tunnel.details["target"] = request.authority
        tunnel.backend_name = request.authority
        self.result.callback(request)

    def _end(self, refused: _Answered) -> None:
        self.result.errback(refused)


class Socks5Mode(Mode):
    """A SOCKS5 proxy: identify negotiates and reads the request, route checks it and picks the target."""

    name = "socks5"

    def __init__(self, settings: ProxySettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.router = ProxyRouter(settings, clock)

    def identify(self, tunnel: Tunnel) -> Deferred[Request]:
        return _Negotiation(tunnel, self.router, self.settings.header_timeout).begin()

    def route(self, tunnel: Tunnel, request: Request) -> Deferred[Route]:
        return Deferred.fromCoroutine(self.router.route(tunnel, request.host, request.port))

    def established(self, tunnel: Tunnel, backend: Leg) -> None:
        tunnel.details["reply"] = int(Reply.SUCCEEDED)
        tunnel.client.transport.write(reply(Reply.SUCCEEDED, _bound(backend)))

    def refuse(self, tunnel: Tunnel, refused: Refused) -> None:
        """One answer (a reply, ``05 FF``, ``01 01`` or nothing), then the close."""
        tunnel.disarm("header")
        client = tunnel.client
        client.intercept(_discard)
        if isinstance(refused, _Answered):
            answer, code = refused.answer, refused.code
        else:
            code = reply_code(refused)
            answer = reply(code)
        if code is not None:
            tunnel.details["reply"] = int(code)
        if answer and not client.lost:
            client.transport.write(answer)
        tunnel.fail(refused.reason, refused.kind)
