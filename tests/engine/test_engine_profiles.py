"""One native engine, several listeners, each with its own profile.

A profile (:class:`tunnelkit.engine._engine.Profile`, made by
:meth:`NativeRelay.profile`) is how a listener's tunnels are served: its
backends, timeouts, socket options, TLS and logging. These tests run two
listeners of different profiles in one engine over real loopback sockets,
replace a listener's profile while its tunnels live (they keep the one they
began with, even once nothing else holds it: run under ASan by
scripts/sanitize), and check the new C code's argument errors.
"""

from __future__ import annotations

import gc
import os
import socket
import tempfile
import weakref
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import write_pair
from loopback import (
    IO_TIMEOUT,
    LoopbackTestCase,
    MiB,
    connect,
    exchange,
    hashing_echo,
    recv_all,
    recv_exactly,
    sha256,
)
from tls_clients import client_context, tls_exchange
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.relay.counters import ListenerCounters
from tunnelkit.relay.socket_options import SocketOptions
from tunnelkit.relay.tunnel import Timeouts, TunnelRecord

_engine = pytest.importorskip("tunnelkit.engine._engine")
from tunnelkit.engine.driver import NativeRegistry, NativeRelay  # noqa: E402

Inline = Generator[Deferred[Any], Any, None]


class ModeFactory(Factory):
    """What the engine asks of a listener's factory: its name, its client policy, its log."""

    def __init__(self, name: str) -> None:
        self.listener = name
        self.records: list[TunnelRecord] = []

    def client_allowed(self, addr: object) -> bool:
        return True

    def tunnel_log(self, record: TunnelRecord, listener: str) -> None:
        self.records.append(record)


class TLSWrapper(Factory):
    """The factory of a TLS listener's port: it wraps its mode's (the engine takes the latter)."""

    def __init__(self, mode: ModeFactory) -> None:
        self.wrappedFactory = mode


def backend(address: str) -> Backend:
    host, _, port = address.rpartition(":")
    return Backend(address, host_endpoint(reactor, host, int(port), 5.0))


def until(check: Callable[[], bool], timeout: float = IO_TIMEOUT) -> Deferred[None]:
    """Fires once ``check()`` is true (polled on the reactor); fails after ``timeout`` s."""

    @inlineCallbacks
    def poll() -> Inline:
        for _ in range(int(timeout / 0.02)):
            if check():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        raise AssertionError("the condition did not come true in time")

    return poll()


def ping(sock: socket.socket) -> None:
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"


def idle_tls(address: str) -> bytes:
    """A TLS client that pings through the tunnel, then waits: what it reads until the proxy closes."""
    from tls_clients import tls_ping

    with tls_ping(address, client_context(None), "localhost") as tls:
        return recv_all(tls)


def finish(sock: socket.socket, size: int) -> bool:
    """A random payload and EOF through a joined tunnel to a hashing echo come back intact."""
    payload = os.urandom(size)
    with sock:
        received = exchange(sock, payload)
    return sha256(received) == sha256(payload)


class ProfilesTests(LoopbackTestCase):
    """Listeners of different profiles in one engine, and profiles replaced under live tunnels."""

    def relay(self) -> NativeRelay:
        relay = NativeRelay(reactor, registry=NativeRegistry(reactor, 100))
        self.addCleanup(relay.close)
        return relay

    def profile(
        self, relay: NativeRelay, to: str, *, idle: float | None = None, tls: Any = None
    ) -> Any:
        return relay.profile(
            BackendGroup([backend(to)], reactor, 5.0),
            timeouts=Timeouts(idle=idle),
            connect_timeout=5.0,
            socket_options=SocketOptions(),
            splice="auto",
            bulk_read=16384,
            log_records=True,
            restricts_clients=False,
            tls=tls,
        )

    def listen(self, factory: Factory) -> tuple[Any, str]:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, f"127.0.0.1:{port.getHost().port}"

    def engine_tls(self, directory: Path) -> Any:
        from tunnelkit.engine.tls import EngineTLS
        from tunnelkit.tls.server import CertificatePair, ServerTLS, ServerTLSSettings

        pair = write_pair(trustme.CA(), directory, "localhost")
        settings = ServerTLSSettings(pairs=(CertificatePair(str(pair.cert), str(pair.key)),))
        return EngineTLS(ServerTLS(settings))

    def test_a_pool_made_again_starts_from_the_groups_health(self) -> None:
        """Names resolved again: the new pool of a replaced group has its persisting backends' health."""
        relay = self.relay()
        group = BackendGroup([backend("127.0.0.1:1"), backend("127.0.0.1:2")], reactor, 5.0)
        first = relay._pool(group)
        group.mark(1, False, "test")
        group.replace([backend("127.0.0.1:3"), backend("127.0.0.1:2")])
        assert group.mirror is None
        pool = relay._pool(group)
        assert group.mirror is pool and pool is not first
        assert pool.names == ("127.0.0.1:3", "127.0.0.1:2")
        assert [state[1] for state in pool.states()] == [True, False]

    @inlineCallbacks
    def test_two_listeners_of_different_profiles(self) -> Inline:
        """A TLS listener and a plain one in one engine: each relays to its own backend, with its own idle timeout."""
        tls_backend, plain_backend = self.serve(hashing_echo), self.serve(hashing_echo)
        relay = self.relay()
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        engine_tls = self.engine_tls(Path(directory.name))
        tls_mode, plain_mode = ModeFactory("tls"), ModeFactory("plain")
        tls_factory = TLSWrapper(tls_mode)
        tls_port, tls_address = self.listen(tls_factory)
        plain_port, plain_address = self.listen(plain_mode)
        indexes = relay.start(
            [
                (
                    tls_factory,
                    tls_port,
                    self.profile(relay, tls_backend.address, idle=0.3, tls=engine_tls),
                ),
                (plain_mode, plain_port, self.profile(relay, plain_backend.address, idle=3600)),
            ]
        )
        assert indexes == [0, 1]
        # A TLS tunnel left idle is closed after its listener's 0.3 s, while
        # the plain listener's tunnel, idle meanwhile, lives on.
        lasting = yield deferToThread(connect, plain_address)
        yield deferToThread(ping, lasting)
        assert (yield deferToThread(idle_tls, tls_address)) == b""
        # The record reaches Python a moment after the client saw the close.
        yield until(lambda: len(tls_mode.records) == 1)
        [timed_out] = tls_mode.records
        assert timed_out.reason == "idle timeout (0.3 s without data)", timed_out
        assert timed_out.backend == tls_backend.address
        payload = os.urandom(2 * MiB)
        pump = yield deferToThread(
            tls_exchange, tls_address, client_context(None), "localhost", payload
        )
        assert pump.digest.hexdigest() == sha256(payload)
        assert (yield deferToThread(finish, lasting, MiB))
        yield until(lambda: relay.engine.active == 0)
        hashes = yield deferToThread(lambda: {tls_backend.outcome(), tls_backend.outcome()})
        assert sha256(payload) in hashes
        assert (tls_backend.accepted, plain_backend.accepted) == (2, 1)
        yield until(lambda: len(plain_mode.records) == 1)
        [plain] = plain_mode.records
        assert (plain.backend, plain.bytes_up, plain.bytes_down) == (
            plain_backend.address,
            4 + MiB,
            4 + MiB,
        )
        relayed = tls_mode.records[1]
        assert (relayed.backend, relayed.bytes_up, relayed.bytes_down) == (
            tls_backend.address,
            2 * MiB,
            2 * MiB,
        )
        assert str(relayed.details["tls_version"]).startswith("TLSv1")
        assert relay.counters(0) == ListenerCounters(
            accepted=2, bytes_up=4 + 2 * MiB, bytes_down=4 + 2 * MiB
        )
        assert relay.counters(1) == ListenerCounters(
            accepted=1, bytes_up=4 + MiB, bytes_down=4 + MiB
        )

    @inlineCallbacks
    def test_a_new_profile_serves_new_clients_only(self) -> Inline:
        """set_profile: new clients go to the new backends; a live tunnel keeps its profile, freed once the tunnel ends."""
        old_backend, new_backend = self.serve(hashing_echo), self.serve(hashing_echo)
        relay = self.relay()
        mode = ModeFactory("plain")
        port, address = self.listen(mode)
        relay.start([(mode, port, self.profile(relay, old_backend.address))])
        marker = Marker()
        relay.set_profile(0, plain_profile(old_backend.address, context=marker))
        kept = weakref.ref(marker)
        del marker
        first = yield deferToThread(connect, address)
        yield deferToThread(ping, first)
        relay.set_profile(0, plain_profile(new_backend.address))
        gc.collect()
        # Only the live tunnel holds the old profile now (under ASan, a use after free shows).
        assert kept() is not None
        second = yield deferToThread(connect, address)
        yield deferToThread(ping, second)
        assert (yield deferToThread(finish, first, MiB))
        assert (yield deferToThread(finish, second, MiB))
        yield until(lambda: relay.engine.active == 0)
        assert [r.backend for r in mode.records] == [old_backend.address, new_backend.address]
        assert (old_backend.accepted, new_backend.accepted) == (1, 1)
        gc.collect()
        assert kept() is None, "the replaced profile outlived its last tunnel"


class Marker:
    """A profile's context that can be watched going away."""


def plain_profile(to: str, **more: Any) -> Any:
    host, _, port = to.rpartition(":")
    return _engine.Profile(
        [(to, host, int(port))], 65536, 16384, "auto", 0.0, 0.0, 2.0, 5.0, **more
    )


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"splice": "sometimes"}, ValueError, "splice must be 'off', 'auto' or 'on'"),
        ({"read_size": 0}, ValueError, "read_size and bulk_read must be positive"),
        ({"idle": -1.0}, ValueError, "idle and fin must be 0 (none) or positive"),
        ({"connect_timeout": 0.0}, ValueError, "connect_timeout must be positive"),
        ({"mss": -2}, ValueError, "keepalive, sndbuf, rcvbuf and mss must be -1 (unset)"),
        ({"backends": []}, ValueError, "the native engine takes 1 to 64 backends, not 0"),
        (
            {"backends": [("b", "localhost", 80)]},
            ValueError,
            "not an IP address or UNIX socket path: localhost",
        ),
        (
            {"backends": [("b", "127.0.0.1", 0)]},
            ValueError,
            "backend 127.0.0.1 needs a port in 1..65535, not 0",
        ),
        (
            {"backends": ["127.0.0.1:80"]},
            TypeError,
            "a backend is (name, host, port) or (name, path), not str",
        ),
        ({"backends": 5}, TypeError, "backends must be a sequence"),
        ({"client_check": 5}, TypeError, "client_check must be callable or None"),
        (
            {"tls": "yes"},
            TypeError,
            "tls must be (functions, new_connection, handshake timeout) or None",
        ),
        ({"tls": ((0,) * 8, print, 5.0)}, ValueError, "a TLS function address is 0"),
        ({"tls": ((1,) * 8, print, 0.0)}, ValueError, "the TLS handshake timeout must be positive"),
    ],
)
def test_bad_profile_arguments(
    change: dict[str, Any], error: type[Exception], message: str
) -> None:
    """A Profile with a bad argument is refused with an error that says which and why."""
    arguments: dict[str, Any] = {
        "backends": [("b", "127.0.0.1", 80)],
        "read_size": 65536,
        "bulk_read": 16384,
        "splice": "auto",
        "idle": 0.0,
        "fin": 0.0,
        "grace": 2.0,
        "connect_timeout": 5.0,
    }
    with pytest.raises(error) as raised:
        _engine.Profile(**{**arguments, **change})
    assert str(raised.value).startswith(message), raised.value


def test_bad_engine_arguments() -> None:
    """An Engine needs a positive cap; listener indexes are checked, and so are profiles."""
    with pytest.raises(ValueError, match="max_tunnels must be given, and positive"):
        _engine.Engine()
    with pytest.raises(ValueError, match="fd_slots must be 0"):
        _engine.Engine(max_tunnels=1, fd_slots=-1)
    engine = _engine.Engine(max_tunnels=1)
    profile = plain_profile("127.0.0.1:80")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with pytest.raises(ValueError, match=r"listener index 64 is not in 0\.\.63"):
            engine.add_listener(listener.fileno(), 64, profile)
        with pytest.raises(
            TypeError, match=r"profile must be a tunnelkit\.engine\._engine\.Profile, not str"
        ):
            engine.add_listener(listener.fileno(), 0, "fast")
        with pytest.raises(ValueError, match="no listener was added with index 3"):
            engine.set_profile(3, profile)
        with pytest.raises(ValueError, match="no listener was added with index 3"):
            engine.counters(3)
        engine.add_listener(listener.fileno(), 3, profile)
        assert engine.counters(3) == (0,) * len(_engine.COUNTERS)
        engine.close()
        with pytest.raises(ValueError, match="the engine is closed"):
            engine.set_profile(3, profile)
        # The counters outlive the engine's sockets.
        assert engine.counters(3) == (0,) * len(_engine.COUNTERS)
