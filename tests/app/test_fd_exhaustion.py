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

from loopback import IO_TIMEOUT, MiB, Serve, assert_echoes, echo, recv_all, sha256
from planes import ENGINE_SPLICE, TWISTED_SPLICE, Plane, on_each_plane, on_planes
from processes import free_port, start, tunnel_closed_events, twistd_argv, wait_until

#: The child's descriptor limit: room for about twenty tunnels after Python's own.
FD_LIMIT = 64

#: More clients than the limit leaves room for.
CLIENTS = 48


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@on_each_plane
def test_descriptor_exhaustion_is_survived(tmp_path: Path, serve: Serve, plane: Plane) -> None:
    """With no descriptor left, excess clients are closed at once, the proxy idles, and it serves again after."""
    backend = serve(echo)
    port = free_port()
    argv = twistd_argv(
        "--listen",
        f"127.0.0.1:{port}",
        "--to",
        backend.address,
        "--max-connections",
        "1000",
        plane=plane,
    )
    command = f"ulimit -n {FD_LIMIT} && exec {shlex.join(argv)}"
    with start(["sh", "-c", command], tmp_path, plane) as tk, contextlib.ExitStack() as clients:
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
        if plane.native:
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


#: The child's descriptor limit for the pipe tests: a cap of (256 - 64) / 2 = 96 tunnels.
PIPE_FD_LIMIT = 256

#: Stalled spliced transfers (each holds a pipe while its client reads nothing), the
#: clients served meanwhile, and the clients served once the stalled ones are done:
#: each phase within the cap.
STALLED, MEANWHILE, AFTER = 40, 50, 90

#: What each stalled client asks for: more than the kernel's socket buffers hold.
STALLED_SIZE = 8 * MiB

#: What :func:`send_requested` sends, over and over.
BLOCK = os.urandom(MiB)


def send_requested(conn: socket.socket) -> int:
    """Backend: on ``N\\n`` send N bytes (copies of :data:`BLOCK`), then FIN; the count sent."""
    request = b""
    while not request.endswith(b"\n") and len(request) < 32:
        chunk = conn.recv(32)
        if not chunk:
            return 0
        request += chunk
    size = int(request)
    for offset in range(0, size, MiB):
        conn.sendall(BLOCK[: min(MiB, size - offset)])
    conn.shutdown(socket.SHUT_WR)
    return size


def request(address: tuple[str, int], size: int) -> socket.socket:
    """A client that asked a :func:`send_requested` backend for ``size`` bytes."""
    sock = socket.create_connection(address, 5)
    sock.settimeout(IO_TIMEOUT)
    sock.sendall(b"%d\n" % size)
    return sock


def pipes_of(pid: int) -> int:
    """How many pipe descriptors process ``pid`` holds."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("pipe:")
    return count


def served(address: tuple[str, int], count: int) -> int:
    """Of ``count`` clients open at once, how many got their 1 KiB and EOF."""
    with contextlib.ExitStack() as clients:
        socks = [clients.enter_context(request(address, 1024)) for _ in range(count)]
        done = 0
        for sock in socks:
            with contextlib.suppress(ConnectionError, TimeoutError):
                done += recv_all(sock) == BLOCK[:1024]
    return done


@on_planes(ENGINE_SPLICE, TWISTED_SPLICE)
def test_pipes_leave_room_for_every_client_up_to_the_cap(
    tmp_path: Path, serve: Serve, plane: Plane
) -> None:
    """Splice pipes, holding bytes or pooled, never cost a client within the cap its descriptors; the held bytes all arrive."""
    backend = serve(send_requested, backlog=512)
    port = free_port()
    address = ("127.0.0.1", port)
    argv = twistd_argv(
        "--listen",
        f"127.0.0.1:{port}",
        "--to",
        backend.address,
        plane=plane,
    )
    expected = sha256(BLOCK * (STALLED_SIZE // MiB))
    command = f"ulimit -n {PIPE_FD_LIMIT} && exec {shlex.join(argv)}"
    with start(["sh", "-c", command], tmp_path, plane) as tk, contextlib.ExitStack() as stalled:
        tk.wait_listening()
        socks = [stalled.enter_context(request(address, STALLED_SIZE)) for _ in range(STALLED)]
        wait_until(lambda: pipes_of(tk.pid) >= 2 * STALLED or None, "a pipe per stalled tunnel")
        meanwhile = served(address, MEANWHILE)
        digests = [sha256(recv_all(sock)) for sock in socks]
        stalled.close()
        ended = STALLED + MEANWHILE
        tk.wait_for(lambda text: len(tunnel_closed_events(text)) >= ended or None, "the ends")
        after = served(address, AFTER)
        tk.stop()
    assert (meanwhile, after) == (MEANWHILE, AFTER), "clients within the cap were not served"
    assert digests == [expected] * STALLED
