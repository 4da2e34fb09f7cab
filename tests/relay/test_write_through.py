"""The write-through path: straight to an idle socket, queued behind anything pending."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from tunnelkit.relay.write_through import writer_for


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Connection, socket.socket, MemoryReactor]]:
    """A Twisted TCP connection object on one end of a socket pair; the raw other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    reactor = MemoryReactor()
    connection = tcp.Connection(ours, Protocol(), reactor)
    connection.connected = 1
    yield connection, theirs, reactor
    ours.close()
    theirs.close()


def test_idle_socket_gets_bytes_at_once(
    pair: tuple[tcp.Connection, socket.socket, MemoryReactor],
) -> None:
    """With nothing queued the bytes are in the kernel before the reactor runs, and nothing is queued."""
    connection, theirs, reactor = pair
    writer_for(connection)(b"hello")
    assert theirs.recv(16) == b"hello"
    assert connection._tempDataLen == 0
    assert not reactor.writers


def test_queued_bytes_are_never_overtaken(
    pair: tuple[tcp.Connection, socket.socket, MemoryReactor],
) -> None:
    """Bytes already queued in Twisted keep their place: later ones queue behind them."""
    connection, theirs, _reactor = pair
    connection.write(b"first ")
    writer_for(connection)(b"second")
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(16)
    assert connection._tempDataBuffer == [b"first ", b"second"]


def test_what_the_kernel_refuses_is_queued(
    pair: tuple[tcp.Connection, socket.socket, MemoryReactor],
) -> None:
    """A partial send queues exactly the rest, in order, and asks the reactor to write it."""
    connection, _theirs, reactor = pair
    payload = os.urandom(16 * 1024 * 1024)
    writer_for(connection)(payload)
    queued = connection._tempDataLen
    assert 0 < queued < len(payload)
    assert b"".join(connection._tempDataBuffer) == payload[len(payload) - queued :]
    assert set(reactor.writers) == {connection}


def test_disabled_always_queues(pair: tuple[tcp.Connection, socket.socket, MemoryReactor]) -> None:
    """--no-write-through: Twisted's own queued write, nothing sent before the reactor runs."""
    connection, _theirs, _reactor = pair
    writer_for(connection, enabled=False)(b"hello")
    assert connection._tempDataBuffer == [b"hello"]


def test_other_transports_use_their_own_write() -> None:
    """TLS and in-memory transports are written the ordinary way."""
    transport = StringTransport()
    writer_for(transport)(b"hello")
    assert transport.value() == b"hello"
