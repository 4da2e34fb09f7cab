"""A proxy mode (CONNECT, SOCKS5) on a memory reactor, with a scripted resolver and authenticator."""

from __future__ import annotations

import ipaddress
from typing import Any

from transports import HalfCloseTransport, MemoryListener
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock

from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.backends.resolver import IPAddress
from tunnelkit.modes.proxy_route import ProxySettings
from tunnelkit.policy.targets import TargetPolicy

#: A globally routable address (documentation ranges are not "global"); only
#: ever handed to a memory reactor, never dialled.
PUBLIC = ipaddress.ip_address("93.184.216.34")
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class ProxyHarness:
    """A listener of :attr:`mode` (a proxy mode class) and one client, all in memory.

    Name lookups answer from :attr:`answers` in turn (first ``PUBLIC``, then
    ``LOOPBACK``), or fail or hang as asked; each credential check waits for
    the test to fire :attr:`pending_auth`.
    """

    mode: Any

    def __init__(
        self,
        policy: TargetPolicy | None = None,
        *,
        auth: bool = False,
        resolve_error: Exception | None = None,
        resolve_hangs: bool = False,
        fixed: str | None = None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.lookups: list[tuple[str, int]] = []
        self.answers: list[list[IPAddress]] = [[PUBLIC], [LOOPBACK]]
        self.auth_checks: list[tuple[str, str]] = []
        self.pending_auth: Deferred[bool] | None = None
        self.resolve_error = resolve_error
        self.resolve_hangs = resolve_hangs
        settings = ProxySettings(
            policy=policy or TargetPolicy(),
            resolve=self.resolve,
            outbound=self.reactor,
            connect_timeout=5.0,
            header_timeout=10.0,
            authenticate=self.authenticate if auth else None,
            fixed=None
            if fixed is None
            else BackendGroup(
                [Backend(fixed, host_endpoint(self.reactor, fixed, 6379, 5.0))], self.reactor, 5.0
            ),
        )
        self.listener = MemoryListener(self.mode(settings, self.reactor), self.reactor)
        self.registry = self.listener.registry
        self.records = self.listener.records
        self.leg, self.client = self.listener.client()

    def resolve(self, host: str, port: int) -> Deferred[list[IPAddress]]:
        self.lookups.append((host, port))
        if self.resolve_hangs:
            return Deferred()
        if self.resolve_error is not None:
            return fail(self.resolve_error)
        return succeed(self.answers.pop(0))

    def authenticate(self, user: str, password: str) -> Deferred[bool]:
        self.auth_checks.append((user, password))
        self.pending_auth = Deferred()
        return self.pending_auth

    def send(self, data: bytes) -> None:
        self.leg.dataReceived(data)

    def connect_backend(self, local: IPv4Address | None = None) -> HalfCloseTransport:
        """Complete the outbound connection the proxy started (from ``local``); return its transport."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        transport = HalfCloseTransport(
            peerAddress=IPv4Address("TCP", host, port),
            hostAddress=local or IPv4Address("TCP", "10.0.0.1", 1234),
        )
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        transport.protocol = protocol
        return transport

    def dialled(self) -> list[tuple[str, int]]:
        """Every address the proxy started to connect to."""
        return [c[:2] for c in self.reactor.tcpClients]
