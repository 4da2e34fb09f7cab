"""The route phase of the proxy modes: who the client is, whether it may go there, and how.

CONNECT and SOCKS5 read different requests but must decide the same way, or
one of them becomes the way around the other's policy. Both hand the host
and port their client asked for to one :class:`ProxyRouter`, which:

1. checks the client's user name and password against ``--auth-file``
   (bcrypt, in a thread, on every request, never cached), when asked to;
2. applies the destination policy (:mod:`tunnelkit.policy.targets`) with one
   name lookup whose answer is the only one used (DNS rebinding: the checked
   addresses are the dialled ones);
3. returns a :class:`~tunnelkit.relay.phases.Route` to a backend group of
   those addresses (or of ``--to``, after the same check).

A refusal is a :class:`~tunnelkit.relay.phases.Refused` with an HTTP status
(403 policy, 502 no address, 504 lookup timeout) and, for a failed lookup,
the :class:`~tunnelkit.backends.resolver.ResolveError` as its cause: each
mode answers it in its own words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime

from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.backends.resolver import IPAddress, Resolve, ResolveError
from tunnelkit.policy.targets import Decision, Refusal, TargetPolicy
from tunnelkit.relay.phases import Refused, Route
from tunnelkit.relay.tunnel import CloseKind, Tunnel

#: ``authenticate(user, password)`` fires with whether they match.
Authenticate = Callable[[str, str], Deferred[bool]]


@attrs.frozen
class ProxySettings:
    """Everything a proxy listener (CONNECT or SOCKS5) decides with, built once from the options.

    ``fixed`` dials the ``--to`` backends instead of the requested target (the
    target is still checked); ``outbound`` is the reactor the target endpoints
    connect with (the socket-option-tuned one); ``header_timeout`` bounds
    everything the mode reads before it routes, from the accept.
    """

    policy: TargetPolicy
    resolve: Resolve
    outbound: Any
    connect_timeout: float
    header_timeout: float
    authenticate: Authenticate | None = None
    fixed: BackendGroup | None = None


def _refusal(decision: Decision) -> Refused:
    refusal = decision.refusal
    assert refusal is not None
    if refusal is Refusal.NO_ADDRESS:
        no_address = ResolveError("target has no address")
        return Refused(str(no_address), status=502, cause=no_address)
    shown = decision.refused_address or decision.target
    why = f"target refused by policy: {refusal.value}"
    if decision.rule is not None:
        why += f" ({decision.rule})"
    return Refused(f"{why}: {shown}:{decision.port}", status=403)


class ProxyRouter:
    """The shared route phase of the proxy modes (see the module docstring)."""

    def __init__(self, settings: ProxySettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock

    @property
    def authenticates(self) -> bool:
        """True when clients must give a user name and password (``--auth-file``)."""
        return self.settings.authenticate is not None

    def check_user(self, tunnel: Tunnel, user: str, password: str) -> Deferred[bool]:
        """Whether ``user`` and ``password`` match; the record names the user, never the password.

        The check is the tunnel's pending work: a client that leaves cancels it.
        """
        check = self.settings.authenticate
        assert check is not None, "check_user() without --auth-file"
        tunnel.details["user"] = user
        pending = check(user, password)
        tunnel.pending = pending
        return pending

    async def route(self, tunnel: Tunnel, host: str, port: int) -> Route:
        """The group to dial for ``host:port``, once the policy allows it; raises :class:`Refused`."""
        decision = await self._decide(tunnel, host, port)
        settings = self.settings
        group = settings.fixed or BackendGroup(
            [self._backend(address, port) for address in decision.addresses],
            self.clock,
            settings.connect_timeout,
        )
        return Route(group)

    async def _decide(self, tunnel: Tunnel, host: str, port: int) -> Decision:
        policy = self.settings.policy
        decision = policy.precheck(host, port)
        if decision is None:
            resolving = self.settings.resolve(host, port)
            resolving.addTimeout(self.settings.connect_timeout, self.clock)
            tunnel.pending = resolving
            try:
                addresses = await resolving
            except ResolveError as e:
                raise Refused(str(e), status=502, cause=e) from None
            except TimeoutError:
                raise Refused(
                    f"resolving {host!r} timed out", CloseKind.TIMEOUT, status=504
                ) from None
            decision = policy.decide(host, port, addresses)
        if not decision.allowed:
            raise _refusal(decision)
        return decision

    def _backend(self, address: IPAddress, port: int) -> Backend:
        endpoint = host_endpoint(
            self.settings.outbound, str(address), port, self.settings.connect_timeout
        )
        name = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return Backend(name, endpoint)
