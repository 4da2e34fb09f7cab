"""``--admin``: its port, opened before ``twistd`` daemonizes, served until the drain is over.

The port is refused on an address beyond loopback unless ``--admin-token``
is given (the metrics name backends and clients' traffic; the token guards
them). It keeps answering while the process drains, so an orchestrator sees
``/healthz`` turn 503 and Prometheus the last tunnels end, and closes once
the service it watches has stopped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.admin.history import History
from tunnelkit.admin.site import AdminResource, AdminSite, Source
from tunnelkit.app.service import claim_unix_lock
from tunnelkit.config.model import ConfigError, Problem
from tunnelkit.relay.tunnel import describe

log = Logger(namespace="tunnelkit.admin")


def listen(
    description: str,
    source: Source,
    token: bytes | None,
    reactor: Any,
    history: Callable[[], dict[str, Any]] = dict,
) -> IListeningPort:
    """Listen on the admin endpoint now; :class:`ConfigError` if it cannot, or may not."""
    site = AdminSite(AdminResource(source, token, history))
    outcome: list[Any] = []
    try:
        endpoint = serverFromString(reactor, description)
    except ValueError as e:
        raise ConfigError([Problem(("admin",), f"{{admin}}: {e}")]) from None
    endpoint.listen(site).addBoth(outcome.append)
    if not outcome or isinstance(outcome[0], Failure):
        why = outcome[0].getErrorMessage() if outcome else "it did not start synchronously"
        raise ConfigError([Problem(("admin",), f"{{admin}}: cannot listen: {why}")])
    port: IListeningPort = outcome[0]
    bound = port.getHost()
    if token is None and not _local(bound):
        port.stopListening()
        raise ConfigError(
            [
                Problem(
                    ("admin",),
                    f"{{admin}} listens on {describe(bound)}, beyond this machine:"
                    " give {admin-token} FILE, or a loopback address (127.0.0.1:PORT)",
                )
            ]
        )
    log.info(
        "admin endpoint on {address}{guard}",
        event="admin_listening",
        address=describe(bound),
        guard=" (token required)" if token is not None else "",
    )
    return port


def _local(address: Any) -> bool:
    """A loopback address, or a UNIX socket (its file's modes guard it)."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return True
    return ipaddress.ip_address(address.host.split("%", 1)[0]).is_loopback


def serve(
    description: str, main: IService, source: Source, token: bytes | None, reactor: Any
) -> AdminService:
    """``main`` with the admin endpoint beside it, listening now (see :func:`listen`), and its history."""
    history = History(source, reactor)
    service = AdminService(main, listen(description, source, token, reactor, history.to_json))
    history.setServiceParent(service)  # type: ignore[no-untyped-call]
    return service


class AdminService(MultiService):
    """Runs ``main`` (the tunnels, or the workers) and serves the admin port until it has stopped."""

    def __init__(self, main: IService, port: IListeningPort) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.port = port
        main.setServiceParent(self)

    def startService(self) -> None:
        claim_unix_lock(self.port)
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[Any] = super().stopService()  # type: ignore[no-untyped-call]
        return stopped.addBoth(lambda _: self.port.stopListening())
