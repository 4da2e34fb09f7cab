"""How a backend group picks one backend for an attempt: the strategies of ``--balance``.

Each strategy chooses among *candidates* (the backends a connection may
try now: available, not yet tried by it; the group decides which, see
:mod:`tunnelkit.backends.group`) and keeps what it needs between picks in the
backends' :class:`Load` or in itself. The native engine implements the same
rules in C (``pick()`` in ``_engine.c``); the source hash is the same
function there, so a client reaches the same backend from any worker and on
either plane.

Weights are in :data:`WEIGHT_SCALE` units, so that a slow start can ramp a
weight-1 backend up by steps.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Sequence
from typing import Protocol

import attrs

#: The strategies, as ``--balance`` names them (the engine's ``BALANCES``).
NAMES = ("round-robin", "least-conn", "random", "source-hash", "first")

#: One unit of configured weight, in the weights the strategies compare.
WEIGHT_SCALE = 16

_MASK = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: the engine's hash of names and client addresses."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _MASK
    return h


def mix64(x: int) -> int:
    """splitmix64's finalizer: spreads the bits of a combined key."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def client_key(host: str | None) -> int:
    """The source hash's key of a client: its IP address alone (no port; IPv4-mapped as IPv4)."""
    if host is None:
        return fnv1a64(b"")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return fnv1a64(b"")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return fnv1a64(address.packed)


def rendezvous_score(client: int, key: int, weight: int) -> float:
    """Weighted rendezvous hashing: the highest score wins, and removing one backend moves only its clients."""
    u = ((mix64(client ^ key) >> 11) + 0.5) * 2.0**-53
    return -weight / math.log(u)


@attrs.define(eq=False, slots=True)
class Load:
    """What the strategies read of one backend: its weight now, its connections, its hash key."""

    #: In :data:`WEIGHT_SCALE` units; lowered during a slow start, 0 while drained.
    weight: int
    #: The hash of the backend's name (the source hash's key).
    key: int
    #: Connections attempting or relaying now.
    active: int = 0
    #: Smooth weighted round-robin's running weight.
    current: int = 0


class Strategy(Protocol):
    """Picks one of ``candidates`` (indexes into ``loads``, ascending, never empty)."""

    def pick(self, loads: Sequence[Load], candidates: Sequence[int], client: int) -> int: ...


class First:
    """The first candidate: ordered failover (HAProxy's ``balance first``)."""

    def pick(self, loads: Sequence[Load], candidates: Sequence[int], client: int) -> int:
        return candidates[0]


class RoundRobin:
    """Smooth weighted round-robin (nginx's): equal weights rotate exactly, heavier ones interleave."""

    def pick(self, loads: Sequence[Load], candidates: Sequence[int], client: int) -> int:
        total = 0
        best = candidates[0]
        for i in candidates:
            load = loads[i]
            load.current += load.weight
            total += load.weight
            if load.current > loads[best].current:
                best = i
        loads[best].current -= total
        return best


def _lighter(a: Load, b: Load) -> bool:
    """Whether ``a`` has fewer connections per unit of weight than ``b``."""
    return a.active * b.weight < b.active * a.weight


class LeastConn:
    """The fewest connections per weight; ties spread by a cursor that moves on each pick."""

    def __init__(self) -> None:
        self.cursor = 0

    def pick(self, loads: Sequence[Load], candidates: Sequence[int], client: int) -> int:
        count = len(candidates)
        start = self.cursor % count
        self.cursor += 1
        best = candidates[start]
        for step in range(1, count):
            i = candidates[(start + step) % count]
            if _lighter(loads[i], loads[best]):
                best = i
        return best


class PowerOfTwo:
    """Two candidates drawn by weight; the one with fewer connections per weight wins."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.random = rng or random.Random()

    def _draw(self, loads: Sequence[Load], candidates: Sequence[int], skip: int) -> int:
        pool = [i for i in candidates if i != skip]
        total = sum(loads[i].weight for i in pool)
        point = self.random.random() * total
        for i in pool:
            point -= loads[i].weight
            if point < 0:
                return i
        return pool[-1]

    def pick(self, loads: Sequence[Load], candidates: Sequence[int], client: int) -> int:
        if len(candidates) == 1:
            return candidates[0]
        first = self._draw(loads, candidates, -1)
        second = self._draw(loads, candidates, first)
        return second if _lighter(loads[second], loads[first]) else first


class SourceHash:
    """Weighted rendezvous hashing of the client's address: a client stays on its backend."""

    def pick(self, loads: Sequence[Load], candidates: Sequence[int], client: int) -> int:
        return max(
            candidates, key=lambda i: (rendezvous_score(client, loads[i].key, loads[i].weight), -i)
        )


def strategy(name: str, rng: random.Random | None = None) -> Strategy:
    """A fresh strategy for ``--balance name`` (each group keeps its own state)."""
    strategies: dict[str, Strategy] = {
        "first": First(),
        "round-robin": RoundRobin(),
        "least-conn": LeastConn(),
        "random": PowerOfTwo(rng),
        "source-hash": SourceHash(),
    }
    return strategies[name]
