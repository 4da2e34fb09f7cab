"""Balancing, retries, backups and health over real loopback sockets, on each plane.

Backends answer their own name and then wait for the client to close, so a
client learns who served it, and a client that keeps its socket open holds
a connection on that backend (for least-conn).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from loopback import (
    IO_TIMEOUT,
    LoopbackTestCase,
    ThreadedServer,
    exchange,
    recv_all,
    recv_exactly,
    refusing_address,
    sha256,
    silent_listener,
    split_address,
)
from planes import TWISTED, on_each_plane, on_planes
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.backends import balance, resolver

Inline = Generator[Deferred[Any], Any, None]

#: Every backend's name has this length: a client reads exactly that.
NAME_SIZE = 2


def named(name: str) -> Callable[[socket.socket], str]:
    """A backend handler: send ``name``, then wait for the client to close."""

    def handler(conn: socket.socket) -> str:
        conn.sendall(name.encode())
        recv_all(conn)
        return name

    return handler


def resetting(conn: socket.socket) -> None:
    """A backend that accepts and resets at once."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def who(address: str, source: str = "127.0.0.1") -> str:
    """Connect from ``source``, read the backend's name, close."""
    with socket.create_connection(split_address(address), IO_TIMEOUT, (source, 0)) as sock:
        return recv_exactly(sock, NAME_SIZE).decode()


def hold(address: str) -> tuple[socket.socket, str]:
    """Connect and read the backend's name, keeping the connection open."""
    sock = socket.create_connection(split_address(address), IO_TIMEOUT)
    return sock, recv_exactly(sock, NAME_SIZE).decode()


def read_until_closed(address: str) -> bytes:
    """Connect and read until the proxy closes the connection."""
    with socket.create_connection(split_address(address), IO_TIMEOUT) as sock:
        return recv_all(sock)


def many(address: str, count: int, workers: int = 1) -> list[str]:
    """``who`` ``count`` times, by ``workers`` clients at once, in order of starting."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: who(address), range(count)))


class Events:
    """The tunnelkit.backends log events of a test, to wait for a backend to go down or up."""

    def __init__(self, case: LoopbackTestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def named(self, event: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("event") == event]

    @inlineCallbacks
    def wait(self, event: str, count: int = 1, timeout: float = IO_TIMEOUT) -> Inline:
        """Until ``count`` ``event`` events were logged; fails after ``timeout`` s."""
        for _ in range(int(timeout / 0.02)):
            if len(self.named(event)) >= count:
                return
            yield deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"no {count} {event} events in {timeout:g} s: {self.events}")


@on_each_plane
class BalancingTests(LoopbackTestCase):
    """Clients are spread over the backends as --balance says."""

    def backends(self, count: int = 4) -> list[ThreadedServer]:
        return [self.serve(named(f"b{i}")) for i in range(count)]

    def to(self, servers: list[ThreadedServer], *suffixes: str) -> list[str]:
        args = []
        for i, server in enumerate(servers):
            args += ["--to", server.address + (suffixes[i] if i < len(suffixes) else "")]
        return args

    @inlineCallbacks
    def test_round_robin_rotates_exactly(self) -> Inline:
        """Four backends, eight clients one after another: b0 b1 b2 b3 b0 b1 b2 b3."""
        fwd = self.forward(*self.to(self.backends()))
        served = yield deferToThread(many, fwd.address, 8)
        assert served == ["b0", "b1", "b2", "b3"] * 2

    @inlineCallbacks
    def test_weights_share_the_clients(self) -> Inline:
        """Weights 3, 1, 0: three clients of four to b0, one to b1, none to the drained b2."""
        servers = self.backends(3)
        fwd = self.forward(*self.to(servers, ",weight=3", "", ",weight=0"))
        served = yield deferToThread(many, fwd.address, 40)
        assert Counter(served) == {"b0": 30, "b1": 10}

    @inlineCallbacks
    def test_least_conn_fills_the_emptiest(self) -> Inline:
        """With one held connection on each, the backend whose client left gets the next ones."""
        fwd = self.forward(*self.to(self.backends()), "--balance", "least-conn")
        held = []
        for _ in range(4):
            held.append((yield deferToThread(hold, fwd.address)))
        try:
            assert sorted(name for _, name in held) == ["b0", "b1", "b2", "b3"]
            leaving = next(sock for sock, name in held if name == "b2")
            leaving.close()
            yield fwd.closed(1)
            late = yield deferToThread(hold, fwd.address)
            held.append(late)
            assert late[1] == "b2"
        finally:
            for sock, _ in held:
                sock.close()

    @inlineCallbacks
    def test_random_avoids_the_loaded_backend(self) -> Inline:
        """Power of two choices: with b0 holding many connections, new clients go elsewhere."""
        servers = self.backends(2)
        fwd = self.forward(*self.to(servers), "--balance", "random")
        held = []
        try:
            for _ in range(6):
                held.append((yield deferToThread(hold, fwd.address)))
            # Each pick compares both: the less loaded wins, so they stay level.
            counts = Counter(name for _, name in held)
            assert counts == {"b0": 3, "b1": 3}, counts
        finally:
            for sock, _ in held:
                sock.close()

    @inlineCallbacks
    def test_source_hash_keeps_clients_and_moves_only_the_removed_share(self) -> Inline:
        """40 client addresses: each stays on its backend; without b2, only b2's clients move.

        The mapping is also the reference hash's (tunnelkit.backends.balance),
        so it is the same on both planes and in every worker.
        """
        servers = self.backends()
        sources = [f"127.0.0.{i}" for i in range(2, 42)]
        names = [server.address for server in servers]

        def expected(alive: list[int]) -> dict[str, str]:
            keys = [balance.Load(1, balance.fnv1a64(n.encode())) for n in names]
            picker = balance.SourceHash()
            return {s: f"b{picker.pick(keys, alive, balance.client_key(s))}" for s in sources}

        def ask(address: str) -> dict[str, str]:
            return {s: who(address, s) for s in sources}

        fwd = self.forward(*self.to(servers), "--balance", "source-hash")
        first = yield deferToThread(ask, fwd.address)
        again = yield deferToThread(ask, fwd.address)
        assert first == again == expected([0, 1, 2, 3])
        yield fwd.stop()
        fewer = self.forward(
            *self.to([s for s in servers if s is not servers[2]]), "--balance", "source-hash"
        )
        after = yield deferToThread(ask, fewer.address)
        assert after == expected([0, 1, 3])
        moved = {s for s in sources if first[s] != after[s]}
        assert moved == {s for s in sources if first[s] == "b2"}
        assert len(moved) < len(sources) / 2


@on_each_plane
class FailoverTests(LoopbackTestCase):
    """Refused, silent and failing backends cost clients nothing while one backend is healthy."""

    @inlineCallbacks
    def test_100_clients_served_past_refused_and_black_holed_backends(self) -> Inline:
        """One refusing, one black-holed, one healthy: 100 of 100 clients served within the connect budget."""
        events = Events(self)
        healthy = self.serve(named("ok"))
        with refusing_address() as refused, silent_listener() as silent:
            if silent is None:
                self.skipTest("this kernel answers SYNs to a full accept queue")
            fwd = self.forward(
                "--to", refused, "--to", silent, "--to", healthy.address,
                "--connect-timeout", "0.5",
            )  # fmt: skip
            served = yield deferToThread(many, fwd.address, 100, 10)
            records = yield fwd.closed(100)
        assert served == ["ok"] * 100
        attempts = Counter(record["attempts"] for record in records)
        assert set(attempts) <= {1, 2, 3} and attempts[1] > 0, attempts
        # Passive ejection took the two failing backends out, each logged once.
        down = sorted(event["backend"] for event in events.named("backend_down"))
        assert down == sorted([refused, silent]), down

    @inlineCallbacks
    def test_backup_only_while_every_primary_is_down(self) -> Inline:
        """A healthy primary takes every client; with the primaries refusing, the backup does."""
        primary, spare = self.serve(named("p0")), self.serve(named("bk"))
        fwd = self.forward("--to", primary.address, "--backup", spare.address)
        served = yield deferToThread(many, fwd.address, 6)
        assert served == ["p0"] * 6
        yield fwd.stop()  # its records are all out: the next forwarder's are its own
        with refusing_address() as one, refusing_address() as two:
            fwd2 = self.forward("--to", one, "--to", two, "--backup", spare.address)
            served = yield deferToThread(many, fwd2.address, 6)
            records = yield fwd2.closed(6)
        assert served == ["bk"] * 6
        assert records[0]["attempts"] == 3 and records[0]["backend"] == spare.address
        # Both primaries were ejected after three failures each: straight to the backup.
        assert records[-1]["attempts"] == 1

    @inlineCallbacks
    def test_every_backend_refusing_closes_the_client(self) -> Inline:
        """Nothing answers: the client is closed, and the record lists each attempt."""
        with refusing_address() as one, refusing_address() as two:
            fwd = self.forward("--to", one, "--to", two, "--connect-retries", "5")
            data = yield deferToThread(read_until_closed, fwd.address)
            [record] = yield fwd.closed(1)
        assert data == b""
        assert record["attempts"] == 2
        assert record["reason"].startswith("no backend connected: ")
        assert one in record["reason"] and two in record["reason"]


#: Health checks fast enough for a test: down after 2 failures, up after 2 passes.
FAST_CHECKS = ("--health-interval", "0.05", "--health-timeout", "0.5", "--rise", "2", "--fall", "2")


@on_each_plane
class HealthTests(LoopbackTestCase):
    """Active health checks take dead backends out before clients meet them, and bring them back."""

    @inlineCallbacks
    def test_a_silent_backend_goes_down_and_rejoins_after_rise(self) -> Inline:
        """b0 stops answering: down after fall checks, every client to b1; answering again, it rejoins."""
        events = Events(self)
        b0, b1 = self.serve(named("b0")), self.serve(named("b1"))
        fwd = self.forward("--to", b0.address, "--to", b1.address, *FAST_CHECKS)
        if not b0.silence():
            self.skipTest("this kernel answers SYNs to a full accept queue")
        yield events.wait("backend_down")
        assert events.named("backend_down")[0]["backend"] == b0.address
        served = yield deferToThread(many, fwd.address, 10)
        assert served == ["b1"] * 10
        b0.open()
        yield events.wait("backend_up")
        assert "2 health checks passed" in events.named("backend_up")[0]["reason"]
        served = yield deferToThread(many, fwd.address, 4)
        assert sorted(served) == ["b0", "b0", "b1", "b1"]

    @inlineCallbacks
    def test_send_expect_takes_out_a_backend_that_resets(self) -> Inline:
        """A backend that accepts and resets passes a connect check but fails send/expect."""
        events = Events(self)
        bad, good = self.serve(resetting), self.serve(named("ok"))
        fwd = self.forward(
            "--to", bad.address, "--to", good.address, *FAST_CHECKS,
            "--health-send", "hello\\n", "--health-expect", "ok",
        )  # fmt: skip
        yield events.wait("backend_down")
        [down] = events.named("backend_down")
        assert down["backend"] == bad.address
        served = yield deferToThread(many, fwd.address, 6)
        assert served == ["ok"] * 6

    @inlineCallbacks
    def test_every_backend_down_closes_clients_at_once(self) -> Inline:
        """With no backend up, a client is closed without an attempt, and the record says why."""
        events = Events(self)
        with refusing_address() as one, refusing_address() as two:
            fwd = self.forward("--to", one, "--to", two, *FAST_CHECKS)
            yield events.wait("no_backend_available")
            data = yield deferToThread(read_until_closed, fwd.address)
            [record] = yield fwd.closed(1)
        assert data == b""
        assert record["reason"] == "no backend available"
        assert record["attempts"] == 0

    @inlineCallbacks
    def test_close_on_down_ends_the_backends_tunnels(self) -> Inline:
        """--close-on-down: a tunnel to a backend the checks take down is closed; without it, it lives on."""
        events = Events(self)
        server = self.serve(named("b0"))
        spare = self.serve(named("b1"))
        fwd = self.forward(
            "--to", server.address, "--to", spare.address, "--balance", "first",
            *FAST_CHECKS, "--close-on-down",
        )  # fmt: skip
        sock, name = yield deferToThread(hold, fwd.address)
        self.addCleanup(sock.close)
        assert name == "b0"
        if not server.silence():
            self.skipTest("this kernel answers SYNs to a full accept queue")
        yield events.wait("backend_down")
        [record] = yield fwd.closed(1)
        assert record["reason"].startswith(f"backend {server.address} went down: ")
        assert record["closed_by"] == "proxy"


def named_echo(name: str) -> Callable[[socket.socket], str]:
    """A backend handler: send ``name``, then echo every byte until the client closes."""

    def handler(conn: socket.socket) -> str:
        conn.sendall(name.encode())
        while data := conn.recv(65536):
            conn.sendall(data)
        return name

    return handler


@on_each_plane
class ResolveTests(LoopbackTestCase):
    """--resolve-interval: a backend name's new addresses take the next clients; live tunnels go on."""

    @inlineCallbacks
    def test_new_addresses_take_new_clients_and_a_held_tunnel_goes_on(self) -> Inline:
        """svc moves from 127.0.0.1 to 127.0.0.2: new clients go there, a tunnel held across works and is recorded once."""
        events = Events(self)
        old = self.serve(named_echo("b0"))
        port = split_address(old.address)[1]
        try:
            new = ThreadedServer(named_echo("b1"), "127.0.0.2", port=port)
        except OSError as e:
            self.skipTest(f"127.0.0.2 is not usable here: {e}")
        self.addCleanup(new.close)
        answers = {"svc.test": ["127.0.0.1"]}

        def lookup(host: str, port: int) -> list[Any]:
            return [ipaddress.ip_address(a) for a in answers[host]]

        self.patch(resolver, "lookup", lookup)
        fwd = self.forward("--to", f"svc.test:{port}", "--resolve-interval", "0.2")
        held, name = yield deferToThread(hold, fwd.address)
        self.addCleanup(held.close)
        assert name == "b0"
        answers["svc.test"] = ["127.0.0.2"]
        yield events.wait("backends_changed")
        served = yield deferToThread(many, fwd.address, 4)
        assert served == ["b1"] * 4
        payload = random.randbytes(256 * 1024)
        echoed = yield deferToThread(exchange, held, payload)
        assert sha256(echoed) == sha256(payload)
        records = yield fwd.closed(5)
        assert [r["backend_address"].split(":")[0] for r in records].count("127.0.0.1") == 1
        assert {r["backend"] for r in records} == {f"svc.test:{port}"}
        assert len(fwd.records) == 5

    @inlineCallbacks
    def test_a_backend_down_stays_down_across_a_change_and_its_checks_go_on(self) -> Inline:
        """svc's 127.0.0.2 is down when svc gains 127.0.0.3: no client tries it, and it rejoins after rise checks."""
        events = Events(self)
        first = self.serve(named("b1"))
        port = split_address(first.address)[1]
        answers = {"svc.test": ["127.0.0.1", "127.0.0.2"]}
        self.patch(
            resolver, "lookup", lambda host, port: list(map(ipaddress.ip_address, answers[host]))
        )
        fwd = self.forward("--to", f"svc.test:{port}", "--resolve-interval", "0.2", *FAST_CHECKS)
        yield events.wait("backend_down")  # nothing listens on 127.0.0.2
        try:
            third = ThreadedServer(named("b3"), "127.0.0.3", port=port)
        except OSError as e:
            self.skipTest(f"127.0.0.3 is not usable here: {e}")
        self.addCleanup(third.close)
        answers["svc.test"] = ["127.0.0.2", "127.0.0.3"]
        yield events.wait("backends_changed")
        served = yield deferToThread(many, fwd.address, 4)
        assert served == ["b3"] * 4
        records = yield fwd.closed(4)
        assert [r["attempts"] for r in records] == [1] * 4
        second = ThreadedServer(named("b2"), "127.0.0.2", port=port)
        self.addCleanup(second.close)
        yield events.wait("backend_up")
        [up] = events.named("backend_up")
        assert up["backend"] == f"svc.test:{port} (127.0.0.2)"
        served = yield deferToThread(many, fwd.address, 4)
        assert sorted(served) == ["b2", "b2", "b3", "b3"]


@on_each_plane
class LoadTests(LoopbackTestCase):
    """Backends that die or flap under load: no client fails while another backend is healthy."""

    @inlineCallbacks
    def test_a_backend_killed_during_a_load_costs_no_client(self) -> Inline:
        """200 clients; b0 dies after the 50th: its next clients are retried on b1, then it is ejected."""
        b0, b1 = self.serve(named("b0")), self.serve(named("b1"))
        fwd = self.forward("--to", b0.address, "--to", b1.address, *FAST_CHECKS)

        def load() -> list[str]:
            served = []
            for i in range(200):
                if i == 50:
                    b0.close()  # its port refuses from now on
                served.append(who(fwd.address))
            return served

        served = yield deferToThread(load)
        assert len(served) == 200
        assert set(served[:50]) == {"b0", "b1"} and served[100:] == ["b1"] * 100

    @inlineCallbacks
    def test_a_flapping_backend_costs_no_client(self) -> Inline:
        """b0 stops and starts answering every 0.1 s while 100 clients come: every one is served."""
        b0, b1 = self.serve(named("b0")), self.serve(named("b1"))
        fwd = self.forward(
            "--to", b0.address, "--to", b1.address, *FAST_CHECKS, "--connect-timeout", "0.3"
        )  # fmt: skip

        def flap(stop: threading.Event) -> None:
            for _ in range(200):
                if stop.wait(0.1):
                    break
                if b0.silent:
                    b0.open()
                elif not b0.silence():
                    return

        stop = threading.Event()
        flapping = threading.Thread(target=flap, args=(stop,), daemon=True)
        flapping.start()
        try:
            served = yield deferToThread(many, fwd.address, 100, 4)
        finally:
            stop.set()
            yield deferToThread(flapping.join, 5)
        assert len(served) == 100 and set(served) <= {"b0", "b1"}


@on_planes(TWISTED)
class ConnectModeTests(LoopbackTestCase):
    """A CONNECT proxy in front of a fixed backend group answers 503 when none is up."""

    @inlineCallbacks
    def test_connect_answers_503_when_every_backend_is_down(self) -> Inline:
        """--mode connect --to ...: with every backend down, the client gets 503 at once."""
        events = Events(self)
        with refusing_address() as one:
            fwd = self.forward(
                "--mode", "connect", "--to", one, "--allow-dest", "127.0.0.1", *FAST_CHECKS
            )  # fmt: skip
            yield events.wait("no_backend_available")

            def ask() -> bytes:
                with socket.create_connection(split_address(fwd.address), IO_TIMEOUT) as sock:
                    sock.sendall(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n")
                    return recv_all(sock)

            answer = yield deferToThread(ask)
            [record] = yield fwd.closed(1)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert record["reason"] == "no backend available"
