"""SIGHUP never stops tunnelkit: logrotate and systemd's ``ExecReload`` send it routinely.

Each process is sent three SIGHUPs while a 64 MiB echo is in flight; every
byte must come back, the process must keep serving, and each SIGHUP is one
log line saying what was reloaded (or that nothing was). Before the handler
was installed unconditionally, a process with nothing to reload died at the
first SIGHUP, with a clean EOF in the middle of the transfer.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from certs import write_pair
from loopback import (
    MiB,
    Serve,
    assert_echoes,
    connect,
    echo,
    hash_until_eof,
    recv_exactly,
    send_while_reading,
)
from planes import TWISTED, Plane, on_each_plane, on_planes
from processes import (
    Process,
    assert_clean_stop,
    json_events,
    listening_addresses,
    pid_alive,
    read_text,
    run,
    twistd,
    twistd_argv,
    wait_until,
)

SIZE = 64 * MiB
#: The received byte counts at which a SIGHUP is sent.
SIGHUP_AT = (SIZE // 4, SIZE // 2, 3 * SIZE // 4)


def _transfer_with_sighups(sock: socket.socket, tk: Process, payload: bytes, *, echo: bool) -> None:
    """Receive ``payload`` back (sending it first, with EOF, if ``echo``); SIGHUP ``tk`` at :data:`SIGHUP_AT`.

    Each SIGHUP waits for its log line before the next (pending signals merge).
    """
    pending = list(SIGHUP_AT)

    def progress(received: int) -> None:
        while pending and received >= pending[0]:
            pending.pop(0)
            tk.send_signal(signal.SIGHUP)
            sent = len(SIGHUP_AT) - len(pending)
            tk.wait_for(lambda text, n=sent: len(_sighup_lines(text)) >= n, f"SIGHUP line {sent}")

    digest = send_while_reading(payload, sock, progress) if echo else hash_until_eof(sock, progress)
    assert digest == hashlib.sha256(payload).hexdigest()
    assert not pending


def _send_payload(payload: bytes) -> Callable[[socket.socket], None]:
    """A backend that sends ``payload`` to each client (TLS clients cannot send and read in two threads)."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(MiB):
            pass

    return handler


def _sighup_lines(output: str) -> list[dict[str, object]]:
    return [event for event in json_events(output) if event.get("event") == "sighup"]


def _plain(address: str) -> socket.socket:
    return connect(address)


def _through_connect(target: str) -> Callable[[str], socket.socket]:
    def dial(address: str) -> socket.socket:
        sock = connect(address)
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert recv_exactly(sock, len(established)) == established
        return sock

    return dial


def _tls(address: str) -> socket.socket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(connect(address))


def _json_logger() -> tuple[str, ...]:
    return ("--logger", "tunnelkit.json_log.observer")


def _three_sighups(
    tk: Process, dial: Callable[[str], socket.socket], payload: bytes, echo: bool
) -> None:
    """A transfer through ``tk`` with three SIGHUPs, then one more exchange; then a clean stop."""
    [address] = tk.wait_listening()
    with dial(address) as sock:
        _transfer_with_sighups(sock, tk, payload, echo=echo)
    with dial(address) as sock:
        if echo:
            sock.sendall(b"still serving")
            assert recv_exactly(sock, 13) == b"still serving"
        else:
            assert recv_exactly(sock, 1024) == payload[:1024]
    lines = tk.wait_for(lambda text: _sighup_lines(text)[2:] or None, "three sighup events")
    assert_clean_stop(tk, tk.stop())
    assert len(_sighup_lines(tk.output)) == 3, tk.output
    assert all(line["reloading"] == [] for line in lines)


@on_each_plane
def test_three_sighups_during_a_transfer(tmp_path: Path, serve: Serve, plane: Plane) -> None:
    """Three SIGHUPs during a 64 MiB echo: every byte arrives, the process keeps serving, each SIGHUP is logged once."""
    backend = serve(echo)
    args = ("--listen", "127.0.0.1:0", "--to", backend.address)
    with twistd(*args, cwd=tmp_path, twistd_options=_json_logger(), plane=plane) as tk:
        _three_sighups(tk, _plain, os.urandom(SIZE), echo=True)


@on_planes(TWISTED)
@pytest.mark.parametrize("mode", ["connect", "ssl-listener"])
def test_three_sighups_during_a_transfer_through_twisted_only_listeners(
    tmp_path: Path, serve: Serve, mode: str, plane: Plane
) -> None:
    """The same through a CONNECT proxy and (a download) through an ssl: listener, which Twisted serves."""
    payload = os.urandom(SIZE)
    if mode == "connect":
        backend = serve(echo)
        args: tuple[str, ...] = ("--mode", "connect", "--listen", "127.0.0.1:0")
        args += ("--allow-dest", "127.0.0.0/8")
        dial = _through_connect(backend.address)
    else:
        backend = serve(_send_payload(payload))
        pair = write_pair(trustme.CA(), tmp_path, "localhost")
        listen = f"ssl:0:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
        args = ("--listen", listen, "--to", backend.address)
        dial = _tls
    with twistd(*args, cwd=tmp_path, twistd_options=_json_logger(), plane=plane) as tk:
        _three_sighups(tk, dial, payload, echo=mode == "connect")


@on_each_plane
def test_sighup_reloads_what_is_reloadable(tmp_path: Path, serve: Serve, plane: Plane) -> None:
    """With --tls-cert and --access-log, SIGHUP's one line names both, and both are reloaded."""
    backend = serve(echo)
    pair = write_pair(trustme.CA(), tmp_path, "localhost")
    access = tmp_path / "access.log"
    args = ("--listen", "127.0.0.1:0", "--to", backend.address, "--tls-cert", str(pair.cert))
    args += ("--tls-key", str(pair.key), "--access-log", str(access))
    with twistd(*args, cwd=tmp_path, twistd_options=_json_logger(), plane=plane) as tk:
        tk.wait_listening()
        tk.send_signal(signal.SIGHUP)
        [line] = tk.wait_for(_sighup_lines, "a sighup event")
        tk.wait_for(lambda text: "tls_reloaded" in text or None, "tls_reloaded")
        tk.wait_for(lambda text: "access_log_reopened" in text or None, "access_log_reopened")
        assert_clean_stop(tk, tk.stop())
    assert line["reloading"] == ["the access log", "the TLS certificates"]


def test_daemonized_sighup_keeps_serving(tmp_path: Path, serve: Serve) -> None:
    """A daemonized twistd with nothing to reload survives SIGHUP, keeps serving, and removes its pidfile on SIGTERM."""
    backend = serve(echo)
    pidfile = tmp_path / "tk.pid"
    logfile = tmp_path / "tk.log"
    argv = twistd_argv(
        "--listen",
        "127.0.0.1:0",
        "--to",
        backend.address,
        twistd_options=("--pidfile", str(pidfile), "--logfile", str(logfile)),
    )
    argv.remove("-n")
    started = run(argv, tmp_path)
    assert started.returncode == 0, started.stdout
    pid = wait_until(lambda: int(pidfile.read_text()) if pidfile.exists() else None, "pidfile")
    try:
        address = wait_until(
            lambda: (listening_addresses(read_text(logfile)) or [None])[0], "a listening line"
        )
        for count in range(1, 4):  # one at a time: pending signals merge
            os.kill(pid, signal.SIGHUP)
            wait_until(
                lambda count=count: read_text(logfile).count("SIGHUP: nothing to reload") == count,
                f"SIGHUP line {count}",
            )
        assert_echoes(address, 4 * MiB)
        assert pid_alive(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid) or None, "the daemon's exit")
    assert not pidfile.exists()
    assert "Traceback" not in read_text(logfile)
