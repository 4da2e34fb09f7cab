"""``twistd -n tunnelkit --admin ...`` as a process: with ``--workers 2`` the supervisor serves the sum.

Real traffic (random payloads checked by SHA-256) through two worker
processes; the supervisor's /metrics must count every byte, whichever
worker relayed it, and keep counting a worker that was killed. Also: an
admin endpoint beyond loopback without a token is refused at start.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from admin_http import admin_base, fetch, samples, value
from loopback import Serve, echo, echo_through, sha256
from planes import Plane, on_each_plane
from processes import Process, json_events, run, twistd, twistd_argv, wait_until

JSON_LOG = ("--logger", "tunnelkit.json_log.observer")
LISTENER = "127.0.0.1:0"


def event(process: Process, name: str, count: int = 1) -> list[dict[str, Any]]:
    """The first ``count`` events ``name`` of the process's JSON log, once there are that many."""

    def enough(text: str) -> list[dict[str, Any]] | None:
        found = [e for e in json_events(text) if e.get("event") == name]
        return found[:count] if len(found) >= count else None

    return process.wait_for(enough, f"{count} {name} events")


def echo_sizes(address: str, sizes: list[int]) -> None:
    """One client per size, 8 at a time, each echoing that many random bytes intact."""

    def one(size: int) -> None:
        payload = os.urandom(size)
        assert sha256(echo_through(address, payload)) == sha256(payload)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, sizes))


@on_each_plane
def test_the_supervisor_serves_the_sum_of_its_workers(
    tmp_path: Path, serve: Serve, plane: Plane
) -> None:
    """30 tunnels through 2 workers: the supervisor's /metrics counts them all, and still does after a worker is killed."""
    backend = serve(echo)
    argv = ("--listen", LISTENER, "--to", backend.address, "--workers", "2")
    argv += ("--admin", "127.0.0.1:0", "--drain-timeout", "2")
    with twistd(*argv, cwd=tmp_path, twistd_options=JSON_LOG, plane=plane) as tk:
        [address] = tk.wait_listening()
        base = admin_base(tk)
        workers = {e["worker"]: e["pid"] for e in event(tk, "worker_ready", 2)}
        wait_until(lambda: fetch(base + "/readyz")[0] == 200, "both workers answer")
        sizes = [(i * 7919) % 300_000 + 1 for i in range(30)]
        echo_sizes(address, sizes)

        def settled() -> dict[Any, float] | None:
            found = samples(base)
            done = value(found, "tunnelkit_tunnel_duration_seconds_count", listener=LISTENER)
            return found if done == len(sizes) else None

        found = wait_until(settled, "every tunnel counted")
        assert value(found, "tunnelkit_processes") == 2
        assert value(found, "tunnelkit_process_resident_memory_bytes") > 0
        for direction in ("up", "down"):
            total = value(found, "tunnelkit_bytes_total", listener=LISTENER, direction=direction)
            assert total == sum(sizes), direction
        accepted = value(found, "tunnelkit_connections_accepted_total", listener=LISTENER)
        assert accepted == len(sizes)
        at_backend = {"listener": LISTENER, "group": "", "backend": backend.address}
        assert value(found, "tunnelkit_backend_connections_total", **at_backend) == len(sizes)
        served = {e["worker"] for e in json_events(tk.stdout) if e.get("event") == "tunnel_closed"}
        os.kill(workers[0], signal.SIGKILL)
        event(tk, "worker_exited")
        # Until its replacement is ready (a second or so later), one worker answers.
        status, _, body = fetch(base + "/readyz")
        assert (status, body) in {(503, b"1 of 2 workers answered\n"), (200, b"ready\n")}
        after = samples(base)
        # The killed worker's counts stay in the sum (its replacement starts from 0):
        # no counter goes back.
        for direction in ("up", "down"):
            total = value(after, "tunnelkit_bytes_total", listener=LISTENER, direction=direction)
            assert total == sum(sizes), (direction, served)
        tk.stop()


def test_an_admin_endpoint_beyond_loopback_is_refused_at_start(tmp_path: Path) -> None:
    """--admin on every interface without --admin-token: exit 1 with one line saying why, nothing served."""
    argv = twistd_argv("--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--admin", "0.0.0.0:0")
    done = run(argv, tmp_path)
    assert done.returncode == 1, done.stdout
    assert "tunnelkit: error: --admin listens on 0.0.0.0:" in done.stdout, done.stdout
    assert "give --admin-token FILE" in done.stdout
    assert "Traceback" not in done.stdout


def test_the_token_file_guards_every_path_and_is_never_logged(tmp_path: Path, serve: Serve) -> None:
    """--admin-token FILE: 401 without the token, 200 with it (bearer); the token appears in no log line."""
    token = "tk-" + os.urandom(12).hex()
    (tmp_path / "admin.token").write_text(token + "\n")
    backend = serve(echo)
    argv = ("--listen", LISTENER, "--to", backend.address, "--admin", "127.0.0.1:0")
    argv += ("--admin-token", str(tmp_path / "admin.token"))
    with twistd(*argv, cwd=tmp_path, twistd_options=JSON_LOG) as tk:
        base = admin_base(tk)
        for path in ("/healthz", "/readyz", "/metrics", "/status", "/status.json"):
            assert fetch(base + path)[0] == 401, path
            assert fetch(base + path, token=token)[0] == 200, path
        tk.stop()
    assert token not in tk.output
