"""SNI routing (``--mode sni``): choose the backend by the ClientHello's server name, relay TLS untouched.

What HAProxy does with ``req.ssl_sni`` in a TCP frontend and nginx with
``ssl_preread``: tunnelkit terminates nothing. Through the phases
(:mod:`tunnelkit.relay.phases`):

1. identify: read the client's ClientHello (:mod:`tunnelkit.tls.client_hello`)
   under the header deadline, keeping every byte read;
2. route: the most specific ``--route`` for its server name and ALPN offer
   (:mod:`tunnelkit.policy.sni_routes`), else the ``--to`` backends, else a
   refusal;
3. connect and relay: the bytes read go to the backend first, unchanged and
   once, so the client's handshake is with the backend, which the client
   verifies with the backend's own certificate.

A refusal closes the connection; where the client spoke TLS it first gets a
TLS alert saying why (``unrecognized_name`` when no route takes its name,
``decode_error`` for a malformed hello, ``internal_error`` when no backend
connected), as a TLS server would send, so its error names the cause.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from tunnelkit.backends.group import BackendGroup
from tunnelkit.policy.sni_routes import SniRoutes
from tunnelkit.relay.phases import Mode, Refused, Route, time_left
from tunnelkit.relay.tunnel import CloseKind, Tunnel
from tunnelkit.tls.client_hello import (
    INTERNAL_ERROR,
    MAX_HELLO,
    UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloParser,
    HelloError,
)


@attrs.frozen
class SniSettings:
    """Everything an SNI listener decides with, built once from the options."""

    routes: SniRoutes[BackendGroup]
    #: The ``--to`` backends: clients no route takes (no SNI, unknown name).
    default: BackendGroup | None
    header_timeout: float
    limit: int = MAX_HELLO


class TLSRefused(Refused):
    """A refusal that a TLS client hears as an alert (``alert``) before the close."""

    def __init__(self, reason: str, alert: int | None) -> None:
        super().__init__(reason, status=400)
        self.alert = alert


def alert_record(description: int) -> bytes:
    """A fatal TLS alert record, as a server sends one before its ServerHello (plaintext)."""
    return bytes((21, 3, 3, 0, 2, 2, description))


def _discard(data: bytes) -> None:
    """Bytes after a refused hello: never relayed."""


class _HelloReader:
    """The identify phase of one client: its ClientHello, within the header deadline."""

    def __init__(self, tunnel: Tunnel, settings: SniSettings) -> None:
        self.tunnel = tunnel
        self.settings = settings
        self.parser = ClientHelloParser(settings.limit)
        self.read: list[bytes] = []
        self.result: Deferred[ClientHello] = Deferred()

    def begin(self) -> Deferred[ClientHello]:
        self.tunnel.arm(
            "header", time_left(self.tunnel, self.settings.header_timeout), self._too_slow
        )
        self.tunnel.client.intercept(self._feed)
        return self.result

    def _too_slow(self) -> None:
        timeout = self.settings.header_timeout
        self.result.errback(
            Refused(f"no complete ClientHello in {timeout:g} s", CloseKind.TIMEOUT, status=408)
        )

    def _feed(self, data: bytes) -> None:
        self.read.append(bytes(data))
        outcome = self.parser.feed(data)
        if outcome is None:
            return
        if isinstance(outcome, HelloError):
            self.result.errback(TLSRefused(f"bad ClientHello: {outcome.reason}", outcome.alert))
            return
        # Everything read, the hello and whatever followed it, goes to the backend as it came.
        self.tunnel.disarm("header")
        self.tunnel.client.intercept(None)
        self.tunnel.client.hold(b"".join(self.read))
        self.read.clear()
        _record(self.tunnel, outcome)
        self.result.callback(outcome)


def _record(tunnel: Tunnel, hello: ClientHello) -> None:
    """The access log's ``sni`` and ``alpn_offered`` fields (docs/logging.md)."""
    if hello.server_name is not None:
        tunnel.details["sni"] = hello.server_name
    if hello.alpn:
        offered = (protocol.decode("ascii", "backslashreplace") for protocol in hello.alpn)
        tunnel.details["alpn_offered"] = ",".join(offered)


class SniMode(Mode):
    """Routes TLS clients by the server name of their ClientHello, relaying their bytes untouched."""

    name = "sni"

    def __init__(self, settings: SniSettings) -> None:
        self.settings = settings

    def identify(self, tunnel: Tunnel) -> Deferred[ClientHello]:
        return _HelloReader(tunnel, self.settings).begin()

    def route(self, tunnel: Tunnel, request: ClientHello) -> Route:
        picked = self.settings.routes.pick(request.server_name, request.alpn)
        if picked is not None:
            match, group = picked
            tunnel.details["route"] = str(match)
            return Route(group)
        if self.settings.default is not None:
            tunnel.details["route"] = "default"
            return Route(self.settings.default)
        if request.server_name is None:
            raise TLSRefused("no SNI and no default backend", UNRECOGNIZED_NAME)
        raise TLSRefused(
            f"no route for SNI {request.server_name!r} and no default backend", UNRECOGNIZED_NAME
        )

    def refuse(self, tunnel: Tunnel, refused: Refused) -> None:
        """A TLS alert when the client speaks TLS and the cause has one, then the close."""
        tunnel.disarm("header")
        tunnel.client.intercept(_discard)
        if isinstance(refused, TLSRefused):
            alert = refused.alert
        else:  # no backend connected (a timeout reading the hello sends nothing)
            alert = INTERNAL_ERROR if refused.status >= 500 else None
        client = tunnel.client
        if alert is not None and not client.lost:
            client.transport.write(alert_record(alert))
        tunnel.fail(refused.reason, refused.kind)
