"""``--workers N``: worker processes share the listeners under one supervising ``twistd``.

Every test runs ``twistd -n tunnelkit --workers 2`` as a process (JSON log on
stdout, where the supervisor re-publishes its workers' events) against a
threaded echo backend, with random payloads checked by SHA-256.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from certs import write_ca, write_pair
from fake_systemd import Recorder
from loopback import Serve, connect, echo, echo_through, exchange, sha256
from processes import (
    Process,
    access_log_records,
    json_events,
    mapped_cryptography,
    read_text,
    run,
    tunnel_closed_events,
    twistd,
    twistd_argv,
    wait_until,
)
from tls_clients import client_context, tls_exchange
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tunnelkit.app.supervisor import Workers

JSON_LOG = ("--logger", "tunnelkit.json_log.observer")


def events_named(
    process: Process, name: str, count: int, timeout: float = 20
) -> list[dict[str, Any]]:
    def enough(text: str) -> list[dict[str, Any]] | None:
        found = [e for e in json_events(text) if e.get("event") == name]
        return found if len(found) >= count else None

    return process.wait_for(enough, f"{count} {name} events", timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


@contextmanager
def supervisor(
    tmp_path: Path, backend: str, *args: str
) -> Iterator[tuple[Process, str, dict[int, int]]]:
    """``twistd -n tunnelkit --workers 2``; yields it, its address and worker number -> pid."""
    argv = ("--listen", "127.0.0.1:0", "--to", backend, "--workers", "2", "--drain-timeout", "3")
    with twistd(*argv, *args, cwd=tmp_path, twistd_options=JSON_LOG) as tk:
        [address] = tk.wait_listening()
        ready = events_named(tk, "worker_ready", 2)
        pids = {e["worker"]: e["pid"] for e in ready}
        try:
            yield tk, address, pids
        finally:
            tk.kill()
            wait_gone(list(pids.values()))


def echo_many(address: str, count: int, size: int) -> None:
    """``count`` concurrent clients, each echoing ``size`` random bytes; all must come back intact."""

    def one(_: int) -> None:
        payload = os.urandom(size)
        assert sha256(echo_through(address, payload)) == sha256(payload)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def test_workers_share_the_listener_and_log_through_the_supervisor(
    tmp_path: Path, serve: Serve
) -> None:
    """Two worker processes (children of twistd) relay 40 tunnels; their records reach the supervisor's log."""
    backend = serve(echo)
    with supervisor(tmp_path, backend.address) as (tk, address, pids):
        assert sorted(pids) == [0, 1]
        for pid in pids.values():
            with open(f"/proc/{pid}/stat") as stat:
                assert int(stat.read().rsplit(")", 1)[1].split()[1]) == tk.pid
            # Plain TCP: no worker loads the TLS stack either.
            assert mapped_cryptography(pid) == 0
        echo_many(address, 40, 256 * 1024)
        records = events_named(tk, "tunnel_closed", 40)
        assert {r["worker"] for r in records} <= {0, 1}
        assert all(r["bytes_up"] == r["bytes_down"] == 256 * 1024 for r in records)
        # The supervisor itself accepts nothing: its only sockets are the listener and pipes.
        assert not [
            e
            for e in json_events(tk.stdout)
            if e.get("event") == "tunnel_closed" and "worker" not in e
        ]


def test_text_log_shows_each_workers_number_and_who_relays_once(
    tmp_path: Path, serve: Serve
) -> None:
    """In a text log each worker's lines carry its number, and who relays (Twisted, here) is said once."""
    backend = serve(echo)
    argv = (
        "--listen",
        "127.0.0.1:0",
        "--to",
        backend.address,
        "--workers",
        "2",
        "--no-write-through",
    )
    with twistd(*argv, "--drain-timeout", "3", cwd=tmp_path) as tk:
        [address] = tk.wait_listening()

        def ready(text: str) -> set[str]:
            found = set(re.findall(r"\[tunnelkit\.worker#info worker (\d)\] worker ready", text))
            return found if len(found) == 2 else set()

        assert tk.wait_for(ready, "both workers ready") == {"0", "1"}
        echo_many(address, 4, 1024)
        closed = tk.wait_for(lambda text: len(tunnel_closed_events(text)) == 4 or None, "4 records")
        assert closed
        assert tk.stop() == 0, tk.output
    lines = [line for line in tk.stdout.splitlines() if "[tunnelkit.tunnel#info" in line]
    assert len(lines) == 4
    assert all(re.search(r"\[tunnelkit\.tunnel#info worker [01]\] ", line) for line in lines)
    assert tk.stdout.count("relaying with") == 1, tk.stdout
    assert (
        "relaying with Twisted, not the native engine: --no-write-through is a diagnostic"
        in tk.stdout
    )


def open_files(pid: int) -> set[str]:
    """What the descriptors of process ``pid`` point to."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(FileNotFoundError):  # closed meanwhile
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def test_workers_append_to_one_access_log_and_reopen_it_on_sighup(
    tmp_path: Path, serve: Serve
) -> None:
    """--access-log with 2 workers: each appends whole lines to the file itself; after a rename, SIGHUP makes both reopen it."""
    backend = serve(echo)
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    with supervisor(tmp_path, backend.address, "--access-log", str(path)) as (tk, address, pids):
        # The supervisor only checked the path; it writes nothing and holds no rotated file open.
        assert str(path) not in open_files(tk.pid)
        assert all(str(path) in open_files(pid) for pid in pids.values())
        echo_many(address, 40, 64 * 1024)
        wait_until(lambda: len(read_text(path).splitlines()) >= 40, "40 lines")
        records = access_log_records(path.read_text())
        assert len(records) == 40
        assert all(r["bytes_up"] == r["bytes_down"] == 64 * 1024 for r in records)
        assert not [e for e in json_events(tk.stdout) if e.get("event") == "tunnel_closed"]
        path.rename(rotated)
        tk.send_signal(signal.SIGHUP)
        reopened = events_named(tk, "access_log_reopened", 2)
        assert sorted(e["worker"] for e in reopened) == [0, 1]
        for pid in pids.values():
            assert str(path) in open_files(pid) and str(rotated) not in open_files(pid)
        echo_many(address, 10, 1000)
        wait_until(lambda: len(read_text(path).splitlines()) >= 10, "10 lines in the new file")
        assert len(access_log_records(path.read_text())) == 10
        assert len(access_log_records(rotated.read_text())) == 40


def test_a_dead_worker_is_restarted(tmp_path: Path, serve: Serve) -> None:
    """SIGKILL to a worker: the supervisor logs worker_exited and starts a new one; service goes on."""
    backend = serve(echo)
    with supervisor(tmp_path, backend.address) as (tk, address, pids):
        os.kill(pids[0], signal.SIGKILL)
        [exited] = events_named(tk, "worker_exited", 1)
        assert exited["worker"] == 0 and exited["log_level"]["name"] == "warn"
        restarted = events_named(tk, "worker_ready", 3)[2]
        assert restarted["worker"] == 0 and restarted["pid"] != pids[0]
        pids[0] = restarted["pid"]
        echo_many(address, 10, 64 * 1024)


def test_tls_workers_reload_on_sighup(tmp_path: Path, serve: Serve) -> None:
    """--tls-cert with workers: each terminates TLS; SIGHUP reaches every worker, which reloads."""
    backend = serve(echo)
    ca = trustme.CA()
    pair = write_pair(ca, tmp_path, "localhost")
    tls = ("--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    with supervisor(tmp_path, backend.address, *tls) as (tk, address, pids):
        ctx = client_context(write_ca(ca, tmp_path))
        payload = os.urandom(1 << 20)
        pump = tls_exchange(address, ctx, "localhost", payload)
        assert (pump.received, pump.digest.hexdigest()) == (len(payload), sha256(payload))
        tk.send_signal(signal.SIGHUP)
        reloaded = events_named(tk, "tls_reloaded", 2)
        assert sorted(e["worker"] for e in reloaded) == [0, 1]
        assert all(alive(p) for p in pids.values())


def test_sigterm_drains_the_workers_and_exits_0(tmp_path: Path, serve: Serve) -> None:
    """SIGTERM: the workers stop accepting, a live tunnel finishes its exchange, everything exits 0."""
    backend = serve(echo)
    with supervisor(tmp_path, backend.address) as (tk, address, pids):
        with connect(address) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            tk.send_signal(signal.SIGTERM)
            events_named(tk, "drain_started", 1)
            payload = os.urandom(1 << 20)
            assert sha256(echo_open(sock, payload)) == sha256(payload)
        assert tk.wait() == 0
        wait_gone(list(pids.values()))


def echo_open(sock: Any, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = sock.recv(1 << 20)
        assert chunk, "closed before the echo was complete"
        got += chunk
    return bytes(got)


def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path, serve: Serve) -> None:
    """SIGKILL to the supervisor (no chance to stop them): the workers notice and exit."""
    backend = serve(echo)
    with supervisor(tmp_path, backend.address) as (tk, _, pids):
        tk.kill()
        wait_gone(list(pids.values()), timeout=10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--workers", "0"), "--workers: must be a whole number from 1 to 256, not '0'"),
        (("--workers", "257"), "--workers: must be a whole number from 1 to 256, not '257'"),
    ],
)
def test_worker_count_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """A worker count out of range is one error line that names --workers and its range."""
    done = run(twistd_argv("--listen", "0", "--to", "127.0.0.1:9", *args), tmp_path)
    assert done.returncode == 1
    assert done.stdout.startswith(f"tunnelkit: error: {message}")
    assert len(done.stdout.splitlines()) == 1


def test_workers_refuse_an_ssl_listener(tmp_path: Path) -> None:
    """An ``ssl:`` listener's TLS lives in the supervisor's endpoint: refused, --tls-cert named instead."""
    pair = write_pair(trustme.CA(), tmp_path, "localhost")
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
    done = run(twistd_argv("--listen", listen, "--to", "127.0.0.1:9", "--workers", "2"), tmp_path)
    assert done.returncode != 0
    assert "use --tls-cert" in done.stdout


class FlakySpawner(Clock):
    """A clock whose spawnProcess fails ``failures`` times (EAGAIN), then returns a fake process."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.spawned: list[list[str]] = []
        self.environments: list[dict[str, str]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.spawned.append(args)
        self.environments.append(kw["env"])
        return SimpleNamespace(pid=4242 + len(self.spawned))


class FakePort:
    def stopReading(self) -> None:
        pass

    def fileno(self) -> int:
        return 7


def test_a_worker_that_cannot_be_spawned_is_retried_with_backoff() -> None:
    """fork() failing (EAGAIN) is logged as worker_exited and retried after 1 s, then 2 s."""
    reactor = FlakySpawner(failures=2)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        workers = Workers(1, ["--listen", "1"], [FakePort()], 1.0, reactor)  # type: ignore[list-item]
        workers.start_worker(0)
        reactor.advance(1)
        assert not reactor.spawned
        reactor.advance(2)
        assert len(reactor.spawned) == 1
        assert reactor.spawned[0][3:] == [str(os.getpid()), "7", "--listen", "1", "--workers", "1"]
    finally:
        globalLogPublisher.removeObserver(logged.append)
    exits = [e for e in logged if e.get("event") == "worker_exited"]
    assert [e["delay"] for e in exits] == [1.0, 2.0]
    assert "could not start" in exits[0]["status"]


def test_a_sighup_while_a_worker_starts_reaches_it_once_ready() -> None:
    """A worker still starting (SIGHUP would kill it) gets the SIGHUP once it is ready: it may have opened the files before they were rotated."""
    reactor = FlakySpawner(failures=0)
    workers = Workers(1, ["--listen", "1"], [FakePort()], 1.0, reactor)  # type: ignore[list-item]
    workers.start_worker(0)
    protocol = workers._protocols[0]
    sent: list[int] = []
    protocol.transport = SimpleNamespace(signalProcess=sent.append)
    workers.reload()
    assert sent == []
    protocol.outReceived(b'{"event": "worker_ready", "log_format": "ready"}\n')
    assert sent == [signal.SIGHUP]
    workers.reload()
    assert sent == [signal.SIGHUP, signal.SIGHUP]


def test_workers_share_a_unix_listener_and_leave_nothing_behind(
    tmp_path: Path, serve: Serve
) -> None:
    """unix: with 2 workers: clients are served; on SIGTERM the socket file and its lock go, no traceback."""
    backend = serve(echo)
    path = tmp_path / "tk.sock"
    argv = ("--listen", f"unix:{path}", "--to", backend.address, "--workers", "2")
    with twistd(*argv, "--drain-timeout", "3", cwd=tmp_path, twistd_options=JSON_LOG) as tk:
        tk.wait_listening()
        pids = [e["pid"] for e in events_named(tk, "worker_ready", 2)]
        for _ in range(6):
            payload = os.urandom(64 * 1024)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                assert sha256(exchange(sock, payload)) == sha256(payload)
        assert tk.stop() == 0
        wait_gone(pids)
        assert "Traceback" not in tk.output and "Unhandled error" not in tk.output, tk.output
    assert not path.exists()
    assert not Path(f"{path}.lock").exists()


def worker_logs(protocol: Any, event: str) -> None:
    protocol.outReceived(f'{{"event": "{event}", "log_format": "{event}"}}\n'.encode())


def test_the_supervisor_tells_systemd_when_all_workers_are_ready_and_reloaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """READY=1 once both workers are up; after SIGHUP, READY=1 once both logged ``reloaded`` (or ended); workers never see NOTIFY_SOCKET."""
    monkeypatch.setenv("NOTIFY_SOCKET", "@tunnelkit-test")
    reactor, recorder = FlakySpawner(failures=0), Recorder()
    workers = Workers(2, ["--listen", "1"], [FakePort()], 1.0, reactor, notifier=recorder)  # type: ignore[arg-type, list-item]
    workers.start_worker(0)
    workers.start_worker(1)
    assert not any("NOTIFY_SOCKET" in env for env in reactor.environments)
    first, second = workers._protocols[0], workers._protocols[1]
    worker_logs(first, "worker_ready")
    assert recorder.calls == []
    worker_logs(second, "worker_ready")
    assert recorder.calls == ["ready"]
    workers.reload()
    worker_logs(first, "reloaded")
    assert recorder.calls == ["ready", "reloading"]
    worker_logs(second, "reloaded")
    assert recorder.calls == ["ready", "reloading", "ready"]
    workers.reload()
    worker_logs(first, "reloaded")
    workers.worker_ended(second, Failure(ProcessDone(0)))
    assert recorder.calls == ["ready", "reloading", "ready", "reloading", "ready"]
