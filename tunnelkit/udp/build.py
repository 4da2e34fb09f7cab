"""From a ``udp:`` listener's settings to what the service listens on.

:func:`load` runs in :func:`tunnelkit.app.build.prepare` (endpoints made,
backend names resolved, every problem collected); :func:`listening` in
:func:`tunnelkit.app.build.build_service`: one session table per listening
socket, the listener's backends, counters and balancing shared by them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IStreamServerEndpoint

from tunnelkit.app.service import Listening, Monitor
from tunnelkit.backends import resolver
from tunnelkit.backends.health import HealthChecker
from tunnelkit.config.addresses import HostPort
from tunnelkit.config.model import ListenerSettings, Settings
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.socket_options import SocketOptions
from tunnelkit.udp.health import UdpHealthTarget
from tunnelkit.udp.relay import ListeningProtocol, UdpEndpoint, backend_opener
from tunnelkit.udp.sessions import (
    BackendChoice,
    SessionTable,
    UdpBackend,
    UdpCounters,
    log_session_closed,
)

if TYPE_CHECKING:
    from tunnelkit.app.build import Listener, _Problems

#: Said in the ``engine`` start-up line of every UDP listener.
WHY_TWISTED = "UDP runs on Twisted's plane (docs/udp.md)"


def load(
    listener: ListenerSettings, settings: Settings, reactor: Any, problems: _Problems
) -> Listener | None:
    """The listener's endpoints and backends (names resolved now); ``None`` if it has problems."""
    from tunnelkit.app.build import Listener

    assert listener.udp is not None
    backends: list[UdpBackend] = []
    for index, spec in enumerate(listener.backends):
        address = spec.address
        assert isinstance(address, HostPort)
        try:
            found = resolver.lookup(address.host, address.port)
        except resolver.ResolveError as e:
            problems.add(("to", index), str(e))
            continue
        for ip in found:
            name = spec.text if len(found) == 1 else f"{spec.text} ({ip})"
            backends.append(UdpBackend(name, str(ip), address.port, spec.weight, spec.backup))
    if problems.found:
        return None
    endpoints = tuple(
        (text, cast(IStreamServerEndpoint, UdpEndpoint(reactor, host, port, settings.workers)))
        for text, (host, port) in zip(listener.listen, listener.udp.addresses, strict=True)
    )
    return Listener(
        listener, endpoints, (), (), None, None, None, WHY_TWISTED, udp_backends=tuple(backends)
    )


def listening(
    reactor: Any, listener: Listener, registry: TunnelRegistry
) -> tuple[list[Listening], list[Monitor]]:
    """What the service listens on for ``listener`` (one session table per socket), and its health checks."""
    settings = listener.settings
    udp = settings.udp
    assert udp is not None
    choice = BackendChoice(listener.udp_backends, settings.balancing.strategy)
    counters = UdpCounters()
    open_backend = backend_opener(reactor)

    def make_protocol(name: str) -> ListeningProtocol:
        return ListeningProtocol(
            lambda reply: SessionTable(
                clock=reactor,
                settings=udp,
                choice=choice,
                open_backend=open_backend,
                reply=reply,
                registry=registry,
                clients=settings.clients,
                listener=name,
                record=log_session_closed if settings.access_log else None,
                counters=counters,
            )
        )

    ports = [
        Listening(name, endpoint, make_protocol, SocketOptions(), None)  # type: ignore[arg-type]
        for name, endpoint in listener.endpoints
    ]
    if settings.health is None:
        return ports, []
    target = UdpHealthTarget(choice, reactor, settings.name)
    return ports, [HealthChecker(target, settings.health)]
