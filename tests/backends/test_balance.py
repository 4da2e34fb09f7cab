"""The strategies of --balance, in memory: which backend each pick chooses."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest

from tunnelkit.backends import balance
from tunnelkit.backends.balance import Load, client_key, fnv1a64, mix64


def loads(*weights: int) -> list[Load]:
    return [Load(w, fnv1a64(f"b{i}".encode())) for i, w in enumerate(weights)]


def picks(strategy: balance.Strategy, state: list[Load], count: int, client: int = 0) -> list[int]:
    everyone = list(range(len(state)))
    return [strategy.pick(state, everyone, client) for _ in range(count)]


def test_hashes_are_the_engines() -> None:
    """FNV-1a and splitmix64 as the engine computes them (known vectors)."""
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert mix64(0) == 0
    assert client_key("::ffff:10.0.0.1") == client_key("10.0.0.1") == fnv1a64(bytes([10, 0, 0, 1]))
    assert client_key(None) == client_key("not an address") == fnv1a64(b"")


def test_round_robin_rotates_exactly() -> None:
    """Equal weights: a, b, c, d, a, b, ..."""
    assert picks(balance.RoundRobin(), loads(1, 1, 1, 1), 8) == [0, 1, 2, 3, 0, 1, 2, 3]


def test_round_robin_interleaves_weights() -> None:
    """nginx's smooth weighted round-robin: 5, 1, 1 gives a a b a c a a."""
    assert picks(balance.RoundRobin(), loads(5, 1, 1), 7) == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_skips_who_is_not_a_candidate() -> None:
    """A backend that may not be tried is passed over; the rotation goes on among the others."""
    strategy, state = balance.RoundRobin(), loads(1, 1, 1)
    assert [strategy.pick(state, [0, 2], 0) for _ in range(4)] == [0, 2, 0, 2]


def test_least_conn_takes_the_least_loaded_per_weight() -> None:
    """Active connections per weight decide; ties spread over the tied ones."""
    state = loads(1, 1, 2)
    state[0].active, state[1].active, state[2].active = 3, 1, 3
    assert picks(balance.LeastConn(), state, 3) == [1, 1, 1]
    tied = loads(1, 1, 1)
    assert sorted(picks(balance.LeastConn(), tied, 3)) == [0, 1, 2]


def test_power_of_two_prefers_the_idle_one() -> None:
    """Of two backends drawn, the one with fewer connections wins; idle backends all get some."""
    state = loads(1, 1, 1, 1)
    state[0].active = 100
    chosen = Counter(picks(balance.PowerOfTwo(random.Random(7)), state, 400))
    assert chosen[0] == 0 and all(chosen[i] > 50 for i in (1, 2, 3)), chosen


def test_power_of_two_draws_by_weight() -> None:
    """A weight-3 backend is drawn about three times as often when loads are equal."""
    chosen = Counter(picks(balance.PowerOfTwo(random.Random(3)), loads(3, 1), 2000))
    # With two candidates both are always drawn; the tie goes to the first drawn.
    assert 1300 < chosen[0] < 1700, chosen


def _clients(count: int) -> list[int]:
    return [client_key(str(ipaddress.IPv4Address(0x0A000000 + i))) for i in range(count)]


def test_source_hash_moves_only_the_removed_backends_clients() -> None:
    """Consistent hashing: with one of four backends gone, only its clients change backend."""
    strategy, state = balance.SourceHash(), loads(1, 1, 1, 1)
    before = {c: strategy.pick(state, [0, 1, 2, 3], c) for c in _clients(2000)}
    after = {c: strategy.pick(state, [0, 1, 3], c) for c in _clients(2000)}
    moved = {c for c in before if before[c] != after[c]}
    assert moved == {c for c in before if before[c] == 2}
    assert 350 < len(moved) < 650, len(moved)  # about a quarter


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (3, 1, 1, 1)])
def test_source_hash_shares_by_weight(weights: tuple[int, ...]) -> None:
    """Each backend gets its weight's share of the client addresses."""
    strategy, state = balance.SourceHash(), loads(*weights)
    chosen = Counter(strategy.pick(state, [0, 1, 2, 3], c) for c in _clients(6000))
    for i, weight in enumerate(weights):
        expected = 6000 * weight / sum(weights)
        assert abs(chosen[i] - expected) < expected * 0.15, chosen


def test_first_is_ordered_failover() -> None:
    """The first candidate, every time."""
    strategy, state = balance.First(), loads(1, 1, 1)
    assert [strategy.pick(state, [1, 2], 0) for _ in range(3)] == [1, 1, 1]
