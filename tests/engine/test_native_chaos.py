"""Chaos through one forwarder: clients and a backend that misbehave at random, and nothing breaks.

The native engine is C: a memory or bookkeeping bug there crashes or wedges
the whole proxy rather than one tunnel. Here a seeded :class:`random.Random`
plans many concurrent clients (full echo, reset, instant close, half-close,
urgent data, idling) against a backend whose behaviour the client names in
its first bytes (echo, slow echo, FIN then read, echo then reset, read then
close, reset at once). Pairs with a well-behaved backend must get their
exact bytes back both ways; every other pair may end any way but a hang, and
what it receives must be a prefix of what the backend sent. Afterwards no
tunnel is live, each accepted client has exactly one ``tunnel_closed``
record, and the process has its file descriptors back. ``TUNNELKIT_SOAK=1``
runs 5,000 clients, 250 at a time (beyond that the threaded backend's accept
loop falls behind on two cores and its SYNs are dropped, on either engine);
``TUNNELKIT_CHAOS_SEED=N`` replays another plan.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import pytest
from loopback import (
    LoopbackTestCase,
    MiB,
    ThreadedServer,
    connect,
    recv_exactly,
    reset,
    sha256,
)
from planes import ENGINE, ENGINE_NO_SPLICE, ENGINE_SPLICE, TWISTED, on_planes
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

SOAK = os.environ.get("TUNNELKIT_SOAK") == "1"
SEED = int(os.environ.get("TUNNELKIT_CHAOS_SEED", "20240611"))
#: Client behaviours in a run, and how many of them run at once.
CLIENTS, AT_ONCE = (5000, 250) if SOAK else (200, 200)
#: Timeout of each blocking socket call: well under the test's own.
IO_TIMEOUT = 10.0
#: Descriptors the process may hold after the run beyond those it held before.
FD_MARGIN = 4

Inline = Generator[Deferred[Any], Any, None]

#: The first bytes a client sends: the backend behaviour it asks for, and its number.
HEADER = struct.Struct("!BI")

ECHO, SLOW_ECHO, FIN_THEN_READ, ECHO_THEN_RESET, READ_THEN_CLOSE, RESET_AT_ONCE = range(6)
BACKEND_NAMES = ("echo", "slow echo", "FIN then read", "echo then RST", "read then close", "RST")
#: Backends that read to EOF and send all they mean to: their tunnels must be exact.
WELL_BEHAVED = {ECHO, SLOW_ECHO, FIN_THEN_READ}

FULL_ECHO, SEND_THEN_RESET, CLOSE_AT_ONCE, LITTLE_THEN_FIN, URGENT, IDLE_THEN_CLOSE = range(6)
CLIENT_NAMES = ("full echo", "send then reset", "close", "little then FIN", "urgent", "idle")
#: Clients that send a FIN and read until the backend's side ends.
READERS = {FULL_ECHO, LITTLE_THEN_FIN, URGENT}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def banner(number: int) -> bytes:
    return b"banner %d\n" % number


class Plan(NamedTuple):
    """One client: what it does, what it asks of the backend, and the seed of its bytes."""

    number: int
    kind: int
    backend: int
    seed: int
    delay: float

    def __str__(self) -> str:
        return f"client {self.number} ({CLIENT_NAMES[self.kind]} to {BACKEND_NAMES[self.backend]})"


def plans(rng: random.Random, count: int) -> list[Plan]:
    draw = rng.randrange
    return [Plan(n, draw(6), draw(6), rng.getrandbits(64), rng.random() / 2) for n in range(count)]


class ChaosBackend:
    """Backend: the client's header picks the behaviour; without one (the client left) a random one.

    :attr:`received` maps a client's number to the size and SHA-256 of all
    the backends that read to EOF got from it; :attr:`hangs` lists timeouts.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.received: dict[int, tuple[int, str]] = {}
        self.hangs: list[str] = []

    def __call__(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except TimeoutError as e:
            self.hangs.append(repr(e))
        except OSError:
            pass  # resets and broken pipes are what this backend is for

    def serve(self, conn: socket.socket) -> None:
        header = recv_exactly(conn, HEADER.size)
        with self.lock:
            rng = random.Random(self.rng.getrandbits(64))
        number = None
        kind = rng.randrange(6)
        if len(header) == HEADER.size:
            kind, number = HEADER.unpack(header)
        digest = hashlib.sha256(header)
        size = len(header)
        if kind == RESET_AT_ONCE:
            reset(conn)
            return
        if kind == READ_THEN_CLOSE:
            recv_exactly(conn, rng.randrange(64 * 1024))
            return
        if kind == FIN_THEN_READ:
            conn.sendall(banner(number or 0))
            conn.shutdown(socket.SHUT_WR)
        else:
            conn.sendall(header)
        limit = rng.randrange(256 * 1024) if kind == ECHO_THEN_RESET else None
        slow_reads = 200 if kind == SLOW_ECHO else 0
        while limit is None or size < limit:
            data = conn.recv(rng.randint(1, 2048) if slow_reads else 256 * 1024)
            if not data:
                break
            digest.update(data)
            size += len(data)
            if kind != FIN_THEN_READ:
                conn.sendall(data)
            if slow_reads:
                slow_reads -= 1
                time.sleep(0.001)
        if kind == ECHO_THEN_RESET:
            reset(conn)
            return
        if number is not None:
            self.received[number] = (size, digest.hexdigest())
        if kind != FIN_THEN_READ:
            conn.shutdown(socket.SHUT_WR)


class Outcome(NamedTuple):
    """What one client saw: its port (0 if it never connected) and what went wrong, if anything."""

    plan: Plan
    port: int
    failure: str | None
    sent: int = 0  # bytes a well-behaved backend must have read, and their SHA-256
    digest: str = ""
    reply: int = 0  # bytes it sent back


def expected_reply(plan: Plan, sent: bytes) -> bytes:
    """What the backend of ``plan`` sends back when it has read ``sent``."""
    if plan.backend == FIN_THEN_READ:
        return banner(plan.number)
    if plan.backend in (READ_THEN_CLOSE, RESET_AT_ONCE):
        return b""
    return sent


def send_and_read(sock: socket.socket, parts: list[bytes]) -> tuple[bytes, BaseException | None]:
    """Send ``parts`` (a one-byte part as urgent data) and a FIN from a thread; read until EOF here.

    Returns what came and the first error of either side, if any.
    """
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for part in parts:
                if len(part) == 1:
                    sock.send(part, socket.MSG_OOB)
                else:
                    sock.sendall(part)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks: list[bytes] = []
    try:
        while chunk := sock.recv(MiB):
            chunks.append(chunk)
    except OSError as e:
        errors.insert(0, e)
    sender.join(IO_TIMEOUT)
    if sender.is_alive():
        errors.insert(0, TimeoutError("the sender did not finish"))
    return b"".join(chunks), errors[0] if errors else None


def leave(sock: socket.socket, plan: Plan, rng: random.Random) -> None:
    """The clients that do not wait for a reply: close, idle then close, send then reset."""
    if plan.kind == IDLE_THEN_CLOSE:
        time.sleep(rng.uniform(0.01, 0.3))
    elif plan.kind == SEND_THEN_RESET:
        sock.sendall(HEADER.pack(plan.backend, plan.number) + rng.randbytes(rng.randrange(MiB)))
        reset(sock)


def reader_parts(plan: Plan, rng: random.Random) -> list[bytes]:
    """What a reading client sends before its FIN."""
    header = HEADER.pack(plan.backend, plan.number)
    if plan.kind == FULL_ECHO:
        return [header + rng.randbytes(int(2 ** rng.uniform(0, 21)))]
    if plan.kind == LITTLE_THEN_FIN:
        return [header + rng.randbytes(rng.randint(1, 1024))]
    head, tail = rng.randbytes(rng.randint(1, 64 * 1024)), rng.randbytes(rng.randint(2, 64 * 1024))
    return [header + head, b"!", tail]


def verdict(plan: Plan, port: int, parts: list[bytes], received: bytes, error: Any) -> Outcome:
    """Judge a reading client by what came back and how its exchange ended."""
    # Urgent data is stepped over, as recv does: it never reaches the backend.
    sent = b"".join(part for part in parts if len(part) > 1)
    expected = expected_reply(plan, sent)
    prefix = received == expected[: len(received)]
    failure = None
    if isinstance(error, TimeoutError):
        failure = f"hang: {error!r} after {len(received)} bytes"
    elif plan.backend in WELL_BEHAVED and (error is not None or received != expected):
        what = "a prefix" if prefix else "NOT a prefix"
        failure = f"not exact: {error!r}, {len(received)} of {len(expected)} bytes, {what}"
    elif not prefix:
        failure = f"{len(received)} bytes, not a prefix of the backend's {len(expected)}"
    if failure is not None or plan.backend not in WELL_BEHAVED:
        return Outcome(plan, port, failure)
    return Outcome(plan, port, None, len(sent), sha256(sent), len(expected))


def run_client(address: str, plan: Plan) -> Outcome:
    """Play ``plan`` against the forwarder at ``address``; never raises."""
    rng = random.Random(plan.seed)
    port = 0
    time.sleep(plan.delay)
    try:
        with connect(address, timeout=IO_TIMEOUT) as sock:
            port = sock.getsockname()[1]
            if plan.kind not in READERS:
                leave(sock, plan, rng)
                return Outcome(plan, port, None)
            parts = reader_parts(plan, rng)
            received, error = send_and_read(sock, parts)
    except TimeoutError as e:
        return Outcome(plan, port, f"hang: {e!r}")
    except OSError as e:  # a reset before the client's own is part of the game
        return Outcome(plan, port, None if port else f"connect: {e!r}")
    return verdict(plan, port, parts, received, error)


def run_clients(address: str, planned: list[Plan]) -> list[Outcome]:
    """Every plan, ``AT_ONCE`` at a time; a client that outlives its bounds counts as a hang."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=AT_ONCE)
    try:
        futures = {pool.submit(run_client, address, plan): plan for plan in planned}
        bound = IO_TIMEOUT * 3 + len(planned) / AT_ONCE * 5
        done, late = concurrent.futures.wait(futures, timeout=bound)
        return [f.result() for f in done] + [
            Outcome(futures[f], 0, "hang: never ended") for f in late
        ]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@inlineCallbacks
def poll(condition: Callable[[], object], timeout: float = 5.0) -> Generator[Any, Any, bool]:
    """Let the reactor run until ``condition()`` holds or ``timeout`` s pass; whether it held."""
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout
    while not condition() and reactor.seconds() < deadline:
        yield deferLater(reactor, 0.02, lambda: None)
    return bool(condition())


@on_planes(ENGINE, ENGINE_SPLICE, ENGINE_NO_SPLICE, TWISTED)
class ChaosTests(LoopbackTestCase):
    """Random clients and a random backend through one forwarder."""

    timeout = 900 if SOAK else 60

    @pytest.mark.soak
    @inlineCallbacks
    def test_random_clients_and_backend(self) -> Inline:
        """Random behaviours on both sides: exact bytes where due, no hang, no live tunnel, one record each, no fd leak."""
        rng = random.Random(SEED)
        planned = plans(rng, CLIENTS)
        fds_before = fd_count()
        behaviour = ChaosBackend(rng.getrandbits(64))
        backend = ThreadedServer(behaviour, backlog=1024)
        self.addCleanup(backend.close)
        fwd = self.forward("--to", backend.address)

        outcomes = yield deferToThread(run_clients, fwd.address, planned)
        failures = [f"{o.plan}, port {o.port}: {o.failure}" for o in outcomes if o.failure]
        assert not failures, f"seed {SEED}: {len(failures)} failed:\n" + "\n".join(failures)

        engine = fwd.service.native.engine if fwd.native else None
        drained = yield poll(lambda: (engine.active if engine else len(fwd.tunnels)) == 0)
        assert drained, f"live tunnels: {engine.tunnels() if engine else fwd.tunnels}"
        ports = Counter(o.port for o in outcomes)
        records = yield fwd.closed(len(outcomes), timeout=10)
        yield poll(lambda: False, 0.2)  # room for a duplicate record to show
        assert len(fwd.records) == len(outcomes), (len(fwd.records), len(outcomes))
        recorded = Counter(int(r["client"].rpartition(":")[2]) for r in records)
        assert recorded == ports, (recorded - ports, ports - recorded)

        # Both ways: what each well-behaved backend read, and what the record counted.
        exact = [o for o in outcomes if o.plan.kind in READERS and o.plan.backend in WELL_BEHAVED]
        got = yield poll(lambda: all(o.plan.number in behaviour.received for o in exact))
        assert got, "a well-behaved backend did not finish reading"
        by_port = {int(r["client"].rpartition(":")[2]): r for r in records}
        for o in exact:
            assert behaviour.received[o.plan.number] == (o.sent, o.digest), o.plan
            if ports[o.port] == 1:
                record = by_port[o.port]
                counted = (record["bytes_up"], record["bytes_down"])
                assert counted == (o.sent, o.reply), (o.plan, record)
        assert not behaviour.hangs, behaviour.hangs

        yield fwd.stop()
        backend.close()
        settled = yield poll(lambda: fd_count() <= fds_before + FD_MARGIN)
        assert settled, f"{fd_count()} descriptors open, {fds_before} before the run"
