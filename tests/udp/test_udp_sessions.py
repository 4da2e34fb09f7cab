"""The UDP session table in memory: a fake clock, fake backend sockets, no network."""

from __future__ import annotations

import errno

import attrs
import pytest
from twisted.internet.testing import Clock
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.backends.balance import client_key
from tunnelkit.policy.targets import ClientPolicy
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.udp.limits import PRUNE_AT, SourceLimits
from tunnelkit.udp.sessions import (
    Address,
    BackendChoice,
    Oversized,
    Session,
    SessionRecord,
    SessionTable,
    UdpBackend,
)
from tunnelkit.udp.settings import UdpSettings

CLIENT = ("192.0.2.1", 4000)


class FakeSocket:
    """A session's backend socket that keeps what was sent; ``limit`` makes larger datagrams oversized."""

    def __init__(self, session: Session, limit: int) -> None:
        self.session = session
        self.limit = limit
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, datagram: bytes) -> None:
        if len(datagram) > self.limit:
            raise Oversized()
        self.sent.append(datagram)

    def close(self) -> None:
        self.closed = True


@attrs.define
class Harness:
    """A table, its clock and everything it did."""

    clock: Clock
    table: SessionTable
    sockets: list[FakeSocket]
    replies: list[tuple[bytes, Address]]
    records: list[SessionRecord]

    def socket_of(self, client: Address) -> FakeSocket:
        socket = self.table.sessions[client].socket
        assert isinstance(socket, FakeSocket)
        return socket


def harness(
    *,
    backends: int = 1,
    strategy: str = "round-robin",
    max_sessions: int = 1000,
    clients: ClientPolicy | None = None,
    limit: int = 65507,
    **settings: object,
) -> Harness:
    clock = Clock()
    sockets: list[FakeSocket] = []
    replies: list[tuple[bytes, Address]] = []
    records: list[SessionRecord] = []

    def open_backend(session: Session) -> FakeSocket:
        sockets.append(FakeSocket(session, limit))
        return sockets[-1]

    choice = BackendChoice(
        tuple(UdpBackend(f"b{i}", f"10.0.0.{i}", 53) for i in range(backends)), strategy
    )
    table = SessionTable(
        clock=clock,
        settings=UdpSettings(addresses=(("127.0.0.1", 0),), **settings),  # type: ignore[arg-type]
        choice=choice,
        open_backend=open_backend,
        reply=lambda datagram, client: replies.append((datagram, client)),
        registry=TunnelRegistry(clock, max_sessions),
        clients=clients or ClientPolicy(),
        listener="udp:5353",
        record=lambda record, listener: records.append(record),
    )
    return Harness(clock, table, sockets, replies, records)


def test_datagrams_pass_whole_and_in_order_and_replies_go_to_their_client() -> None:
    """Each datagram is sent on alone and in order; a reply goes back to the client that opened the session."""
    h = harness()
    datagrams = [bytes([i]) * (i + 1) for i in range(20)]
    for datagram in datagrams:
        h.table.datagram(datagram, CLIENT)
    assert h.socket_of(CLIENT).sent == datagrams
    h.table.sessions[CLIENT].from_backend(b"answer")
    assert h.replies == [(b"answer", CLIENT)]


def test_a_session_per_client_address() -> None:
    """Two ports of one host are two sessions, each with its own backend socket."""
    h = harness()
    h.table.datagram(b"a", ("192.0.2.1", 1))
    h.table.datagram(b"b", ("192.0.2.1", 2))
    h.table.datagram(b"c", ("192.0.2.1", 1))
    assert [s.sent for s in h.sockets] == [[b"a", b"c"], [b"b"]]


def test_idle_timeout_ends_the_session_with_its_record() -> None:
    """A session ends after udp-idle-timeout without a datagram either way, and its record counts both ways."""
    h = harness(idle_timeout=60.0)
    h.table.datagram(b"12345", CLIENT)
    h.clock.advance(59)
    h.table.sessions[CLIENT].from_backend(b"123")  # traffic either way restarts the clock
    h.clock.advance(59)
    assert CLIENT in h.table.sessions
    h.clock.advance(1)
    assert CLIENT not in h.table.sessions
    assert h.sockets[0].closed
    [record] = h.records
    assert (record.datagrams_up, record.bytes_up, record.datagrams_down, record.bytes_down) == (
        1,
        5,
        1,
        3,
    )
    assert record.reason == "idle timeout"
    assert record.duration == 119
    assert record.client == "192.0.2.1:4000"
    assert (record.backend, record.backend_address) == ("b0", "10.0.0.0:53")
    assert h.table.registry.live() == 0


def test_replies_limit_ends_the_session_after_the_nth_reply() -> None:
    """udp-replies 1: the first reply goes back and ends the session; the next datagram opens a new one."""
    h = harness(replies=1)
    h.table.datagram(b"query", CLIENT)
    h.table.sessions[CLIENT].from_backend(b"answer")
    assert h.replies == [(b"answer", CLIENT)]
    assert [r.reason for r in h.records] == ["1 reply"]
    h.table.datagram(b"query 2", CLIENT)
    assert len(h.sockets) == 2


def test_icmp_port_unreachable_ends_the_session_and_is_counted() -> None:
    """The backend's host refusing (ICMP port unreachable) ends the session at once."""
    h = harness()
    h.table.datagram(b"x", CLIENT)
    h.table.sessions[CLIENT].refused()
    assert h.table.counters.backend_refused == 1
    assert [r.reason for r in h.records] == ["backend refused (ICMP port unreachable)"]


def test_oversized_datagrams_are_counted_and_dropped_with_one_log_line() -> None:
    """A datagram the path cannot take is dropped, counted in the record, and logged once per session."""
    h = harness(limit=100)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h.table.datagram(b"x" * 101, CLIENT)
        h.table.datagram(b"y" * 10, CLIENT)
        h.table.datagram(b"z" * 200, CLIENT)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert h.socket_of(CLIENT).sent == [b"y" * 10]
    assert [e["size"] for e in events if e.get("event") == "udp_datagram_oversized"] == [101]
    assert h.table.counters.oversized == 2
    h.table.end_all("shutdown")
    assert h.records[0].oversized == 2
    assert h.records[0].datagrams_up == 1


def test_max_connections_counts_sessions() -> None:
    """The process's cap refuses a new session once as many are live; an ended one frees its place."""
    h = harness(max_sessions=2)
    for port in (1, 2, 3):
        h.table.datagram(b"x", ("192.0.2.1", port))
    assert len(h.table.sessions) == 2
    assert h.table.counters.refused == {"connection_limit": 1}
    h.table.sessions[("192.0.2.1", 1)].end("test")
    h.table.datagram(b"x", ("192.0.2.1", 3))
    assert len(h.table.sessions) == 2


def test_session_cap_per_source_under_a_flood_of_source_ports() -> None:
    """One address sending from many ports opens at most udp-sessions-per-source sessions (and sockets)."""
    h = harness(sessions_per_source=8, session_rate=1000)
    for port in range(1000, 1500):
        h.table.datagram(b"x", ("192.0.2.1", port))
    assert len(h.sockets) == 8
    assert h.table.counters.refused == {"sessions_per_source": 492}
    h.table.datagram(b"x", ("192.0.2.2", 1000))  # another address is not held back
    assert len(h.sockets) == 9


def test_session_rate_per_source() -> None:
    """New sessions of one address beyond udp-session-rate per second are refused until tokens come back."""
    h = harness(idle_timeout=0.01, session_rate=5)
    for port in range(10):
        h.table.datagram(b"x", ("192.0.2.1", port))
    assert len(h.sockets) == 5
    assert h.table.counters.refused == {"session_rate": 5}
    h.clock.advance(0.4)  # two tokens
    for port in range(10, 20):
        h.table.datagram(b"x", ("192.0.2.1", port))
    assert len(h.sockets) == 7


def test_client_policy_refuses_without_a_socket() -> None:
    """A client the policy denies opens nothing."""
    h = harness(clients=ClientPolicy.from_options(deny=["192.0.2.0/24"]))
    h.table.datagram(b"x", CLIENT)
    assert h.sockets == []
    assert h.table.counters.refused == {"client_policy": 1}


def test_a_failed_socket_gives_back_what_the_session_took() -> None:
    """A backend socket that cannot be opened refuses the datagram and leaves no session counted."""
    h = harness()

    def fail(session: Session) -> FakeSocket:
        raise OSError(24, "Too many open files")

    h.table.open_backend = fail
    h.table.datagram(b"x", CLIENT)
    assert h.table.counters.refused == {"socket": 1}
    assert h.table.registry.live() == 0
    assert h.table.choice.loads[0].active == 0
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize("strategy", ["source-hash", "round-robin", "least-conn"])
def test_sessions_are_balanced(strategy: str) -> None:
    """Sessions spread over the backends with --balance's strategies; source-hash keeps an address on one."""
    h = harness(backends=3, strategy=strategy, idle_timeout=1.0, session_rate=100)
    for port in range(30):
        h.table.datagram(b"x", ("192.0.2.7", port))
    used = {s.session.backend.name for s in h.sockets}
    if strategy == "source-hash":
        assert len(used) == 1
        h.clock.advance(2)  # the sessions end; the address comes back to the same backend
        h.table.datagram(b"x", ("192.0.2.7", 99))
        assert h.sockets[-1].session.backend.name in used
    else:
        assert used == {"b0", "b1", "b2"}
        assert [load.active for load in h.table.choice.loads] == [10, 10, 10]


def test_source_buckets_are_pruned_under_spoofed_addresses() -> None:
    """A flood of distinct addresses leaves no unbounded state: full buckets of idle addresses are forgotten."""
    clock = Clock()
    limits = SourceLimits(clock, per_source=4, rate=10)
    for i in range(3 * PRUNE_AT):
        host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert limits.refusal(host) is None
        limits.released(host)
        clock.advance(1)
    assert len(limits._buckets) < PRUNE_AT
    assert client_key("10.0.0.1") != client_key("10.0.0.2")


def test_backends_down_and_backups() -> None:
    """Backends the health checks took down get no session; backups only while no primary is up; none up refuses."""
    backends = (
        UdpBackend("a", "10.0.0.1", 53),
        UdpBackend("b", "10.0.0.2", 53),
        UdpBackend("spare", "10.0.0.3", 53, backup=True),
    )
    choice = BackendChoice(backends, "round-robin")
    assert {choice.pick("192.0.2.1") for _ in range(4)} == {0, 1}
    choice.set_up(0, False)
    assert {choice.pick("192.0.2.1") for _ in range(4)} == {1}
    choice.set_up(1, False)
    assert {choice.pick("192.0.2.1") for _ in range(4)} == {2}
    choice.set_up(2, False)
    assert choice.pick("192.0.2.1") is None
    choice.set_up(0, True)
    assert choice.pick("192.0.2.1") == 0


def test_no_backend_up_refuses_and_gives_back_the_source_slot() -> None:
    """With every backend down a datagram opens nothing, and the client's per-source slot is not used up."""
    h = harness(sessions_per_source=1)
    h.table.choice.set_up(0, False)
    h.table.datagram(b"x", CLIENT)
    assert h.table.counters.refused == {"no_backend": 1}
    h.table.choice.set_up(0, True)
    h.table.datagram(b"x", CLIENT)
    assert len(h.sockets) == 1


def test_an_icmp_error_learnt_while_sending_ends_the_session_once() -> None:
    """A send that reports the backend's refusal (Twisted calls connectionRefused from write) ends the session; nothing is counted as sent."""
    h = harness()
    h.table.datagram(b"first", CLIENT)
    socket = h.socket_of(CLIENT)
    socket.send = lambda datagram: socket.session.refused()  # type: ignore[method-assign]
    h.table.datagram(b"second", CLIENT)
    [record] = h.records
    assert (record.reason, record.datagrams_up) == ("backend refused (ICMP port unreachable)", 1)


def test_a_full_send_buffer_loses_the_datagram_only() -> None:
    """ENOBUFS/EAGAIN on a send drops that datagram, as UDP may; the session goes on."""
    h = harness()
    h.table.datagram(b"first", CLIENT)
    socket = h.socket_of(CLIENT)

    def full(datagram: bytes) -> None:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    socket.send = full  # type: ignore[method-assign]
    h.table.datagram(b"second", CLIENT)
    assert CLIENT in h.table.sessions and h.records == []
    assert h.table.sessions[CLIENT].up == [1, 5]
