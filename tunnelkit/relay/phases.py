"""The phases of a connection on Twisted's plane: admit, identify, route, connect, relay, record.

Every connection goes through the same named phases, whatever its mode:

admit
    :meth:`TunnelFactory.buildProtocol <tunnelkit.relay.factory.TunnelFactory.buildProtocol>`:
    the client policy and the connection cap.
identify
    :meth:`Mode.identify`: read what the mode must know before it can choose
    (a CONNECT request head; a SOCKS greeting, a ClientHello or a PROXY header
    next), under one deadline. Plain forwarding reads nothing.
route
    :meth:`Mode.route`: choose where the connection goes, as a :class:`Route`
    to a backend group, applying the mode's policy (authentication, the
    target policy and its one name lookup). It may wait; it may refuse.
connect
    :meth:`BackendGroup.dial <tunnelkit.backends.group.BackendGroup.dial>`:
    the group's strategy orders the attempts, each bounded by the connect
    timeout; a client that leaves cancels the attempt in flight.
relay
    :meth:`Tunnel.join <tunnelkit.relay.tunnel.Tunnel.join>` (after
    :meth:`Mode.established`, which tells the client, as CONNECT's ``200``).
record
    the factory's ``_ended``: the access log, then the registry.

A phase that refuses raises :class:`Refused`; :meth:`Mode.refuse` answers in
the mode's own words (an HTTP status for CONNECT, a close for forwarding)
and the tunnel ends with the refusal's reason. Modes plug in at identify
and route only, so no mode imports another, and a new mode is a
:class:`Mode` subclass (see docs/architecture.md). On the native engine the
same phases run in C for plain forwarding (``admit`` asks the same client
policy, the record comes back to the same access log).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.backends.group import BackendGroup, BackendsUnavailable, Dialed
from tunnelkit.relay.tunnel import CloseKind, Leg, Tunnel

log = Logger(namespace="tunnelkit.phases")

#: Response headers of a refusal (CONNECT's ``Proxy-Authenticate``).
Headers = tuple[tuple[str, str], ...]


class Refused(Exception):
    """A phase ends the connection: ``reason`` and ``kind`` for the record, ``status`` for the client.

    ``status`` is an HTTP status code: CONNECT answers with it, and other
    modes map it to their own replies (a SOCKS reply code, say). ``cause``
    is the error behind a failed lookup or connect, for modes whose replies
    tell a refused connection from an unreachable network (SOCKS5).
    """

    def __init__(
        self,
        reason: str,
        kind: CloseKind = CloseKind.ERROR,
        *,
        status: int = 502,
        headers: Headers = (),
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.status = status
        self.headers = headers
        self.cause = cause


@attrs.frozen
class Handoff:
    """What an identify phase that only dispatches finds: the mode to go on with.

    ``--mode auto`` peeks at the first bytes and hands the connection to the
    mode they name; from then on that mode identifies (``identifying``, what
    its :meth:`Mode.identify` returned), routes, answers and refuses.
    """

    mode: Mode
    identifying: Deferred[Any] | None


@attrs.frozen
class Route:
    """Where a connection goes: the backend group its connect phase dials."""

    group: BackendGroup


class Mode:
    """What a listener's mode decides; the phases call it in order (see the module docstring).

    Subclasses override :meth:`route`, and :meth:`identify` when the mode
    reads something first.
    """

    #: The record's ``mode`` detail; ``None``: not recorded (plain forwarding).
    name: str | None = None

    def identify(self, tunnel: Tunnel) -> Deferred[Any] | None:
        """Read what the mode needs first; ``None`` when it reads nothing."""
        return None

    def route(self, tunnel: Tunnel, request: Any) -> Route | Deferred[Route]:
        """Where ``request`` (what :meth:`identify` gave) goes; raise or fail with :class:`Refused`."""
        raise NotImplementedError

    def established(self, tunnel: Tunnel, backend: Leg) -> None:
        """``backend`` is connected and the relay begins: tell the client, if the mode does."""

    def refuse(self, tunnel: Tunnel, refused: Refused) -> None:
        """Answer a refusal in the mode's words and end the tunnel."""
        tunnel.fail(refused.reason, refused.kind)

    def overloaded(self) -> Protocol | None:
        """What a client gets at the connection cap; ``None``: a plain close."""
        return None


def time_left(tunnel: Tunnel, seconds: float) -> float:
    """What remains of a deadline of ``seconds`` from the client's accept.

    Everything read before the tunnel is joined (a PROXY header, then a
    CONNECT head, a SOCKS negotiation or a ClientHello) shares the one
    ``--header-timeout``: a client cannot buy time by sending each part
    just in time. Never 0, so that the timer still fires after the reads.
    """
    return max(seconds - (tunnel.now() - tunnel.started), 0.001)


#: Reads what comes before a listener's mode speaks (a PROXY protocol header):
#: ``None`` when nothing is to be read, else a Deferred that fires once read
#: (or fails with :class:`Refused`).
Preamble = Callable[[Tunnel], "Deferred[None] | None"]


class Connection:
    """One client's way through identify, route and connect, to the relay.

    A plain object with bound methods rather than nested closures: nothing
    refers to it once the phases are over, so it goes with the last
    Deferred that held it.
    """

    __slots__ = ("mode", "phase", "preamble", "tunnel")

    def __init__(self, tunnel: Tunnel, mode: Mode, preamble: Preamble | None = None) -> None:
        self.tunnel = tunnel
        self.mode = mode
        self.preamble = preamble
        self.phase = "identify"

    def start(self) -> None:
        """The client is connected (and its TLS handshake done): identify it.

        A listener's preamble (a PROXY protocol header it must read first)
        runs before the mode's own identify.
        """
        reading = self.preamble(self.tunnel) if self.preamble is not None else None
        if reading is None:
            self._identify(None)
        else:
            reading.addCallbacks(self._identify, self._failed)

    def _identify(self, _: object) -> None:
        self._identified_by(self.mode)
        identifying = self.mode.identify(self.tunnel)
        if identifying is None:
            self._route(None)
        else:
            identifying.addCallbacks(self._route, self._failed)

    def _route(self, request: Any) -> None:
        if isinstance(request, Handoff):
            self.mode = request.mode
            self._identified_by(request.mode)
            if request.identifying is not None:
                request.identifying.addCallbacks(self._route, self._failed)
                return
            request = None
        self.phase = "route"
        try:
            route = self.mode.route(self.tunnel, request)
        except Exception:
            self._failed(Failure())
            return
        if isinstance(route, Deferred):
            route.addCallbacks(self._connect, self._failed)
        else:
            self._connect(route)

    def _identified_by(self, mode: Mode) -> None:
        if mode.name is not None:
            self.tunnel.details["mode"] = mode.name

    def _connect(self, route: Route) -> None:
        self.phase = "connect"
        dial_backend(self.tunnel, route.group).addCallbacks(self._relay, self._not_connected)

    def _relay(self, dialed: Dialed) -> None:
        self.phase = "relay"
        backend: Any = dialed.protocol  # the leg _BackendLegFactory built
        self.mode.established(self.tunnel, backend)
        join_dialed(self.tunnel, dialed)

    def _not_connected(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the client left; the relay has already accounted for it
        self.tunnel.connect_failed = True  # for the listener's counters
        reason, kind = why_not_connected(failure)
        status = 504 if kind is CloseKind.TIMEOUT else 502
        if isinstance(failure.value, BackendsUnavailable):
            self.tunnel.attempts = len(failure.value.errors)
            if not failure.value.errors:
                status = 503  # every backend is down: nothing was tried
        self.mode.refuse(self.tunnel, Refused(reason, kind, status=status, cause=failure.value))

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        if isinstance(failure.value, Refused):
            self.mode.refuse(self.tunnel, failure.value)
            return
        # A bug, not bad input: log it and reset the tunnel rather than leak it.
        log.failure(
            "connection handling failed in phase {phase}",
            failure,
            event="phase_error",
            phase=self.phase,
        )
        self.tunnel.abort("internal error", CloseKind.ERROR)


# -- connect ----------------------------------------------------------------


class _BackendLegFactory(Factory):
    """Builds the backend leg of one tunnel for each connection attempt.

    A TLS backend's connection keeps this factory (as its wrapper's) while it
    lives, and the tunnel keeps that connection's leg: once the dial is over
    the factory lets go of the tunnel, so that no cycle outlives the tunnel.
    """

    noisy = False

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel: Tunnel | None = tunnel

    def buildProtocol(self, addr: IAddress | None) -> Leg:
        assert self.tunnel is not None, "a backend connected after its dial was over"
        return self.tunnel.backend_leg()

    def dial_over(self, result: _T) -> _T:
        self.tunnel = None
        return result


_T = TypeVar("_T")


def dial_backend(tunnel: Tunnel, group: BackendGroup) -> Deferred[Dialed]:
    """Dial a backend leg for ``tunnel``; the client leaving cancels the attempt."""
    legs = _BackendLegFactory(tunnel)
    client = tunnel.client_peer() if group.by_client else None
    dialing = group.dial(legs, client)
    dialing.addBoth(legs.dial_over)
    tunnel.pending = dialing
    return dialing


def join_dialed(tunnel: Tunnel, dialed: Dialed) -> None:
    """Relay between the client and the backend leg that ``dialed`` connected."""
    tunnel.backend_name = tunnel.backend_name or dialed.backend.name
    tunnel.attempts = dialed.attempts
    if dialed.group is not None:
        tunnel.dialed = dialed  # released when the tunnel ends (the factory's record phase)
        dialed.group.attach(dialed, tunnel)
    leg: Any = dialed.protocol
    tunnel.join(leg)


def why_not_connected(failure: Failure) -> tuple[str, CloseKind]:
    """The log reason and close kind for a failed dial."""
    error = failure.value
    if isinstance(error, BackendsUnavailable):
        if not error.errors:
            return "no backend available", CloseKind.ERROR
        kind = CloseKind.TIMEOUT if error.timed_out else CloseKind.ERROR
        return f"no backend connected: {error}", kind
    return f"backend connect failed: {failure.getErrorMessage()}", CloseKind.ERROR
