"""Each listener's counters, on both relay planes, readable without the access log.

Every scenario runs on the native engine (``NativeRelay.counters``) and on
Twisted's relay (``TunnelFactory.counters``) over real loopback sockets,
with ``--no-access-log``, and expects the same :class:`ListenerCounters`
on each: so the planes agree. Payloads are random and checked by SHA-256.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trustme
from certs import write_pair
from loopback import (
    Forwarder,
    LoopbackTestCase,
    MiB,
    connect,
    connect_from,
    exchange,
    hashing_echo,
    recv_exactly,
    recv_outcome,
    refusing_address,
    settled,
    sha256,
)
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread

from tunnelkit.relay.counters import ListenerCounters

Inline = Generator[Deferred[Any], Any, None]


def turned_away(source: str, address: str, send: bytes = b"") -> tuple[bytes, str]:
    """Connect from ``source``, send ``send``: what came back before the proxy closed, and how."""
    with connect_from(source, address) as sock:
        if send:
            sock.sendall(send)
        return recv_outcome(sock)


def joined(address: str) -> socket.socket:
    """A client whose tunnel to an echo backend is joined (``ping`` came back)."""
    sock = connect(address)
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    return sock


def echoes(sock: socket.socket, size: int) -> bool:
    """A random payload and EOF through a joined tunnel come back intact."""
    payload = os.urandom(size)
    with sock:
        return sha256(exchange(sock, payload)) == sha256(payload)


class NativeCountersTests(LoopbackTestCase):
    """The counters of the native engine's listeners."""

    engine = "native"

    def forwarder(self, *args: str) -> Forwarder:
        fwd = self.forward("--engine", self.engine, "--no-access-log", *args)
        assert fwd.native is (self.engine == "native"), "the forwarder runs on the wrong plane"
        return fwd

    def counters(self, fwd: Forwarder) -> ListenerCounters:
        """The listener's counters, as the plane under test reads them."""
        if fwd.native:
            return fwd.service.native.counters(0)
        factory: Any = fwd.service.factories[0]
        return attrs.evolve(getattr(factory, "wrappedFactory", factory).counters)

    def settled(
        self, fwd: Forwarder, check: Callable[[ListenerCounters], bool]
    ) -> Deferred[ListenerCounters]:
        """Fires with the counters once ``check`` holds for them (polled; bounded)."""
        return settled(lambda: self.counters(fwd), check)

    @inlineCallbacks
    def test_admission_and_bytes(self) -> Inline:
        """Accepted, refused by the client policy, refused at the cap, active, and bytes each way as sent."""
        backend = self.serve(hashing_echo)
        fwd = self.forwarder(
            "--to", backend.address, "--deny-client", "127.0.0.2/32", "--max-connections", "1"
        )
        first = yield deferToThread(joined, fwd.address)
        self.addCleanup(first.close)
        data, _ = yield deferToThread(turned_away, "127.0.0.2", fwd.address)
        assert data == b""
        data, _ = yield deferToThread(turned_away, "127.0.0.1", fwd.address)
        assert data == b""
        assert self.counters(fwd) == ListenerCounters(
            accepted=1, refused_client_policy=1, refused_connection_limit=1, active=1
        )
        assert (yield deferToThread(echoes, first, MiB))
        counters = yield self.settled(fwd, lambda c: c.active == 0)
        assert counters == ListenerCounters(
            accepted=1,
            refused_client_policy=1,
            refused_connection_limit=1,
            bytes_up=4 + MiB,
            bytes_down=4 + MiB,
        )

    @inlineCallbacks
    def test_connect_failure(self) -> Inline:
        """A client whose only backend refuses is accepted, then counted as a connect failure."""
        with refusing_address() as dead:
            fwd = self.forwarder("--to", dead)
            data, _ = yield deferToThread(turned_away, "127.0.0.1", fwd.address)
            assert data == b""
            counters = yield self.settled(fwd, lambda c: c.active == 0)
        assert counters == ListenerCounters(accepted=1, connect_failures=1)

    @inlineCallbacks
    def test_tls_failure(self) -> Inline:
        """A client that sends garbage instead of a ClientHello is counted as a TLS failure, and no backend is dialled."""
        backend = self.serve(hashing_echo)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        pair = write_pair(trustme.CA(), Path(directory.name), "localhost")
        fwd = self.forwarder(
            "--to", backend.address, "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)
        )
        yield deferToThread(turned_away, "127.0.0.1", fwd.address, b"GET / HTTP/1.0\r\n\r\n")
        counters = yield self.settled(fwd, lambda c: c.active == 0)
        assert counters == ListenerCounters(accepted=1, tls_failures=1)
        assert backend.accepted == 0


class PythonCountersTests(NativeCountersTests):
    """The same counters on Twisted's relay (``--engine python``)."""

    engine = "python"


def test_the_engine_counts_clients_refused_for_want_of_descriptors() -> None:
    """Out of descriptors, the engine accepts each client with its reserved one, closes it, and counts it.

    (Twisted's port closes such clients itself without telling the factory:
    its refused_out_of_fds stays 0.) The engine runs alone here, without the
    reactor, so nothing else in this process needs a descriptor meanwhile.
    """
    engine_module = pytest.importorskip("tunnelkit.engine._engine")
    engine = engine_module.Engine(max_tunnels=10)
    with (
        socket.create_server(("127.0.0.1", 0)) as backend,
        socket.create_server(("127.0.0.1", 0)) as listener,
    ):
        host, port = backend.getsockname()
        profile = engine_module.Profile(
            [("b", host, port)], 65536, 65536, "off", 0.0, 0.0, 2.0, 5.0
        )
        listener.setblocking(False)
        engine.add_listener(listener.fileno(), 0, profile)
        clients = [socket.socket() for _ in range(2)]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest)
        try:
            # No descriptor is free below the limit now; connect() needs none.
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
            for client in clients:
                client.connect(listener.getsockname())
            for _ in range(500):
                engine.run()
                if engine.counters(0)[engine_module.COUNTERS.index("refused_out_of_fds")] == len(
                    clients
                ):
                    break
                time.sleep(0.01)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for client in clients:
                client.close()
        counted = ListenerCounters(
            **dict(zip(engine_module.COUNTERS, engine.counters(0), strict=True))
        )
        assert counted == ListenerCounters(refused_out_of_fds=2)
        assert engine.take_notices() == [("accept_failed", errno.EMFILE)]
        engine.close()
