"""``--access-log`` in a real ``twistd``: one line per tunnel in the file, none in twistd's log, logrotate's SIGHUP.

Clients send random payloads of random sizes through an echo backend; each
line must carry the byte counts of its own client (matched by client port).
"""

from __future__ import annotations

import os
import random
import signal
import stat
from pathlib import Path

import pytest
from loopback import Serve, connect, echo, exchange
from planes import Plane, on_each_plane
from processes import (
    access_log_records,
    assert_clean_stop,
    executable,
    kill_pid,
    listening_addresses,
    pid_alive,
    read_text,
    run,
    tunnel_closed_events,
    twistd,
    wait_until,
)


def echo_random(address: str, count: int) -> dict[str, int]:
    """``count`` clients one after the other, each echoing a random payload; client address -> size."""
    sizes: dict[str, int] = {}
    for _ in range(count):
        payload = os.urandom(random.randint(1, 300_000))
        with connect(address) as sock:
            host, port = sock.getsockname()[:2]
            assert exchange(sock, payload) == payload
        sizes[f"{host}:{port}"] = len(payload)
    return sizes


def byte_counts(records: list[dict[str, object]]) -> dict[str, tuple[object, object]]:
    return {str(r["client"]): (r["bytes_up"], r["bytes_down"]) for r in records}


def umasked(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@on_each_plane
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_line_per_tunnel_in_the_file_and_none_in_twistds_log(
    tmp_path: Path, serve: Serve, log_format: str, plane: Plane
) -> None:
    """25 tunnels of random sizes: 25 lines with their byte counts (the last ones flushed by SIGTERM), no tunnel_closed in twistd's log."""
    backend = serve(echo)
    path = tmp_path / "access.log"
    argv = ("--listen", "127.0.0.1:0", "--to", backend.address,
            "--access-log", str(path), "--access-log-format", log_format)  # fmt: skip
    with twistd(*argv, cwd=tmp_path, plane=plane) as tk:
        [address] = tk.wait_listening()
        sizes = echo_random(address, 25)
        # At once: the last records are still queued; the drain writes them out.
        assert_clean_stop(tk, tk.stop())
    records = access_log_records(path.read_text())
    assert byte_counts(records) == {client: (size, size) for client, size in sizes.items()}
    assert len(records) == 25
    assert {(r["backend"], r["close_kind"], r["closed_by"]) for r in records} == {
        (backend.address, "FIN", "client")
    }
    assert tunnel_closed_events(tk.output) == [], tk.output
    assert stat.S_IMODE(path.stat().st_mode) == umasked(0o640)


@on_each_plane
def test_sighup_after_rotation_writes_to_a_new_file(
    tmp_path: Path, serve: Serve, plane: Plane
) -> None:
    """logrotate: rename the file and send SIGHUP; earlier tunnels stay in the old file, later ones land in a new one."""
    backend = serve(echo)
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    argv = ("--listen", "127.0.0.1:0", "--to", backend.address, "--access-log", str(path))
    with twistd(*argv, cwd=tmp_path, plane=plane) as tk:
        [address] = tk.wait_listening()
        before = echo_random(address, 3)
        wait_until(lambda: len(read_text(path).splitlines()) == 3, "3 lines")
        path.rename(rotated)
        tk.send_signal(signal.SIGHUP)
        tk.wait_for(lambda text: f"access log {path} reopened" in text, "access_log_reopened")
        assert path.exists()
        after = echo_random(address, 2)
        assert_clean_stop(tk, tk.stop())
    assert byte_counts(access_log_records(rotated.read_text())).keys() == before.keys()
    assert byte_counts(access_log_records(path.read_text())) == {
        client: (size, size) for client, size in after.items()
    }


def test_daemon_keeps_the_file_and_reopens_the_path_given(tmp_path: Path, serve: Serve) -> None:
    """Daemonized with --rundir elsewhere: the file opened before the fork gets the lines, and SIGHUP reopens the path relative to where twistd started."""
    backend = serve(echo)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pidfile, logfile = tmp_path / "tk.pid", tmp_path / "tk.log"
    argv = [executable("twistd"), "--pidfile", str(pidfile), "--logfile", str(logfile),
            "--rundir", str(run_dir), "tunnelkit", "--listen", "127.0.0.1:0",
            "--to", backend.address, "--access-log", "access.log"]  # fmt: skip
    started = run(argv, cwd=tmp_path)
    assert started.returncode == 0, started.stdout
    pid = int(wait_until(lambda: read_text(pidfile).strip(), "the pid file"))
    try:
        [address] = wait_until(lambda: listening_addresses(read_text(logfile)), "listening")
        path = tmp_path / "access.log"
        echo_random(address, 2)
        wait_until(lambda: len(read_text(path).splitlines()) == 2, "2 lines")
        path.rename(tmp_path / "access.log.1")
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "reopened" in read_text(logfile), "access_log_reopened")
        sizes = echo_random(address, 1)
        wait_until(lambda: read_text(path), "a line in the new file")
        assert byte_counts(access_log_records(read_text(path))).keys() == sizes.keys()
        assert not (run_dir / "access.log").exists()
        assert tunnel_closed_events(read_text(logfile)) == []
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), "the daemon to exit")
    finally:
        kill_pid(pid)
