"""What each listener counts, on either plane, readable without the access log.

The same fields are counted by the native engine in C (per listener index,
see ``COUNTERS`` in ``tunnelkit/engine/_engine.c`` and
:meth:`tunnelkit.engine.driver.NativeRelay.counters`) and by Twisted's
relay in :class:`tunnelkit.relay.factory.TunnelFactory` (its
:attr:`~tunnelkit.relay.factory.TunnelFactory.counters`); a test holds the
engine's names to these fields and runs one scenario on both planes.
"""

from __future__ import annotations

import attrs


@attrs.define
class ListenerCounters:
    """One listener's counts since it started (a listener with several endpoints: add them up).

    Every client is counted once as accepted or as refused for one reason;
    an accepted client's tunnel is counted in :attr:`active` until it ends,
    and then its bytes, and whether it failed to connect or to handshake.
    """

    #: Clients admitted: past the client policy, the per-client limits and the connection
    #: cap, a tunnel began (with ``--accept-proxy-protocol``, the limits apply to the
    #: address the header carries, after this count: such a refusal is counted in both).
    accepted: int = 0
    #: Clients closed at once because ``--allow-client``/``--deny-client`` refused them.
    refused_client_policy: int = 0
    #: Clients closed at once because ``--max-connections`` tunnels were live.
    refused_connection_limit: int = 0
    #: Clients accepted with the reserved descriptor and closed at once, for want of one
    #: (the engine only: Twisted's port closes those without telling the factory).
    refused_out_of_fds: int = 0
    #: Clients closed at once because their address had ``--max-conn-per-client``
    #: tunnels live on this listener (:mod:`tunnelkit.policy.client_limits`).
    refused_client_connections: int = 0
    #: Clients closed at once because their address's ``--rate-per-client`` bucket was empty.
    refused_client_rate: int = 0
    #: Tunnels live now: accepted and not yet ended.
    active: int = 0
    #: Bytes relayed from clients to backends by the tunnels that ended (as their records say).
    bytes_up: int = 0
    #: Bytes relayed from backends to clients by the tunnels that ended.
    bytes_down: int = 0
    #: Tunnels that ended because no backend connected: every attempt was refused,
    #: failed or timed out (not a client that left while its backend connected).
    connect_failures: int = 0
    #: TLS clients whose handshake did not complete: failed, refused, timed out, or
    #: the client left first (as :attr:`tunnelkit.tls.server.ServerTLS.handshake_failures`).
    tls_failures: int = 0

    def __add__(self, other: ListenerCounters) -> ListenerCounters:
        """The counts of two listeners (or endpoints) together."""
        mine, theirs = attrs.astuple(self), attrs.astuple(other)
        return ListenerCounters(*(a + b for a, b in zip(mine, theirs, strict=True)))
