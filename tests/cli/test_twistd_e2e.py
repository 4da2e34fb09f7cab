"""The installed plugin run as a real process (``twistd``, ``twist``, ``tunnelkit``) with real clients.

Backends are small servers in threads of the test process; ``twistd`` listens
on port 0 (or a port just handed out by the kernel) and says where in its log.
Payloads are random and checked by SHA-256.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loopback import (
    Download,
    MiB,
    Serve,
    assert_echoes,
    connect,
    echo,
    http_backend,
    paced_bulk,
    sha256,
)
from processes import (
    CLEAN_SIGTERM_EXIT,
    assert_clean_stop,
    executable,
    free_port,
    kill_pid,
    listening_addresses,
    pid_alive,
    read_text,
    run,
    tunnel_closed_events,
    tunnelkit,
    twist,
    twistd,
    twistd_argv,
    wait_until,
)

# -- forwarding through each entry point ----------------------------------


def test_twistd_forwards_python_client(tmp_path: Path, serve: Serve) -> None:
    """twistd -n tunnelkit --listen 127.0.0.1:P relays a 2 MiB echo intact on the native engine and logs it once."""
    backend = serve(echo)
    port = free_port()
    with twistd("--listen", f"127.0.0.1:{port}", "--to", backend.address, cwd=tmp_path) as tk:
        assert tk.wait_listening() == [f"127.0.0.1:{port}"]
        size = len(assert_echoes(f"127.0.0.1:{port}"))
        [closed] = tk.wait_for(tunnel_closed_events, "tunnel_closed")
        assert_clean_stop(tk, tk.stop())
    assert "relaying with the native engine" in tk.output, tk.output
    assert (closed["bytes_up"], closed["bytes_down"]) == (size, size)
    assert (closed["backend"], closed["close_kind"], closed["closed_by"]) == (
        backend.address,
        "FIN",
        "client",
    )
    assert backend.accepted == 1


def test_no_access_log(tmp_path: Path, serve: Serve) -> None:
    """--no-access-log: tunnels work and end as usual, and no tunnel_closed event is logged."""
    backend = serve(echo)
    argv = ("--listen", "127.0.0.1:0", "--to", backend.address, "--no-access-log")
    with twistd(*argv, cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        for _ in range(3):
            assert_echoes(address, 64 * 1024)
        # The drain on SIGTERM flushes any access-log event still queued.
        assert_clean_stop(tk, tk.stop())
    assert backend.accepted == 3
    assert tunnel_closed_events(tk.output) == []


def test_curl_through_twistd(tmp_path: Path) -> None:
    """curl fetches a 3 MiB file from an HTTP backend through twistd byte for byte."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(3 * MiB)
    (www / "file").write_bytes(body)
    with http_backend(www) as backend:
        with twistd("--listen", "127.0.0.1:0", "--to", backend, cwd=tmp_path) as tk:
            [address] = tk.wait_listening()
            fetched = subprocess.run(
                [curl, "-s", "-f", "--max-time", "20", f"http://{address}/file"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            assert fetched.returncode == 0, fetched.stderr
            assert sha256(fetched.stdout) == sha256(body)
            [closed] = tk.wait_for(tunnel_closed_events, "tunnel_closed")
            assert_clean_stop(tk, tk.stop())
        assert closed["bytes_down"] > len(body)


def test_twist_forwards(tmp_path: Path, serve: Serve) -> None:
    """twist tunnelkit runs the same plugin: it relays intact and logs JSON tunnel_closed events."""
    backend = serve(echo)
    with twist("--listen", "127.0.0.1:0", "--to", backend.address, cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        size = len(assert_echoes(address))
        [closed] = tk.wait_for(tunnel_closed_events, "tunnel_closed")
        returncode = tk.stop()
        assert returncode == CLEAN_SIGTERM_EXIT, tk.output
        assert "Traceback" not in tk.output
    assert (closed["bytes_up"], closed["bytes_down"]) == (size, size)


def test_console_script_forwards(tmp_path: Path, serve: Serve) -> None:
    """The tunnelkit console script is twist tunnelkit: it listens and relays intact."""
    backend = serve(echo)
    with tunnelkit("--listen", "127.0.0.1:0", "--to", backend.address, cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        assert_echoes(address)
        assert tk.stop() == CLEAN_SIGTERM_EXIT, tk.output


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="::1 is not available")
def test_ipv6_listen_and_backend(tmp_path: Path, serve: Serve) -> None:
    """--listen [::1]:0 --to [::1]:B listens and connects over IPv6."""
    backend = serve(echo, host="::1")
    with twistd("--listen", "[::1]:0", "--to", backend.address, cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        assert address.startswith("[::1]:")
        size = len(assert_echoes(address))
        [closed] = tk.wait_for(tunnel_closed_events, "tunnel_closed")
        assert_clean_stop(tk, tk.stop())
    assert closed["client"].startswith("[::1]:")
    assert closed["backend_address"] == backend.address
    assert closed["bytes_down"] == size


def test_unix_listener(tmp_path: Path, serve: Serve) -> None:
    """--listen unix:PATH relays AF_UNIX clients, refuses a second instance on PATH and removes socket and lock on stop."""
    backend = serve(echo)
    path = tmp_path / "tk.sock"
    other = tmp_path / "other"
    other.mkdir()
    argv = ("--listen", f"unix:{path}", "--to", backend.address)
    with twistd(*argv, cwd=tmp_path) as tk:
        assert tk.wait_listening() == [str(path)]
        size = len(assert_echoes(str(path)))
        [closed] = tk.wait_for(tunnel_closed_events, "tunnel_closed")
        second = run(twistd_argv(*argv), cwd=other)
        assert second.returncode == 1, second.stdout
        assert second.stdout.startswith("tunnelkit: error: cannot listen on unix:"), second.stdout
        assert_echoes(str(path), 1024)
        assert_clean_stop(tk, tk.stop())
    assert (closed["bytes_up"], closed["bytes_down"]) == (size, size)
    assert not os.path.lexists(path)
    assert not os.path.lexists(f"{path}.lock")


# -- daemon mode ----------------------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Pids of the daemons a test started; any still running are killed afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        kill_pid(pid)


def daemon_argv(directory: Path, name: str, *args: str) -> list[str]:
    """``twistd --pidfile NAME.pid --logfile NAME.log tunnelkit ARGS`` (no -n: it daemonizes)."""
    files = [
        "--pidfile",
        str(directory / f"{name}.pid"),
        "--logfile",
        str(directory / f"{name}.log"),
    ]
    return [executable("twistd"), *files, "tunnelkit", *args]


def start_daemon(directory: Path, name: str, pids: list[int], *args: str) -> int:
    """Start a daemon that must succeed; record and return its pid."""
    started = run(daemon_argv(directory, name, *args), cwd=directory)
    pidfile = directory / f"{name}.pid"
    if started.returncode == 0:
        pids.append(int(wait_until(lambda: read_text(pidfile).strip(), f"{pidfile}")))
    assert started.returncode == 0, started.stdout
    assert started.stdout == ""
    return pids[-1]


def test_daemon_mode(tmp_path: Path, serve: Serve, daemons: list[int]) -> None:
    """twistd without -n returns 0, writes its pid file, forwards and logs to --logfile; SIGTERM stops it and removes the pid file."""
    backend = serve(echo)
    pidfile, logfile = tmp_path / "tk.pid", tmp_path / "tk.log"
    pid = start_daemon(tmp_path, "tk", daemons, "--listen", "127.0.0.1:0", "--to", backend.address)
    assert pid_alive(pid)
    [address] = wait_until(lambda: listening_addresses(read_text(logfile)), "listening")
    size = len(assert_echoes(address))
    [closed] = wait_until(lambda: tunnel_closed_events(read_text(logfile)), "tunnel_closed")
    assert (closed["bytes_up"], closed["bytes_down"]) == (size, size)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), "the daemon to exit")
    assert not pidfile.exists()
    log = read_text(logfile)
    assert "Server Shut Down." in log
    assert "Traceback" not in log
    with pytest.raises(ConnectionRefusedError):
        connect(address).close()


def test_daemon_unix_listener_keeps_its_path(
    tmp_path: Path, serve: Serve, daemons: list[int]
) -> None:
    """A daemon on unix:PATH forwards, a second daemon on PATH is refused, and SIGTERM removes socket and lock."""
    backend = serve(echo)
    path = tmp_path / "tk.sock"
    args = ("--listen", f"unix:{path}", "--to", backend.address)
    pid = start_daemon(tmp_path, "first", daemons, *args)
    wait_until(lambda: listening_addresses(read_text(tmp_path / "first.log")), "listening")
    assert_echoes(str(path), 1024)
    second = run(daemon_argv(tmp_path, "second", *args), cwd=tmp_path)
    if second.returncode == 0:
        daemons.append(int(wait_until(lambda: read_text(tmp_path / "second.pid").strip(), "pid")))
    assert second.returncode == 1, second.stdout
    assert second.stdout.startswith("tunnelkit: error: cannot listen on unix:"), second.stdout
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), "the daemon to exit")
    assert not os.path.lexists(path)
    assert not os.path.lexists(f"{path}.lock")


# -- graceful stop --------------------------------------------------------


def test_sigterm_drains_transfer_in_flight(tmp_path: Path, serve: Serve) -> None:
    """SIGTERM mid-transfer: new clients are refused at once, the 64 MiB transfer completes intact, then twistd exits."""
    payload = os.urandom(64 * MiB)
    backend = serve(functools.partial(paced_bulk, payload, 3.0))
    argv = ("--listen", "127.0.0.1:0", "--to", backend.address, "--drain-timeout", "20")
    with twistd(*argv, cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        download = Download(address, b"GET\n")
        wait_until(lambda: download.received >= 8 * MiB or download.done.is_set(), "8 MiB", 10)
        assert not download.done.is_set(), download.failure
        sigterm_at = time.monotonic()
        tk.send_signal(signal.SIGTERM)
        tk.wait_for(lambda text: "draining 1 tunnel for" in text, "drain_started", 5)
        with pytest.raises(ConnectionRefusedError):
            connect(address).close()
        refused_after = time.monotonic() - sigterm_at
        assert download.received < len(payload), "the transfer ended before the drain was seen"
        assert tk.proc.poll() is None, "twistd did not wait for the tunnel"
        download.join(30)
        assert download.done.is_set(), "the transfer did not finish"
        assert not download.failure, download.failure
        assert download.received == len(payload)
        assert download.digest.hexdigest() == sha256(payload)
        returncode = tk.wait(10)
        exited_after = time.monotonic() - sigterm_at
        assert_clean_stop(tk, returncode)
        log = tk.stdout
    assert refused_after < 2, refused_after
    assert exited_after < 10, exited_after
    [closed] = tunnel_closed_events(log)
    assert closed["bytes_down"] == len(payload)
    assert (closed["close_kind"], closed["closed_by"]) == ("FIN", "backend")
    assert "drain deadline" not in log
    assert log.index(f"down {len(payload)} B") < log.index("Main loop terminated.")


@pytest.mark.parametrize("logged", [True, False], ids=["logged", "--no-access-log"])
def test_drain_timeout_resets_idle_tunnel(tmp_path: Path, serve: Serve, logged: bool) -> None:
    """With --drain-timeout 1 an idle tunnel is reset after about a second and twistd exits.

    Unlogged, no record tells the drain that the engine emptied: the abort must.
    """
    backend = serve(echo)
    unlogged = () if logged else ("--no-access-log",)
    argv = ("--listen", "127.0.0.1:0", "--to", backend.address, "--drain-timeout", "1", *unlogged)
    with twistd(*argv, cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        with connect(address) as sock:
            sock.sendall(b"ping")
            assert sock.recv(4, socket.MSG_WAITALL) == b"ping"
            sigterm_at = time.monotonic()
            tk.send_signal(signal.SIGTERM)
            try:
                leftover = sock.recv(1024)
            except ConnectionResetError:
                leftover = b""
            cut_after = time.monotonic() - sigterm_at
            assert leftover == b""
        returncode = tk.wait(10)
        exited_after = time.monotonic() - sigterm_at
        assert_clean_stop(tk, returncode)
        log = tk.stdout
    assert 0.8 <= cut_after <= 5, cut_after
    assert exited_after <= 6, exited_after
    assert "drain deadline reached; aborting 1 tunnel\n" in log
    if logged:
        [closed] = tunnel_closed_events(log)
        assert (closed["close_kind"], closed["closed_by"]) == ("shutdown", "proxy")


# -- command-line errors --------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[str]:
    """An address on which this test process is already listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


BAD_COMMANDS = {
    "unknown flag": ["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--bogus"],
    "bad option value": ["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--drain-timeout", "x"],
    "unparseable listen": ["--listen", "bogus:1:2", "--to", "127.0.0.1:9"],
    "listen without address": ["--listen", ":21113", "--to", "127.0.0.1:9"],
    "socket directory missing": ["--listen", "unix:/nonexistent/d/tk.sock", "--to", "127.0.0.1:9"],
    "unparseable backend": ["--listen", "127.0.0.1:0", "--to", "nohost"],
    "missing --to": ["--listen", "127.0.0.1:0"],
    "port in use": ["--listen", "{busy}", "--to", "127.0.0.1:9"],
    "bad access log": ["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--access-log", "/no/a"],
}

LAUNCHERS: dict[str, Callable[[Path], list[str]]] = {
    "twistd -n": lambda d: twistd_argv(),
    "twistd daemon": lambda d: daemon_argv(d, "tk"),
    "twist": lambda d: [executable("twist"), "tunnelkit"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_command_is_one_line_error(
    tmp_path: Path, busy_port: str, launcher: str, case: str
) -> None:
    """A bad command line exits 1 with exactly one 'tunnelkit: error:' line and no traceback, before any daemonizing."""
    args = [arg.format(busy=busy_port) for arg in BAD_COMMANDS[case]]
    result = run([*LAUNCHERS[launcher](tmp_path), *args], cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("tunnelkit: error:"), result.stdout
    assert "Traceback" not in result.stdout
    if case == "port in use":
        assert busy_port in lines[0]
    if case == "socket directory missing":
        assert "directory /nonexistent/d does not exist" in lines[0]
    if case == "bad access log":
        assert "--access-log /no/a: No such file or directory" in lines[0]
    assert not (tmp_path / "tk.pid").exists()
    assert "Traceback" not in read_text(tmp_path / "tk.log")


@pytest.mark.parametrize("option", ["--logfile", "--pidfile"])
@pytest.mark.parametrize("daemon", [False, True], ids=["-n", "daemon"])
def test_twistd_file_in_missing_directory(tmp_path: Path, option: str, daemon: bool) -> None:
    """twistd's --logfile or --pidfile in a missing directory: one error line naming it, exit 1, before listening or daemonizing."""
    path = tmp_path / "missing" / "tk.file"
    port = free_port()
    twistd_options = [option, str(path), *([] if daemon else ["-n"])]
    argv = [executable("twistd"), *twistd_options, "tunnelkit"]
    result = run([*argv, "--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:9"], cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines() == [
        f"tunnelkit: error: {option} {path}: directory {path.parent} does not exist (see --help)"
    ]
    assert not (tmp_path / "twistd.pid").exists()
    with pytest.raises(ConnectionRefusedError):
        connect(f"127.0.0.1:{port}").close()


@pytest.mark.parametrize("launcher", ["twistd daemon", "tunnelkit"])
def test_check_validates_without_listening(tmp_path: Path, busy_port: str, launcher: str) -> None:
    """--check: good options print 'configuration OK' and exit 0 at once, binding nothing and writing no pid file."""
    args = ["--listen", busy_port, "--to", "localhost:9", "--check"]
    front = (
        daemon_argv(tmp_path, "tk") if launcher == "twistd daemon" else [executable("tunnelkit")]
    )
    result = run([*front, *args], cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "tunnelkit: configuration OK\n")
    assert not (tmp_path / "tk.pid").exists()
    assert not (tmp_path / "tk.log").exists()
