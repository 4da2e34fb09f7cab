"""Run by systemd: ``sd_notify`` messages (the test plays systemd), socket activation, dropped privileges.

The notification tests bind the datagram socket systemd would (tests/fake_systemd.py)
and read what ``twistd -n tunnelkit`` sends, in order, with the pid the kernel
says sent each message (systemd accepts the main process's only). The
activation tests open the listening socket themselves and exec twistd with
it at descriptor 3 and ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, as
systemd does for a ``.socket`` unit.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_systemd import NotifySocket, Recorder, activated_argv, activated_fds
from loopback import Serve, echo, echo_through, sha256
from planes import Plane, on_each_plane
from processes import Process, json_events, run, start, twistd_argv
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tunnelkit.app import systemd
from tunnelkit.app.service import TunnelService
from tunnelkit.relay.registry import TunnelRegistry

JSON_LOG = ("--logger", "tunnelkit.json_log.observer")


def events(process: Process, name: str) -> list[dict[str, Any]]:
    return [e for e in json_events(process.stdout) if e.get("event") == name]


def wait_events(process: Process, name: str, count: int) -> list[dict[str, Any]]:
    def enough(text: str) -> list[dict[str, Any]] | None:
        found = [e for e in json_events(text) if e.get("event") == name]
        return found if len(found) >= count else None

    return process.wait_for(enough, f"{count} {name} events")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


# -- the protocol, in memory ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/123", "\0/org/freedesktop/systemd1/notify/123"),
        ("@", None),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_notify_socket_values(value: str, address: str | None) -> None:
    """A path, or an abstract ``@`` name; anything else (vsock:, relative) is not ours to use."""
    assert systemd.notify_address(value) == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    """Half of WATCHDOG_USEC, when the watchdog watches this process."""
    assert systemd.watchdog_interval(environ) == interval


def test_messages_and_watchdog_reach_the_socket(tmp_path: Path) -> None:
    """Each message is one datagram of KEY=value lines; the watchdog pings at its interval."""
    with NotifySocket(tmp_path, abstract=True) as manager:
        environ = {**manager.environment(), "WATCHDOG_USEC": "2000000"}
        notifier = systemd.Notifier.from_environment(environ)
        assert notifier is not None
        notifier.ready("serving 127.0.0.1:1")
        notifier.reloading("reloading")
        notifier.stopping("draining", 12.5)
        clock = Clock()
        notifier.start_watchdog(clock)
        clock.advance(1.0)
        manager.wait_for("WATCHDOG", 2, timeout=5)
    ready, reloading, stopping, *pings = manager.received
    assert ready.fields == (("READY", "1"), ("STATUS", "serving 127.0.0.1:1"))
    assert reloading.keys == ("RELOADING", "MONOTONIC_USEC", "STATUS")
    assert 0 < int(reloading.get("MONOTONIC_USEC") or 0) <= systemd.monotonic_usec()
    assert stopping.get("STOPPING") == "1" and stopping.get("EXTEND_TIMEOUT_USEC") == "12500000"
    assert [p.fields for p in pings] == [(("WATCHDOG", "1"),)] * 2
    assert {note.pid for note in manager.received} == {os.getpid()}


def test_no_socket_no_notifier_and_a_lost_manager_is_not_fatal(tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET nothing is sent; a socket that went away fails one message, quietly."""
    assert systemd.Notifier.from_environment({}) is None
    assert systemd.Notifier.from_environment({"NOTIFY_SOCKET": "vsock:1:2"}) is None
    assert not systemd.Notifier(str(tmp_path / "gone.sock")).send(READY=1)


def test_workers_inherit_none_of_the_managers_variables() -> None:
    """NOTIFY_SOCKET, the watchdog's and socket activation's variables are the supervisor's alone."""
    environ = {name: "x" for name in systemd.MANAGER_VARIABLES} | {"PATH": "/bin"}
    assert systemd.manager_free(environ) == {"PATH": "/bin"}


def test_a_reload_is_ready_when_its_work_is_done() -> None:
    """RELOADING=1 first; READY=1 only once on_reload's Deferred fires (a reload may take a while)."""
    pending: Deferred[None] = Deferred()
    service = TunnelService([], TunnelRegistry(Clock(), 10), 3.0, on_reload=lambda: pending)
    service.notifier = recorder = Recorder()  # type: ignore[assignment]
    service.reload()
    assert recorder.calls == ["reloading"]
    pending.callback(None)
    assert recorder.calls == ["reloading", "ready"]


def test_a_systemd_listener_without_its_socket_is_one_clear_error(tmp_path: Path) -> None:
    """No socket passed (not started by a .socket unit): the error says so, not "list index out of range"."""
    done = run(
        twistd_argv("--listen", "systemd:domain=INET:index=0", "--to", "127.0.0.1:9"), tmp_path
    )
    assert done.returncode == 1, done.stdout
    assert "systemd passed no such socket" in done.stdout, done.stdout
    assert "index out of range" not in done.stdout


@pytest.mark.parametrize(
    ("family", "kind", "listen", "message"),
    [
        (socket.AF_INET6, socket.SOCK_STREAM, True, "is AF_INET6: give domain=INET6"),
        (socket.AF_INET, socket.SOCK_DGRAM, False, "is not a listening stream socket"),
        (socket.AF_INET, socket.SOCK_STREAM, False, "is not a listening stream socket"),
    ],
)
def test_a_passed_socket_unlike_its_listener_is_refused_at_start(
    tmp_path: Path, family: int, kind: int, listen: bool, message: str
) -> None:
    """A passed socket of another family than ``domain=``, or not listening for streams: one error at start."""
    with socket.socket(family, kind) as sock:
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        if listen:
            sock.listen(1)
        argv = twistd_argv("--listen", "systemd:domain=INET:index=0", "--to", "127.0.0.1:9")
        sockets = [("proxy", sock)]
        done = run(
            activated_argv([*argv, "--check"], sockets), tmp_path, pass_fds=activated_fds(sockets)
        )
    assert done.returncode == 1, done.stdout
    assert f"'systemd:domain=INET:index=0': the socket passed {message}" in done.stdout, done.stdout


# -- twistd -n tunnelkit, notifying ------------------------------------------


def test_a_process_says_ready_reloading_ready_stopping(tmp_path: Path, serve: Serve) -> None:
    """READY=1 once it serves; SIGHUP: RELOADING=1 (MONOTONIC_USEC) then READY=1; SIGTERM: STOPPING=1; all from twistd's pid.

    With WatchdogSec= (WATCHDOG_USEC), WATCHDOG=1 pings come in between.
    """
    backend = serve(echo)
    with NotifySocket(tmp_path, abstract=True) as manager:
        argv = twistd_argv(
            "--listen", "127.0.0.1:0", "--to", backend.address, twistd_options=JSON_LOG
        )
        environ = {**manager.environment(), "WATCHDOG_USEC": "400000"}
        with start(argv, tmp_path, env=environ) as tk:
            manager.wait_for("READY")
            manager.wait_for("WATCHDOG", 2)
            # Ready means serving: the address logged before takes a client now.
            [address] = tk.wait_listening()
            payload = os.urandom(256 * 1024)
            assert sha256(echo_through(address, payload)) == sha256(payload)
            before = systemd.monotonic_usec()
            tk.send_signal(signal.SIGHUP)
            manager.wait_for("READY", 2)
            wait_events(tk, "reloaded", 1)
            tk.send_signal(signal.SIGTERM)
            manager.wait_for("STOPPING")
            assert tk.wait() == 0, tk.output
    ready, reloading, reloaded, stopping = [n for n in manager.received if "WATCHDOG" not in n.keys]
    assert ready.get("READY") == "1" and "127.0.0.1:" in (ready.get("STATUS") or "")
    assert reloading.get("RELOADING") == "1"
    assert before <= int(reloading.get("MONOTONIC_USEC") or 0) <= systemd.monotonic_usec()
    assert reloaded.get("READY") == "1"
    assert stopping.get("STOPPING") == "1" and stopping.get("EXTEND_TIMEOUT_USEC")
    assert {note.pid for note in manager.received} == {tk.pid}


def test_the_supervisor_of_workers_notifies_for_all_of_them(tmp_path: Path, serve: Serve) -> None:
    """--workers 2: READY=1 after both workers are ready, READY=1 after both reloaded; workers never notify."""
    backend = serve(echo)
    with NotifySocket(tmp_path) as manager:
        argv = twistd_argv(
            "--listen", "127.0.0.1:0", "--to", backend.address, "--workers", "2",
            "--drain-timeout", "3", twistd_options=JSON_LOG,
        )  # fmt: skip
        with start(argv, tmp_path, env=manager.environment()) as tk:
            manager.wait_for("READY")
            # The supervisor read both lines before READY=1 (we may read them later).
            for event in wait_events(tk, "worker_ready", 2):
                assert "NOTIFY_SOCKET" not in environ_of(event["pid"])
            [address] = tk.wait_listening()
            payload = os.urandom(256 * 1024)
            assert sha256(echo_through(address, payload)) == sha256(payload)
            tk.send_signal(signal.SIGHUP)
            manager.wait_for("READY", 2)
            reloaded = [e for e in wait_events(tk, "reloaded", 3) if "worker" in e]
            assert sorted(e["worker"] for e in reloaded) == [0, 1], tk.output
            tk.send_signal(signal.SIGTERM)
            manager.wait_for("STOPPING")
            assert tk.wait() == 0, tk.output
    assert [note.keys[0] for note in manager.received] == [
        "READY",
        "RELOADING",
        "READY",
        "STOPPING",
    ]
    assert {note.pid for note in manager.received} == {tk.pid}


# -- socket activation --------------------------------------------------------


def listening_socket() -> socket.socket:
    """What systemd makes of ``ListenStream=127.0.0.1:PORT``: bound and listening before the service starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@on_each_plane
@pytest.mark.parametrize("which", ["index=0", "name=proxy"])
def test_socket_activation(tmp_path: Path, serve: Serve, plane: Plane, which: str) -> None:
    """``systemd:domain=INET:index=0`` (or ``name=``) serves the socket systemd passed, on each plane."""
    backend = serve(echo)
    with listening_socket() as passed, listening_socket() as other:
        sockets = [("other", other), ("proxy", passed)] if "name" in which else [("proxy", passed)]
        argv = twistd_argv(
            "--listen", f"systemd:domain=INET:{which}", "--to", backend.address, plane=plane
        )
        with start(
            activated_argv(argv, sockets), tmp_path, plane, pass_fds=activated_fds(sockets)
        ) as tk:
            address = f"127.0.0.1:{passed.getsockname()[1]}"
            assert tk.wait_listening() == [address]
            for _ in range(3):
                payload = os.urandom(512 * 1024)
                assert sha256(echo_through(address, payload)) == sha256(payload)
            assert tk.stop() == 0, tk.output


def test_socket_activation_with_workers(tmp_path: Path, serve: Serve) -> None:
    """--workers 2 on a passed socket: both workers start (they adopt it from the supervisor) and serve."""
    backend = serve(echo)
    with listening_socket() as passed:
        sockets = [("proxy", passed)]
        argv = twistd_argv(
            "--listen", "systemd:domain=INET:name=proxy", "--to", backend.address,
            "--workers", "2", "--drain-timeout", "3", twistd_options=JSON_LOG,
        )  # fmt: skip
        with start(activated_argv(argv, sockets), tmp_path, pass_fds=activated_fds(sockets)) as tk:
            wait_events(tk, "worker_ready", 2)
            address = f"127.0.0.1:{passed.getsockname()[1]}"
            for _ in range(8):
                payload = os.urandom(256 * 1024)
                assert sha256(echo_through(address, payload)) == sha256(payload)
            assert not events(tk, "worker_exited"), tk.output
            assert tk.stop() == 0, tk.output


# -- privileges ---------------------------------------------------------------


def privileged_port() -> int:
    """A port below 1024 free on 127.0.0.1 (bounded search)."""
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free privileged port on 127.0.0.1")


def others_may_run(path: str) -> bool:
    """Whether a user of no group of ours may execute ``path`` (every directory on the way searchable)."""
    resolved = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in (resolved, *resolved.parents))


def ids_of(pid: int) -> tuple[set[int], set[int]]:
    """The real, effective, saved and filesystem uids and gids of ``pid``."""
    lines = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {int(n) for n in lines["Uid"].split()}, {int(n) for n in lines["Gid"].split()}


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a privileged port and setuid need root")
@on_each_plane
@pytest.mark.parametrize("workers", ["1", "2"])
def test_binds_a_privileged_port_then_runs_as_nobody(
    tmp_path: Path, serve: Serve, workers: str, plane: Plane
) -> None:
    """``twistd --uid nobody --gid nogroup``: the port below 1024 is bound as root, then every process runs as nobody."""
    if workers != "1" and not others_may_run(sys.executable):
        pytest.skip(f"nobody may not run {sys.executable}, as each worker does after the drop")
    backend = serve(echo)
    port = privileged_port()
    tmp_path.chmod(0o755)  # the dropped user's working directory
    options = ("--uid", "nobody", "--gid", "nogroup", "--pidfile", "", *JSON_LOG)
    argv = twistd_argv(
        "--listen", f"127.0.0.1:{port}", "--to", backend.address, "--workers", workers,
        twistd_options=options, plane=plane,
    )  # fmt: skip
    with start(argv, tmp_path, plane) as tk:
        [address] = tk.wait_listening()
        assert address == f"127.0.0.1:{port}"
        pids = [tk.pid]
        if workers == "2":
            pids += [e["pid"] for e in wait_events(tk, "worker_ready", 2)]
        payload = os.urandom(512 * 1024)
        assert sha256(echo_through(address, payload)) == sha256(payload)
        for pid in pids:
            assert ids_of(pid) == ({65534}, {65534}), pid
        assert tk.stop() == 0, tk.output
