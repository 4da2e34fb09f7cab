"""The engine's per-client table (C) holds the rules of Twisted's plane's (Python), step for step.

One script of accepts, tunnel ends and clock steps runs on
``_engine.ClientTable`` (its ``admit``/``release`` take the time, as the
engine's accept path passes ``now()``) and on
:class:`tunnelkit.policy.client_limits.ClientTable` with a fake clock: the
verdicts, the ``client_limited`` lines due and the clients remembered must be
the same at every step. The socket suites (tests/relay/test_client_limits_sockets.py)
prove each plane end to end.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.policy.client_limits import LOG_INTERVAL, ClientLimits, ClientTable

engine = pytest.importorskip("tunnelkit.engine._engine")


def tables(limits: ClientLimits, tracked: int) -> tuple[Any, ClientTable, Clock]:
    clock = Clock()
    native = engine.ClientTable(
        max_conn=limits.max_conn,
        rate=limits.rate,
        burst=limits.burst,
        tracked=tracked,
        log_interval=LOG_INTERVAL,
    )
    return native, ClientTable(limits, clock, "l", tracked=tracked), clock


def packed(n: int) -> bytes:
    return socket.inet_aton(f"10.0.0.{n}")


steps = st.lists(
    st.tuples(st.sampled_from(["admit", "admit", "release", "tick"]), st.integers(0, 5)),
    max_size=80,
)
limit_sets = st.sampled_from(
    [ClientLimits(2, 0.0, 0), ClientLimits(0, 1.0, 2), ClientLimits(1, 4.0, 3)]
)


@given(limit_sets, st.integers(1, 4), steps)
def test_the_engine_table_keeps_the_python_rules(
    limits: ClientLimits, tracked: int, script: list[tuple[str, int]]
) -> None:
    """Any accepts, ends and clock steps: the same verdicts, log lines and memory in C and in Python."""
    native, python, clock = tables(limits, tracked)
    lines: list[LogEvent] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        live: dict[int, int] = {}
        for op, n in script:
            if op == "tick":
                clock.advance(n * LOG_INTERVAL / 7)
            elif op == "admit":
                del lines[:]
                verdict, due = native.admit(packed(n), clock.seconds())
                assert python.admit(f"10.0.0.{n}", "c") == verdict
                said = [e["refused"] for e in lines if e.get("event") == "client_limited"]
                assert said == ([due] if due else [])
                live[n] = live.get(n, 0) + (verdict is None)
            elif live.get(n):
                live[n] -= 1
                native.release(packed(n), clock.seconds())
                python.release(f"10.0.0.{n}")
            assert len(native) == len(python)
    finally:
        globalLogPublisher.removeObserver(lines.append)


def test_an_ipv4_mapped_address_is_the_ipv4_client() -> None:
    """::ffff:10.0.0.1 and 10.0.0.1 are one client; another IPv6 address of the same /64 is another."""
    native, _, _ = tables(ClientLimits(1, 0.0, 0), 8)
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
    assert native.admit(packed(1), 0.0) == (None, 0)
    assert native.admit(mapped, 0.0) == ("connections", 1)
    first, neighbour = (socket.inet_pton(socket.AF_INET6, f"2001:db8::{n}") for n in (1, 2))
    assert native.admit(first, 0.0)[0] is None
    assert native.admit(neighbour, 0.0)[0] is None
    assert native.admit(first, 0.0)[0] == "connections"
    assert len(native) == 3


def test_bad_limits_are_refused() -> None:
    """A negative limit, a rate without a burst and an empty table are errors that say so."""
    for bad in ({"max_conn": -1}, {"rate": 1.0}, {"tracked": 0}, {"rate": float("nan")}):
        with pytest.raises(ValueError):
            engine.ClientTable(**bad)
