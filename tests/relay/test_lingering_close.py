"""``--no-half-close`` closes without losing what was read: the lingering close, on both planes.

When the backend answers and closes while the client is still sending, the
proxy must not close the client's socket with unread input: Linux then sends
an RST and drops what it had not yet sent (the tail of the answer). The
proxy sends what it read, shuts down writing (the client sees the whole
answer and a FIN), then reads and discards until the client closes. The
backend gets every byte the proxy read from the client and a FIN, and the
record counts exactly those bytes. Real loopback sockets, random payloads
checked by SHA-256, on the native engine (spliced or not) and Twisted's path.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Generator
from typing import Any

from loopback import IO_TIMEOUT, LoopbackTestCase, MiB, connect, recv_outcome, sha256
from planes import ENGINE, ENGINE_NO_SPLICE, ENGINE_SPLICE, TWISTED, TWISTED_SPLICE, on_planes
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread

Inline = Generator[Deferred[Any], Any, None]

#: The client's request: far more than the socket buffers on both sides hold.
REQUEST = 16 * MiB

#: The backend's answer, sent after the first part of the request.
ANSWER = MiB

#: Rounds per test: the failure depends on timing, so each test tries several.
ROUNDS = 8


class Backend:
    """Reads the first 64 KiB of the request, answers and closes (FIN), then reads what still comes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def __call__(self, conn: socket.socket) -> tuple[int, str, str]:
        """What it received after the answer was sent: the size, SHA-256 and ``EOF``/``RST`` of the whole request."""
        digest = hashlib.sha256()
        size = 0
        while size < 64 * 1024 and (chunk := conn.recv(64 * 1024 - size)):
            digest.update(chunk)
            size += len(chunk)
        conn.sendall(self.answer)
        conn.shutdown(socket.SHUT_WR)
        rest, how = recv_outcome(conn)
        digest.update(rest)
        return size + len(rest), digest.hexdigest(), how


def request_while_reading(address: str, request: bytes) -> tuple[bytes, str, list[BaseException]]:
    """Send ``request`` from a thread while reading until the proxy closes; then close.

    Returns what was read, how the read ended and what the sender met.
    """
    failures: list[BaseException] = []
    with connect(address) as sock:

        def send() -> None:
            try:
                sock.sendall(request)
            except OSError as e:
                failures.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        data, how = recv_outcome(sock)
        sender.join(IO_TIMEOUT)
        assert not sender.is_alive(), "the sender is still blocked"
    return data, how, failures


@on_planes(ENGINE, ENGINE_SPLICE, ENGINE_NO_SPLICE, TWISTED, TWISTED_SPLICE)
class LingeringCloseTests(LoopbackTestCase):
    """The backend answers and closes while the request is still arriving (``--no-half-close``)."""

    @inlineCallbacks
    def test_answer_and_request_survive_an_early_backend_close(self) -> Inline:
        """The client gets the whole answer and a clean close; the backend every byte read, then a FIN."""
        answer = os.urandom(ANSWER)
        request = os.urandom(REQUEST)
        backend = self.serve(Backend(answer))
        fwd = self.forward("--to", backend.address, "--no-half-close")
        for round_ in range(ROUNDS):
            data, how, failures = yield deferToThread(request_while_reading, fwd.address, request)
            got, digest, backend_how = yield deferToThread(backend.outcome)
            records = yield fwd.closed(round_ + 1)
            record = records[round_]
            assert (len(data), sha256(data), how) == (ANSWER, sha256(answer), "EOF"), round_
            assert failures == [], (round_, failures)
            assert backend_how == "EOF", round_
            assert digest == sha256(request[:got]), round_
            assert (record["closed_by"], record["close_kind"]) == ("backend", "FIN"), record
            assert (record["bytes_up"], record["bytes_down"]) == (got, ANSWER), (round_, record)
