"""Per-client limits: how many tunnels one client address may hold, and how fast it may open them.

``--max-conn-per-client N`` is nginx's ``limit_conn`` (HAProxy's
``sc_conn_cur``): a client address with N live tunnels on the listener has
its next connection closed at once. ``--rate-per-client R`` with
``--rate-burst B`` is a token bucket per client address (HAProxy's
``sc_conn_rate``, nginx's ``limit_req`` with ``burst ... nodelay``): B
connections at once, then R a second; a connection that finds the bucket
empty is closed at once. Every connection the bucket lets through takes a
token, also one that the concurrency limit or the process cap then refuses,
so a client that hammers stays refused until it slows down.

A client is its IP address (an IPv4-mapped IPv6 address is the IPv4 one),
without the port, as HAProxy's ``src`` and nginx's ``$binary_remote_addr``
key it: an IPv6 /64 is not grouped. UNIX peers are not limited (file modes
guard them). With ``--accept-proxy-protocol`` the client is the address the
trusted proxy's header carries.

Memory is bounded under a flood of source addresses: a client with no live
tunnel and a full bucket is forgotten (it is as good as new), and beyond
:data:`TRACKED` idle clients the least recently seen ones are forgotten
first; clients with live tunnels are kept, and there are at most as many of
those as the process's ``--max-connections``.

:class:`ClientTable` is Twisted's plane; the engine keeps the same table in
C (``ClientTable`` in ``tunnelkit/engine/_engine.c``), with the same rules.
Each listener has one table, shared by its endpoints, on an object a rebuilt
listener can be handed. With ``--workers N`` each worker counts its own
clients.
"""

from __future__ import annotations

import collections
import ipaddress
import math
from typing import Literal

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="tunnelkit.listener")

#: Idle clients (no live tunnel, a bucket not yet full) each table remembers at most.
TRACKED = 16384

#: Seconds between two ``client_limited`` lines about one client: a flood logs
#: one line per client per interval, with the count refused meanwhile.
LOG_INTERVAL = 10.0

#: Why a client was refused: its live tunnels (``connections``) or its rate.
Refusal = Literal["connections", "rate"]

_UNITS = {"s": 1.0, "m": 60.0}


def parse_rate(value: object) -> float:
    """Connections per second from ``20``, ``20/s`` or ``600/m`` (a TOML number too); raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    per = 1.0
    if isinstance(value, str):
        count, _, unit = value.strip().partition("/")
        if unit and unit.strip() not in _UNITS:
            raise ValueError(value)
        per = _UNITS[unit.strip()] if unit else 1.0
        value = float(count)
    rate = float(value) / per
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(value)
    return rate


@attrs.frozen
class ClientLimits:
    """A listener's per-client limits (0: none of that kind)."""

    #: Live tunnels one client address may have (``--max-conn-per-client``).
    max_conn: int = 0
    #: New connections per second (``--rate-per-client``).
    rate: float = 0.0
    #: Connections a full bucket lets through at once (``--rate-burst``).
    burst: int = 0

    @classmethod
    def from_options(
        cls, max_conn: int | None, rate: float | None, burst: int | None
    ) -> ClientLimits | None:
        """The limits the options ask for, or ``None`` for none; the burst defaults to a second's worth."""
        if not max_conn and not rate:
            return None
        default_burst = max(1, math.ceil(rate)) if rate else 0
        return cls(max_conn or 0, rate or 0.0, burst or default_burst)


def client_key(address: IAddress | None) -> str | None:
    """The table's key for a peer: its IP address, or ``None`` for a peer that is not limited."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    host = address.host.split("%", 1)[0]
    if isinstance(address, IPv6Address):
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        return str(mapped) if mapped is not None else host
    return host


class _Client:
    """What a table remembers of one client address."""

    __slots__ = ("active", "logged_at", "refused", "stamp", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.active = 0
        self.tokens = tokens
        self.stamp = now
        self.logged_at = -math.inf
        self.refused = 0


class ClientTable:
    """One listener's clients: their live tunnels and token buckets, in bounded memory.

    ``clock`` tells the time (the reactor; a ``Clock`` in tests). Clients with live tunnels are in
    :attr:`_clients` only; idle ones are also in :attr:`_idle`, least
    recently seen first, which is what is forgotten first.
    """

    def __init__(
        self, limits: ClientLimits, clock: IReactorTime, listener: str, tracked: int | None = None
    ) -> None:
        self.limits = limits
        self.seconds = clock.seconds
        self.listener = listener
        self.tracked = TRACKED if tracked is None else tracked
        self._clients: dict[str, _Client] = {}
        self._idle: collections.OrderedDict[str, _Client] = collections.OrderedDict()

    def __len__(self) -> int:
        """How many client addresses the table remembers now."""
        return len(self._clients)

    def admit(self, key: str, peer: str) -> Refusal | None:
        """Take a slot for a new tunnel of client ``key``, or say why not (and log it, rate-limited).

        ``peer`` is the client as the log line names it (``host:port``).
        """
        now = self.seconds()
        limits = self.limits
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(float(limits.burst), now)
        else:
            self._idle.pop(key, None)
        refusal = self._check(client, now)
        if refusal is None:
            client.active += 1
        else:
            self._refused(client, peer, refusal, now)
        self._settle(key, client, now)
        return refusal

    def release(self, key: str) -> None:
        """A tunnel of client ``key`` ended."""
        client = self._clients[key]
        client.active -= 1
        self._settle(key, client, self.seconds())

    def _check(self, client: _Client, now: float) -> Refusal | None:
        limits = self.limits
        if limits.rate:
            client.tokens = min(limits.burst, client.tokens + (now - client.stamp) * limits.rate)
            client.stamp = now
            if client.tokens < 1:
                return "rate"
            client.tokens -= 1
        if limits.max_conn and client.active >= limits.max_conn:
            return "connections"
        return None

    def _settle(self, key: str, client: _Client, now: float) -> None:
        """Put an idle client last in line to be forgotten; forget what is as good as new or too many."""
        if client.active:
            return
        self._idle[key] = client
        idle = self._idle
        while idle:
            oldest_key, oldest = next(iter(idle.items()))
            if len(idle) <= self.tracked and not self._as_new(oldest, now):
                break
            del idle[oldest_key], self._clients[oldest_key]

    def _as_new(self, client: _Client, now: float) -> bool:
        """Whether forgetting an idle client changes nothing: its bucket is full again."""
        limits = self.limits
        refilled = client.tokens + (now - client.stamp) * limits.rate
        return not limits.rate or refilled >= limits.burst

    def _refused(self, client: _Client, peer: str, refusal: Refusal, now: float) -> None:
        """Count the refusal; log it unless this client was logged less than LOG_INTERVAL ago."""
        client.refused += 1
        if now - client.logged_at < LOG_INTERVAL:
            return
        log_limited(self.listener, peer, refusal, self.limits, client.refused)
        client.logged_at, client.refused = now, 0


def log_limited(
    listener: str, peer: str, refusal: Refusal, limits: ClientLimits, refused: int
) -> None:
    """The ``client_limited`` line, on either plane: at most one per client per LOG_INTERVAL."""
    what = (
        f"--max-conn-per-client {limits.max_conn} reached"
        if refusal == "connections"
        else f"--rate-per-client {limits.rate:g}/s exceeded (burst {limits.burst})"
    )
    log.info(
        "client {client} refused: {what}; {refused} refused since the last line about it",
        event="client_limited",
        listener=listener,
        client=peer,
        limit=refusal,
        what=what,
        refused=refused,
    )
