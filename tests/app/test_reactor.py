"""tunnelkit's epoll reactor: events dispatched without a log context, errors contained."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from processes import twistd
from twisted.internet import epollreactor
from twisted.internet.error import ConnectionDone
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.app.reactor import EPollReactor


class Reader:
    """A read descriptor on one end of a socket pair, recording what happens to it."""

    def __init__(self, sock: socket.socket, *, lost_raises: bool = False) -> None:
        self.sock = sock
        self.lost_raises = lost_raises
        self.reads = 0
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> object:
        self.reads += 1
        data = self.sock.recv(100)
        return None if data else ConnectionDone()

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)
        if self.lost_raises:
            raise RuntimeError("connectionLost blew up")


def test_a_failing_event_does_not_stop_the_others() -> None:
    """One descriptor's handler raising is logged; the next ready descriptor is still served."""
    reactor = EPollReactor()  # type: ignore[no-untyped-call]
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        bad = Reader(pairs[0][0], lost_raises=True)
        good = Reader(pairs[1][0])
        reactor.addReader(bad)
        reactor.addReader(good)
        pairs[0][1].close()  # EOF: doRead returns ConnectionDone, connectionLost raises
        pairs[1][1].sendall(b"x")
        reactor.doPoll(1)
        assert bad.lost and good.reads == 1
        assert any(e.get("log_failure") is not None for e in logged)
    finally:
        globalLogPublisher.removeObserver(logged.append)
        reactor.removeAll()
        reactor._poller.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_the_in_process_suite_runs_on_it() -> None:
    """conftest.py installs it, so the relay tests exercise the reactor production uses."""
    from twisted.internet import reactor

    if os.environ.get("TUNNELKIT_TEST_REACTOR", "tunnelkit") == "tunnelkit":
        assert type(reactor) is EPollReactor
    else:
        assert type(reactor) is epollreactor.EPollReactor


@pytest.mark.skipif(
    os.environ.get("TUNNELKIT_TEST_REACTOR") == "twisted", reason="already the nested run"
)
def test_the_relay_suite_passes_on_twisteds_own_reactor(tmp_path: Path) -> None:
    """The relay socket suite, run again in a child pytest on Twisted's EPollReactor (the fast path off).

    The splice variants move bytes in the kernel, which the reactor does not
    change: they run again here only in the soak run (``TUNNELKIT_SOAK=1``),
    so the default suite keeps within its time.
    """
    suite = Path(__file__).parents[1] / "relay" / "test_relay_sockets.py"
    bounded = [] if os.environ.get("TUNNELKIT_SOAK") else ["-k", "not Splice and not splice"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", str(suite), *bounded],
        cwd=tmp_path,
        env={**os.environ, "TUNNELKIT_TEST_REACTOR": "twisted"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.mark.parametrize(
    ("twistd_options", "expected"),
    [
        ((), "tunnelkit.app.reactor.EPollReactor"),
        (("--reactor", "poll"), "twisted.internet.pollreactor.PollReactor"),
    ],
    ids=["default", "--reactor poll"],
)
def test_twistd_uses_it_unless_told_otherwise(
    tmp_path: Path, twistd_options: tuple[str, ...], expected: str
) -> None:
    """twistd -n tunnelkit runs on this reactor; twistd --reactor still wins."""
    argv = ("--listen", "127.0.0.1:0", "--to", "127.0.0.1:9")
    with twistd(*argv, cwd=tmp_path, twistd_options=twistd_options) as tk:
        tk.wait_listening()
        found = tk.wait_for(REACTOR_CLASS.findall, "reactor class")
    assert found == [expected]


REACTOR_CLASS = re.compile(r"reactor class: (\S+?)\.?$", re.MULTILINE)
