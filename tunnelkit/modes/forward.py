"""Plain forward mode: every client is relayed to the listener's backends, nothing read first."""

from __future__ import annotations

from tunnelkit.backends.group import BackendGroup
from tunnelkit.relay.phases import Mode, Route
from tunnelkit.relay.tunnel import Tunnel


class ForwardMode(Mode):
    """Identifies nothing; routes every client to the same backend group."""

    def __init__(self, group: BackendGroup) -> None:
        self.route_all = Route(group)

    def route(self, tunnel: Tunnel, request: None) -> Route:
        return self.route_all
