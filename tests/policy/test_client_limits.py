"""Per-client limits in memory: the token bucket on a fake clock, the live-tunnel count, bounded memory, the log.

Twisted's plane's :class:`ClientTable` is tested here with
``twisted.internet.task.Clock``; the same rules in the engine's C table are
proved over real sockets on both planes (tests/relay/test_client_limits_sockets.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.cli.plugin import Options
from tunnelkit.config.model import ConfigError
from tunnelkit.config.toml_file import load
from tunnelkit.policy.client_limits import (
    LOG_INTERVAL,
    ClientLimits,
    ClientTable,
    client_key,
    parse_rate,
)


def table(
    max_conn: int = 0, rate: float = 0.0, burst: int = 0, tracked: int = 100
) -> tuple[ClientTable, Clock]:
    clock = Clock()
    return ClientTable(ClientLimits(max_conn, rate, burst), clock, "l", tracked=tracked), clock


TYPES = frozenset({"tcp", "unix"})


@pytest.fixture
def limited_lines() -> Any:
    """The ``client_limited`` events logged during the test."""
    seen: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("event") == "client_limited":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("20", 20.0), ("20/s", 20.0), ("600/m", 10.0), (" 1.5 / s ", 1.5), (2.5, 2.5)],
)
def test_rates_are_read_per_second(text: object, rate: float) -> None:
    """A rate is N or N/s per second, N/m per minute; a TOML number is per second."""
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["0", "-1", "x", "5/h", "nan", "inf", "/s", True, None])
def test_bad_rates_are_refused(text: object) -> None:
    """Zero, negative, not finite, unknown units and non-numbers are not rates."""
    with pytest.raises((ValueError, TypeError)):
        parse_rate(text)


def settings(*args: str) -> Any:
    options = Options()
    options.parseOptions(["--listen", "8888", "--to", "127.0.0.1:80", *args])
    return options.settings


def test_the_burst_defaults_to_a_seconds_worth() -> None:
    """--rate-per-client 20 lets 20 through at once; 30/m one; --max-conn-per-client alone has no bucket."""
    [listener] = settings("--rate-per-client", "20").listeners
    assert listener.client_limits == ClientLimits(0, 20.0, 20)
    [listener] = settings("--rate-per-client", "30/m", "--max-conn-per-client", "3").listeners
    assert listener.client_limits == ClientLimits(3, 0.5, 1)
    [listener] = settings("--rate-per-client", "2", "--rate-burst", "7").listeners
    assert listener.client_limits == ClientLimits(0, 2.0, 7)
    [listener] = settings().listeners
    assert listener.client_limits is None


def test_the_limits_in_a_file(tmp_path: Path) -> None:
    """A listener table takes the same keys: a rate as a number or a string; a burst without a rate is a problem."""
    path = tmp_path / "tk.toml"
    path.write_text(
        '[[listener]]\nlisten = ["8888"]\nto = ["127.0.0.1:80"]\n'
        'max-conn-per-client = 4\nrate-per-client = "120/m"\n'
        '[[listener]]\nlisten = ["8889"]\nto = ["127.0.0.1:80"]\nrate-per-client = 0.5\n'
        '[[listener]]\nlisten = ["8890"]\nto = ["127.0.0.1:80"]\nrate-burst = 3\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(str(path), TYPES)
    assert [p.in_file() for p in caught.value.problems] == [
        "listener[2].rate-burst: needs rate-per-client"
    ]
    path.write_text(path.read_text().rsplit("[[listener]]", 1)[0])
    first, second = load(str(path), TYPES).listeners
    assert (first.client_limits, second.client_limits) == (
        ClientLimits(4, 2.0, 2),
        ClientLimits(0, 0.5, 1),
    )


def test_the_bucket_refills_at_the_rate() -> None:
    """Burst 3 at 1/s: three at once, the fourth refused; one more each second, never more than the burst."""
    clients, clock = table(rate=1.0, burst=3)
    assert [clients.admit("a", "a:1") for _ in range(4)] == [None, None, None, "rate"]
    clock.advance(1.0)
    assert [clients.admit("a", "a:1") for _ in range(2)] == [None, "rate"]
    clock.advance(0.5)
    assert clients.admit("a", "a:1") == "rate"
    clock.advance(3600)
    assert [clients.admit("a", "a:1") for _ in range(4)] == [None, None, None, "rate"]
    assert clients.admit("b", "b:1") is None  # per client


def test_live_tunnels_are_counted_until_released() -> None:
    """Two live tunnels at --max-conn-per-client 2: the third is refused until one ends."""
    clients, _ = table(max_conn=2)
    assert [clients.admit("a", "a:1") for _ in range(3)] == [None, None, "connections"]
    assert clients.admit("b", "b:1") is None
    clients.release("a")
    assert clients.admit("a", "a:1") is None
    assert clients.admit("a", "a:1") == "connections"


def test_an_attempt_the_bucket_lets_through_takes_a_token() -> None:
    """A client refused at its concurrency limit still used a token (as HAProxy's sc_conn_rate counts it)."""
    clients, _ = table(max_conn=1, rate=1.0, burst=3)
    assert [clients.admit("a", "a:1") for _ in range(4)] == [
        None,
        "connections",
        "connections",
        "rate",
    ]


def test_a_flood_of_addresses_keeps_memory_bounded() -> None:
    """10,000 addresses each opening and closing one tunnel leave at most `tracked` clients remembered."""
    clients, _ = table(rate=1.0, burst=5, tracked=16)
    for n in range(10_000):
        key = f"10.0.{n // 256}.{n % 256}"
        assert clients.admit(key, key) is None
        clients.release(key)
        assert len(clients) <= 16
    assert len(clients) == 16


def test_clients_with_live_tunnels_are_never_forgotten() -> None:
    """A flood of other addresses does not make a client's live tunnels forgotten."""
    clients, _ = table(max_conn=1, rate=1.0, burst=5, tracked=4)
    assert clients.admit("a", "a:1") is None
    for n in range(100):
        assert clients.admit(f"b{n}", "b") is None
        clients.release(f"b{n}")
    assert clients.admit("a", "a:1") == "connections"
    assert len(clients) == 5
    clients.release("a")


def test_clients_as_good_as_new_are_forgotten() -> None:
    """Without a rate, a client is forgotten with its last tunnel; with one, once its bucket is full again."""
    clients, _ = table(max_conn=2)
    clients.admit("a", "a:1")
    assert len(clients) == 1
    clients.release("a")
    assert len(clients) == 0
    clients, clock = table(rate=2.0, burst=4)
    clients.admit("a", "a:1")
    clients.release("a")
    clock.advance(0.4)  # 0.8 tokens back of 1: still remembered
    clients.admit("b", "b:1")
    clients.release("b")
    assert len(clients) == 2
    clock.advance(2.0)
    clients.admit("c", "c:1")
    clients.release("c")
    assert len(clients) == 1


def test_one_line_per_client_per_interval(limited_lines: list[LogEvent]) -> None:
    """50 refusals make one client_limited line; the next interval's line counts those left unsaid."""
    clients, clock = table(max_conn=1)
    clients.admit("a", "a:1")
    for _ in range(50):
        assert clients.admit("a", "a:2") == "connections"
    assert [(e["client"], e["limit"], e["refused"]) for e in limited_lines] == [
        ("a:2", "connections", 1)
    ]
    clock.advance(LOG_INTERVAL)
    clients.admit("a", "a:3")
    assert [(e["limit"], e["refused"]) for e in limited_lines][1:] == [("connections", 50)]
    assert limited_lines[0]["listener"] == "l"


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (IPv4Address("TCP", "192.0.2.7", 1), "192.0.2.7"),
        (IPv6Address("TCP", "::ffff:192.0.2.7", 1), "192.0.2.7"),
        (IPv6Address("TCP", "2001:db8::1", 1), "2001:db8::1"),
        (IPv6Address("TCP", "fe80::1%eth0", 1), "fe80::1"),
        (UNIXAddress(b"/run/x.sock"), None),
        (None, None),
    ],
)
def test_a_client_is_its_address(address: Any, key: str | None) -> None:
    """The key is the IP address without the port (IPv4-mapped as IPv4, IPv6 whole); UNIX peers are not limited."""
    assert client_key(address) == key


operations = st.lists(
    st.tuples(st.sampled_from(["admit", "release", "tick"]), st.integers(0, 7)), max_size=60
)


@given(operations)
def test_the_table_counts_like_a_model(ops: list[tuple[str, int]]) -> None:
    """Any admits, releases and clock steps: live tunnels per client as a model counts them, memory bounded."""
    clients, clock = table(max_conn=2, rate=1.0, burst=2, tracked=3)
    live: dict[str, int] = {}
    for op, n in ops:
        key = f"c{n}"
        if op == "tick":
            clock.advance(n / 4)
        elif op == "admit":
            if clients.admit(key, key) is None:
                live[key] = live.get(key, 0) + 1
            assert live.get(key, 0) <= 2
        elif live.get(key):
            clients.release(key)
            live[key] -= 1
        held = sum(1 for count in live.values() if count)
        assert len(clients) <= 3 + held
