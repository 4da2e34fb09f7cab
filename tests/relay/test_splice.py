"""The splice(2) fast path: when it is used, that it keeps the relay's promises, its pipes.

The relay suite in tests/relay/test_relay_sockets.py runs on each plane with splice
forced on (``...OnEngineSplice``, ``...OnTwistedSplice``) and off
(``...NoSplice``), so every half-close, reset, timeout and payload test covers
both paths. The tests of this module prove the path is really taken (and not
taken where it must not be) on each plane, that Twisted's splicer leaves a slow
reader's bytes in a pipe and stops the source rather than buffering, and that
pipes are reused and closed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Generator
from typing import Any

import pytest
from loopback import (
    LoopbackTestCase,
    MiB,
    connect,
    echo,
    echo_through,
    exchange,
    recv_all,
    sha256,
)
from planes import TWISTED, on_each_plane, on_planes
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread

from tunnelkit.app.build import prepare
from tunnelkit.cli.plugin import Options
from tunnelkit.config.model import ConfigError
from tunnelkit.relay import splice
from tunnelkit.relay.splice import PipePool

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="no splice(2) here")

Inline = Generator[Deferred[Any], Any, None]


# -- the pool ---------------------------------------------------------------


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_pool_makes_nonblocking_pipes_of_the_asked_size() -> None:
    pool = PipePool(256 * 1024)
    read_end, write_end, capacity = pool.take() or (-1, -1, 0)
    try:
        assert capacity == 256 * 1024
        assert os.get_blocking(read_end) is False and os.get_blocking(write_end) is False
        assert pool.made == 1
    finally:
        pool.discard((read_end, write_end, capacity))
    assert not is_open(read_end) and not is_open(write_end)


def test_pool_reuses_returned_pipes_and_keeps_at_most_keep() -> None:
    pool = PipePool(64 * 1024, keep=2)
    pipes = [pool.take() for _ in range(3)]
    assert all(p is not None for p in pipes)
    for p in pipes:
        assert p is not None
        pool.give(p)
    # Two kept, the third closed.
    assert [is_open(p[0]) for p in pipes if p] == [True, True, False]
    again = pool.take()
    assert again in pipes and pool.made == 3
    assert again is not None
    pool.give(again)
    pool.close()
    assert not any(is_open(p[0]) or is_open(p[1]) for p in pipes if p)


def test_pool_keeps_the_kernel_size_when_the_asked_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_fcntl = splice.fcntl.fcntl

    def refusing(fd: int, command: int, arg: int = 0) -> int:
        if command == splice.fcntl.F_SETPIPE_SZ:
            raise PermissionError("over the per-user pipe limit")
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(splice.fcntl, "fcntl", refusing)
    pool = PipePool(1 << 20)
    pipe = pool.take()
    assert pipe is not None
    try:
        assert pipe[2] == real_fcntl(pipe[1], splice.fcntl.F_GETPIPE_SZ)
    finally:
        pool.discard(pipe)


def test_pool_without_descriptors_says_none(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(splice.os, "pipe2", exhausted)
    assert PipePool().take() is None


def test_pool_counts_pipes_against_the_descriptor_budget() -> None:
    """Room for 3 tunnels, 1 live: two pipes are made, not a third; two more tunnels take the pooled ones back."""
    live = [1]
    pool = PipePool(64 * 1024, slots=3, live=lambda: live[0])
    pipes = [pool.take(), pool.take()]
    assert pool.take() is None
    for pipe in pipes:
        assert pipe is not None
        pool.give(pipe)
    assert pool.open == 2
    live[0] = 3
    pool.make_room()
    assert pool.open == 0
    assert not any(is_open(p[0]) for p in pipes if p)


def test_pool_spills_lent_pipes_when_the_budget_is_spent() -> None:
    """A pipe holding bytes is handed to its spill once pooled ones are gone and the budget is still over."""
    live = [0]
    pool = PipePool(64 * 1024, slots=1, live=lambda: live[0])
    pipe = pool.take()
    assert pipe is not None
    spilled: list[bool] = []
    pool.lend(pipe, lambda: (spilled.append(True), pool.discard(pipe)))
    live[0] = 1
    pool.make_room()
    assert spilled == [True] and pool.open == 0


def test_pools_of_several_listeners_share_one_budget() -> None:
    """Two listeners' pools: one's pipes count against the other, and room is made in both."""
    live = [1]
    peers: list[PipePool] = []
    first = PipePool(64 * 1024, slots=3, live=lambda: live[0], peers=peers)
    second = PipePool(64 * 1024, slots=3, live=lambda: live[0], peers=peers)
    pipes = [first.take(), first.take()]
    assert second.take() is None
    for pipe in pipes:
        assert pipe is not None
        first.give(pipe)
    live[0] = 3
    second.make_room()
    assert first.open == 0
    assert not any(is_open(p[0]) for p in pipes if p)


# -- options ----------------------------------------------------------------


def test_splice_on_fails_where_there_is_no_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice, "AVAILABLE", False)
    options = Options(MemoryReactorClock())
    options.parseOptions(["--listen", "1", "--to", "h:1", "--splice", "on"])
    assert options.settings is not None
    with pytest.raises(ConfigError) as caught:
        prepare(options.settings, options.reactor)
    assert options.error_lines(caught.value) == (
        "tunnelkit: error: --splice on: this system has no splice(2) (Linux only)"
    )


# -- over real sockets ----------------------------------------------------------


@on_each_plane
class SpliceUseTests(LoopbackTestCase):
    """Which tunnels are spliced, as their records say."""

    @inlineCallbacks
    def one_tunnel(self, *args: str, payload_size: int) -> Generator[Deferred[Any], Any, bool]:
        """Echo ``payload_size`` random bytes through a forwarder; return whether it spliced."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address, *args)
        payload = os.urandom(payload_size)
        got = yield deferToThread(echo_through, fwd.address, payload)
        assert sha256(got) == sha256(payload)
        [record] = yield fwd.closed(1)
        assert (record["bytes_up"], record["bytes_down"]) == (payload_size, payload_size)
        return bool(record.get("spliced"))

    @inlineCallbacks
    def test_on_splices_from_the_join(self) -> Inline:
        """--splice on: even a tunnel that moved 10 bytes is spliced."""
        assert (yield self.one_tunnel("--splice", "on", payload_size=10))

    @inlineCallbacks
    def test_auto_leaves_small_messages_unspliced(self) -> Inline:
        """--splice auto: a tunnel whose reads never fill a read size is not spliced."""
        assert not (yield self.one_tunnel("--splice", "auto", payload_size=10))

    @inlineCallbacks
    def test_auto_splices_bulk(self) -> Inline:
        """--splice auto: 16 MiB through a 64 KiB read size fills a read: spliced from then on."""
        assert (yield self.one_tunnel("--read-size", "65536", payload_size=16 * MiB))

    @inlineCallbacks
    def test_auto_splices_bulk_with_a_huge_read_size(self) -> Inline:
        """--splice auto with --read-size 16 MiB: reads never fill it, a 256 KiB read still marks bulk."""
        assert (yield self.one_tunnel("--read-size", str(16 * MiB), payload_size=32 * MiB))

    @inlineCallbacks
    def test_off_never_splices(self) -> Inline:
        """--splice off: 16 MiB through a 64 KiB read size are copied through user space, never spliced."""
        args = ("--splice", "off", "--read-size", "65536")
        assert not (yield self.one_tunnel(*args, payload_size=16 * MiB))

    @inlineCallbacks
    def test_unix_client_leg_is_spliced(self) -> Inline:
        """A unix: listener in front of a TCP backend: spliced too, 16 MiB echoed intact."""
        backend = self.serve(echo)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "tk.sock")
        fwd = self.forward("--to", backend.address, "--splice", "on", listen=f"unix:{path}")
        payload = os.urandom(16 * MiB)

        def client() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(path)
                return exchange(sock, payload)

        got = yield deferToThread(client)
        assert sha256(got) == sha256(payload)
        [record] = yield fwd.closed(1)
        assert (record["bytes_up"], record["bytes_down"], record["spliced"]) == (
            16 * MiB,
            16 * MiB,
            True,
        )


@on_planes(TWISTED)
class SplicerTests(LoopbackTestCase):
    """What Twisted's splicer does with a slow reader (it looks into the splicer; the engine's pipes: test_fd_exhaustion.py)."""

    @inlineCallbacks
    def test_stalled_reader_leaves_bytes_in_a_pipe_and_pauses_the_writer(self) -> Inline:
        """A backend that reads nothing: the bytes it did not take wait in one pipe, the client is not read, then all arrive."""
        gate = threading.Event()
        size = 32 * MiB

        def late_reader(conn: socket.socket) -> str:
            gate.wait(30)
            return sha256(recv_all(conn))

        backend = self.serve(late_reader)
        fwd = self.forward("--to", backend.address, "--splice", "on")
        payload = os.urandom(size)
        sender = deferToThread(send_and_close, fwd.address, payload)
        reactor = fwd.service.reactor
        for _ in range(500):
            tunnels = fwd.tunnels
            if tunnels and tunnels[0].splicer and tunnels[0].splicer.in_flight():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [tunnel] = fwd.tunnels
        assert tunnel.splicer is not None
        assert 0 < tunnel.splicer.in_flight() <= splice.PIPE_SIZE
        # Backpressure: the client's socket is no longer watched for reading.
        assert tunnel.client.transport not in reactor.getReaders()
        gate.set()
        sent = yield sender
        assert sent == size
        digest = yield deferToThread(backend.outcome)
        assert digest == sha256(payload)
        [record] = yield fwd.closed(1)
        assert record["bytes_up"] == size
        assert record["spliced"] is True


def send_and_close(address: str, payload: bytes) -> int:
    with connect(address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)
    return len(payload)
