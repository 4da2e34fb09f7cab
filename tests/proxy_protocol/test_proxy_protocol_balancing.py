"""The address a trusted proxy's header carries is the one source-hash balancing hashes."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tunnelkit.config.model import Timeouts
from tunnelkit.relay.phases import dial_backend
from tunnelkit.relay.tunnel import Tunnel


class HashingGroup:
    """A group balancing by client (``source-hash``) that notes the client it was given."""

    by_client = True

    def __init__(self) -> None:
        self.clients: list[IAddress | None] = []

    def dial(self, factory: IProtocolFactory, client: IAddress | None = None) -> Deferred[Any]:
        self.clients.append(client)
        return Deferred()


def test_source_hash_hashes_the_carried_address() -> None:
    """With a carried address the group is given it; without one, the socket's peer."""
    tunnel = Tunnel(MemoryReactorClock(), Timeouts(), lambda tunnel, record: None, 4096)
    socket_peer = IPv4Address("TCP", "127.0.0.1", 5000)
    tunnel.client.makeConnection(StringTransport(peerAddress=socket_peer))
    group: Any = HashingGroup()
    dial_backend(tunnel, group)
    carried = IPv4Address("TCP", "203.0.113.7", 4242)
    tunnel.peer_override = carried
    dial_backend(tunnel, group)
    assert group.clients == [socket_peer, carried]
