"""A burst of clients toward a backend that completes connections with SYN cookies.

A listener whose SYN queue is full answers with SYN cookies and keeps no state;
when its accept queue is full too, it drops the handshake's ACK and the first
segments, and rebuilds the connection from the cookie of a later segment. That
check passes only for a segment that starts at the first byte, so a FIN sent
as a segment of its own behind the dropped bytes is answered with a reset. A
client whose request and FIN both arrived while its backend was connecting must
still get its answer: tunnelkit sends the FIN in the same segment as the last
bytes. A backend with ``listen(0)`` answers every SYN with a cookie and accepts
one connection at a time, so a handful of clients shows it: the SYNs that are
retransmitted together get cookies together, and all but one of their ACKs and
first segments are dropped. Once every backend connection is made, the
backend's backlog grows, so that the retransmitted segments are all accepted
at once instead of one per (ever longer) retransmission round. TUNNELKIT_SOAK=1
adds the burst of the report (2,000 clients, ``listen(512)``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from loopback import (
    Forwarder,
    LoopbackTestCase,
    ThreadedServer,
    connect,
    echo,
    recv_outcome,
    reset,
    sha256,
    split_address,
)
from planes import (
    ENGINE,
    ENGINE_NO_SPLICE,
    ENGINE_SPLICE,
    TWISTED,
    TWISTED_SPLICE,
    on_each_plane,
    on_planes,
)
from test_relay_sockets import PayloadClient, poll
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

SOAK = os.environ.get("TUNNELKIT_SOAK") == "1"

Inline = Generator[Deferred[Any], Any, None]

#: Clients of the bounded burst (without the fix, about half of them were reset).
CLIENTS = 8
SOAK_CLIENTS = 2000


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def tunnels_seen(fwd: Forwarder) -> int:
    """How many tunnels the forwarder has opened so far: live ones and ended ones."""
    native = fwd.service.native
    live = len(native.engine.tunnels()) if native is not None else len(fwd.tunnels)
    return live + len(fwd.records)


def require_syn_cookies() -> None:
    """Skip unless the kernel answers a full SYN queue with cookies (``tcp_syncookies`` 1 or 2)."""
    path = Path("/proc/sys/net/ipv4/tcp_syncookies")
    if not path.exists() or path.read_text().strip() == "0":
        raise SkipTest("this kernel sends no SYN cookies (net.ipv4.tcp_syncookies = 0)")


@on_planes(ENGINE, ENGINE_SPLICE, ENGINE_NO_SPLICE, TWISTED, TWISTED_SPLICE)
class SynCookieBurstTests(LoopbackTestCase):
    """Every client of a burst toward a backend that answers with SYN cookies gets its whole echo."""

    timeout = 300 if SOAK else 60

    @inlineCallbacks
    def burst(
        self, clients: int, backlog: int, backlog_once_connected: int | None = None
    ) -> Inline:
        """``clients`` clients at once each send 4-5 KiB and their FIN; each gets its echo and a FIN."""
        require_syn_cookies()
        reactor = _reactor()
        backend = ThreadedServer(echo, backlog=backlog)
        self.addCleanup(backend.close)
        fwd = self.forward("--to", backend.address)
        host, port = split_address(fwd.address)
        sizes = [4096 + (i * 37) % 1024 for i in range(clients)]
        payloads = [PayloadClient(os.urandom(size)) for size in sizes]
        yield gatherResults(
            [
                connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=30), client)
                for client in payloads
            ]
        )
        if backlog_once_connected is not None:
            yield poll(
                lambda: tunnels_seen(fwd) == clients and fwd.pending_connects() == 0,
                lambda: f"{clients} backend connections made ({fwd.pending_connects()} pending)",
                self.timeout - 10,
            )
            backend.sock.listen(backlog_once_connected)
        yield poll(
            lambda: all(c.reason for c in payloads),
            lambda: f"every echo ({sum(not c.reason for c in payloads)} clients still open)",
            self.timeout - 10,
        )
        failed = [
            f"port {c.port}: {c.reason.getErrorMessage() if c.reason else '?'}, {c.received} B"
            for c in payloads
            if not (c.reason and c.reason.check(ConnectionDone))
            or (c.received, c.digest.hexdigest()) != (len(c.payload), sha256(c.payload))
        ]
        assert not failed, f"{len(failed)} of {clients} clients lost:\n" + "\n".join(failed[:20])
        records = yield fwd.closed(clients)
        assert {r["close_kind"] for r in records} == {"FIN"}

    def test_burst_toward_a_backend_with_no_backlog(self) -> Deferred[None]:
        """Eight clients at once toward a ``listen(0)`` backend: every echo is whole, none is reset."""
        return self.burst(CLIENTS, 0, backlog_once_connected=CLIENTS)

    @pytest.mark.soak
    def test_burst_of_2000_toward_a_slow_backend(self) -> Deferred[None]:
        """2,000 clients at once toward a thread-per-connection ``listen(512)`` backend: none is lost."""
        if not SOAK:
            raise SkipTest("the report's burst: TUNNELKIT_SOAK=1")
        return self.burst(SOAK_CLIENTS, 512)


def read_to_eof_then_reset(conn: socket.socket) -> None:
    """Backend: read the whole request, then reset instead of answering."""
    while conn.recv(65536):
        pass
    reset(conn)


@on_each_plane
class BackendResetRecordTests(LoopbackTestCase):
    """A backend that resets a half-closed tunnel is recorded as a reset, not as the client's FIN."""

    @inlineCallbacks
    def test_reset_after_the_client_half_closed(self) -> Inline:
        """The client sends its request and FIN, the backend resets: the client sees RST, the record says so."""
        backend = self.serve(read_to_eof_then_reset)
        fwd = self.forward("--to", backend.address)

        def client() -> tuple[bytes, str]:
            with connect(fwd.address) as sock:
                sock.sendall(os.urandom(4096))
                sock.shutdown(socket.SHUT_WR)
                return recv_outcome(sock)

        outcome = yield deferToThread(client)
        backend.outcome()
        assert outcome == (b"", "RST")
        [record] = yield fwd.closed(1)
        assert (record["closed_by"], record["close_kind"]) == ("backend", "RST"), record
        assert record["bytes_down"] == 0
