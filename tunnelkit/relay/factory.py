"""What every listener does with a new client, whatever its mode: the admit and record phases.

A :class:`TunnelFactory` admits or refuses the client (client policy, the
per-client limits, the connection cap), makes its :class:`Tunnel`, runs it through its mode's
phases (:class:`~tunnelkit.relay.phases.Connection`) once the client is
connected, and logs the record when it ends; it counts each of those steps
in its :attr:`TunnelFactory.counters`. Modes only say how the backend is
found (:class:`~tunnelkit.relay.phases.Mode`): forward dials the configured
backends, CONNECT reads a request first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from tunnelkit.config.model import Timeouts
from tunnelkit.logs.tunnel_log import log_tunnel_closed
from tunnelkit.policy.client_limits import ClientTable, client_key
from tunnelkit.policy.targets import ClientPolicy
from tunnelkit.relay.counters import ListenerCounters
from tunnelkit.relay.idle_watch import IdleWatch
from tunnelkit.relay.phases import Connection, Mode, Preamble, Refused
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.splice import PipePool
from tunnelkit.relay.tunnel import CloseKind, Leg, Tunnel, TunnelRecord, describe

log = Logger(namespace="tunnelkit.listener")


class TunnelFactory(Factory):
    """Accepts clients on one listener and runs each through ``mode``'s phases."""

    noisy = False

    def __init__(
        self,
        *,
        mode: Mode,
        listener: str,
        registry: TunnelRegistry,
        clock: IReactorTime,
        timeouts: Timeouts,
        read_size: int,
        clients: ClientPolicy | None = None,
        write_through: bool = True,
        client_leg: Callable[[Tunnel], Leg] | None = None,
        idle_watch: IdleWatch | None = None,
        tunnel_log: Callable[[TunnelRecord, str], None] = log_tunnel_closed,
        pipes: PipePool | None = None,
        preamble: Preamble | None = None,
        proxies: ClientPolicy | None = None,
        proxy_header: Callable[[Tunnel], bytes] | None = None,
        client_limits: ClientTable | None = None,
    ) -> None:
        self.mode = mode
        #: The listener's per-client limits (shared by its endpoints' factories), if any.
        self.client_limits = client_limits
        #: What is read before the mode's identify phase (a PROXY header), if anything.
        self.preamble = preamble
        #: ``--trusted-proxies``: the only IP peers admitted; the client policy
        #: then applies to the address their PROXY header carries (see the preamble).
        self.proxies = proxies
        #: ``--proxy-protocol``: makes the header each backend gets first.
        self.proxy_header = proxy_header
        self.listener = listener
        self.registry = registry
        self.clock = clock
        self.timeouts = timeouts
        self.read_size = read_size
        self.clients = clients or ClientPolicy()
        #: What this listener counted on Twisted's plane (the engine counts its own).
        self.counters = ListenerCounters()
        self.write_through = write_through
        self.client_leg = client_leg
        self.idle_watch = idle_watch
        self.tunnel_log = tunnel_log
        self.pipes = pipes
        # Bound once: every tunnel keeps these two, and a bound method made
        # per tunnel is 64 bytes of each idle connection.
        self._on_ended = self._ended
        self._on_connected = self.start

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        """A new client leg, or ``None`` (the port closes the socket) if refused."""
        counters = self.counters
        if not (self.client_allowed(addr) if self.proxies is None else self.proxy_trusted(addr)):
            counters.refused_client_policy += 1
            return None
        tunnel = Tunnel(
            self.clock,
            self.timeouts,
            self._on_ended,
            self.read_size,
            write_through=self.write_through,
            client_leg=self.client_leg,
            idle_watch=self.idle_watch,
            pipes=self.pipes,
        )
        if self.proxies is None and not self._within_limits(tunnel, addr):
            return None
        if not self.registry.admit(tunnel):
            counters.refused_connection_limit += 1
            self._release(tunnel)
            return self.overloaded()
        counters.accepted += 1
        counters.active += 1
        if self.pipes is not None:
            self.pipes.make_room()
        tunnel.on_client_connected = self._on_connected
        if self.proxy_header is not None:
            tunnel.proxy_header = self.proxy_header
        return tunnel.client

    def client_allowed(self, addr: IAddress | None) -> bool:
        """``--allow-client``/``--deny-client`` for IP peers; UNIX peers pass (file modes guard them)."""
        return self._passes(self.clients, addr, "refused by the client policy")

    def proxy_trusted(self, addr: IAddress | None) -> bool:
        """Whether an IP peer is one of ``--trusted-proxies`` (UNIX peers pass, as above)."""
        assert self.proxies is not None
        return self._passes(
            self.proxies,
            addr,
            "refused: not one of --trusted-proxies, whose PROXY headers are read",
        )

    def _passes(self, policy: ClientPolicy, addr: IAddress | None, refusal: str) -> bool:
        if not policy.restricts or not isinstance(addr, IPv4Address | IPv6Address):
            return True
        if policy.allows(ipaddress.ip_address(addr.host.split("%", 1)[0])):
            return True
        log.info(
            "client {client} {refusal}",
            event="client_refused",
            listener=self.listener,
            client=f"{addr.host}:{addr.port}",
            refusal=refusal,
        )
        return False

    def limit_carried(self, tunnel: Tunnel) -> Refused | None:
        """The per-client limits for the client a trusted proxy's PROXY header named (``--accept-proxy-protocol``)."""
        if self._within_limits(tunnel, tunnel.client_peer()):
            return None
        return Refused("client over its per-client limit", CloseKind.ERROR, status=429)

    def _within_limits(self, tunnel: Tunnel, peer: IAddress | None) -> bool:
        """Take a slot for ``tunnel`` in the per-client limits, or count the refusal."""
        table = self.client_limits
        key = client_key(peer) if table is not None else None
        if key is None:
            return True
        assert table is not None
        refusal = table.admit(key, describe(peer))
        if refusal is None:
            tunnel.client_key = key
            return True
        if refusal == "rate":
            self.counters.refused_client_rate += 1
        else:
            self.counters.refused_client_connections += 1
        return False

    def _release(self, tunnel: Tunnel) -> None:
        key = tunnel.client_key
        if key is not None:
            tunnel.client_key = None
            assert self.client_limits is not None
            self.client_limits.release(key)

    def overloaded(self) -> Protocol | None:
        """What a client gets when the connection cap is reached: the mode says."""
        return self.mode.overloaded()

    def start(self, tunnel: Tunnel) -> None:
        """The client is connected: identify, route, connect, relay."""
        Connection(tunnel, self.mode, self.preamble).start()

    def _ended(self, tunnel: Tunnel, record: TunnelRecord) -> None:
        # Logged before the registry hears of it: the last discard of a drain
        # lets shutdown go on, and the log is flushed then.
        self.tunnel_log(record, self.listener)
        counters = self.counters
        counters.active -= 1
        counters.bytes_up += record.bytes_up
        counters.bytes_down += record.bytes_down
        counters.connect_failures += tunnel.connect_failed
        counters.tls_failures += tunnel.client.handshake_failed
        self._release(tunnel)
        dialed = tunnel.dialed
        if dialed is not None:
            tunnel.dialed = None
            assert dialed.group is not None
            dialed.group.release(dialed, tunnel)
        self.registry.discard(tunnel)
