"""Out of file descriptors: the proxy refuses the excess, does not spin, and recovers.

A stranger controls how many connections arrive; once the process has no
descriptor left, ``accept`` fails with EMFILE while the listening socket stays
readable, and a naive level-triggered loop then burns a core without ever
clearing the backlog. Both relay paths keep a descriptor in reserve to
accept and close the excess (the engine also logs ``accept_failed``).
Each test runs ``twistd`` under a low ``ulimit -n``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import time
from pathlib import Path

import pytest
from loopback import Serve, assert_echoes, echo
from processes import free_port, start, twistd_argv

#: The child's descriptor limit: room for about twenty tunnels after Python's own.
FD_LIMIT = 64

#: More clients than the limit leaves room for.
CLIENTS = 48


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("engine", ["native", "python"])
def test_descriptor_exhaustion_is_survived(tmp_path: Path, serve: Serve, engine: str) -> None:
    """With no descriptor left, excess clients are closed at once, the proxy idles, and it serves again after."""
    backend = serve(echo)
    port = free_port()
    argv = twistd_argv(
        "--listen",
        f"127.0.0.1:{port}",
        "--to",
        backend.address,
        "--engine",
        engine,
        "--max-connections",
        "1000",
    )
    command = f"ulimit -n {FD_LIMIT} && exec {shlex.join(argv)}"
    with start(["sh", "-c", command], tmp_path) as tk, contextlib.ExitStack() as clients:
        tk.wait_listening()
        socks = []
        for _ in range(CLIENTS):
            sock = clients.enter_context(socket.create_connection(("127.0.0.1", port), 5))
            sock.settimeout(5)
            socks.append(sock)
        # Some clients were accepted and closed at once for want of a descriptor.
        refused = 0
        for sock in socks:
            try:
                sock.sendall(b"x")
                if sock.recv(1) == b"":
                    refused += 1
            except (ConnectionError, TimeoutError):
                refused += 1
        assert refused > 0, "every client was served: the limit did not bite"
        if engine == "native":
            # Said once for the whole burst (the text form of the accept_failed event).
            tk.wait_for(lambda text: "out of file descriptors" in text or None, "accept_failed", 10)
            assert tk.output.count("out of file descriptors") == 1, tk.output
        # Saturated, the proxy waits instead of spinning on its listening socket.
        before = cpu_seconds(tk.pid)
        time.sleep(1.0)
        assert cpu_seconds(tk.pid) - before < 0.3
        clients.close()
        # Descriptors are back: a new client is served normally.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert_echoes(f"127.0.0.1:{port}", 64 * 1024)
                break
            except (ConnectionError, TimeoutError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        tk.stop()
