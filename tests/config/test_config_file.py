"""``--config FILE`` end to end: docs/config.md's example serves real clients, ``--check`` names every error.

The example is read from docs/config.md itself, so the documentation cannot
drift from what runs: only its addresses, backends and certificate paths are
replaced by the test's own (ports 0 on 127.0.0.1, threaded backends,
certificates from a test CA). One ``twistd -n tunnelkit --config`` process
then serves a plain forwarder (whose first backend refuses: ordered
failover), a CONNECT proxy and TLS offload, each to real clients with
random payloads checked by SHA-256, and logs one record per tunnel in the
file's access log.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import write_ca, write_pair
from loopback import IO_TIMEOUT, MiB, Serve, echo, exchange, refusing_address, sha256
from processes import (
    access_log_records,
    assert_clean_stop,
    executable,
    run,
    tunnelkit,
    twistd,
    wait_until,
)
from tls_clients import client_context, tls_exchange

ROOT = Path(__file__).resolve().parents[2]


def documented_example() -> dict[str, Any]:
    """The TOML block of docs/config.md's "A complete example"."""
    text = (ROOT / "docs" / "config.md").read_text()
    section = text.split("## A complete example", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None, "docs/config.md has no ```toml example"
    return tomllib.loads(block[1])


def to_toml(document: dict[str, Any]) -> str:
    """Write the few TOML shapes the example uses: scalars, lists, and [[listener]] tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in document.items() if k != "listener"]
    for table in document.get("listener", []):
        lines += ["", "[[listener]]", *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def test_the_documented_example_is_three_listeners_of_three_modes() -> None:
    """docs/config.md's example is the issue's: a forwarder, a CONNECT proxy and TLS offload."""
    listeners = documented_example()["listener"]
    assert [t.get("mode", "forward") for t in listeners] == ["forward", "connect", "forward"]
    assert "tls-cert" in listeners[2] and "tls-cert" not in listeners[0]


def _localize(tmp_path: Path, backend: str, refused: str) -> tuple[Path, Path]:
    """The example with the test's addresses and certificates; returns the file and the CA."""
    ca = trustme.CA()
    pair = write_pair(ca, tmp_path, "localhost")
    document = documented_example()
    forward, connect, offload = document["listener"]
    for table in (forward, connect, offload):
        table["listen"] = ["127.0.0.1:0"]
    forward["to"] = [refused, backend]
    connect["allow-port"] = [backend.rsplit(":", 1)[1]]
    offload["to"] = backend
    offload["tls-cert"], offload["tls-key"] = [str(pair.cert)], [str(pair.key)]
    path = tmp_path / "tunnelkit.toml"
    path.write_text(to_toml(document))
    return path, write_ca(ca, tmp_path)


def _through_connect(proxy: str, target: str, payload: bytes) -> bytes:
    host, port = proxy.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=IO_TIMEOUT)
    try:
        conn.set_tunnel(target)
        conn.connect()
        assert conn.sock is not None
        return exchange(conn.sock, payload)
    finally:
        conn.close()


def _through_tls(address: str, ca: Path, payload: bytes) -> str:
    """The SHA-256 of what came back for ``payload`` over TLS (closed with close_notify)."""
    pump = tls_exchange(address, client_context(ca), "localhost", payload)
    assert pump.received == len(payload)
    return pump.digest.hexdigest()


def test_one_process_serves_every_listener_of_the_file(tmp_path: Path, serve: Serve) -> None:
    """Forward (with failover), CONNECT and TLS offload from one file, in one process, with real clients."""
    backend = serve(echo)
    with refusing_address() as refused:
        path, ca = _localize(tmp_path, backend.address, refused)
        with twistd("--config", str(path), cwd=tmp_path) as tk:
            forward, connect, offload = tk.wait_listening(3)
            payloads = [os.urandom(MiB) for _ in range(3)]
            assert sha256(_plain(forward, payloads[0])) == sha256(payloads[0])
            assert sha256(_through_connect(connect, backend.address, payloads[1])) == sha256(
                payloads[1]
            )
            assert _through_tls(offload, ca, payloads[2]) == sha256(payloads[2])
            log = tmp_path / "access.log"
            records = wait_until(lambda: _records(log, 3), "three access-log records")
            assert_clean_stop(tk, tk.stop())
    # Each listener on its own plane: the engine forwards and offloads TLS, Twisted reads CONNECT.
    planes = re.findall(r"(listener\[\d\]): relaying with (the native engine|Twisted)", tk.output)
    assert planes == [
        ("listener[0]", "the native engine"),
        ("listener[1]", "Twisted"),
        ("listener[2]", "the native engine"),
    ], tk.output
    assert all(r["bytes_up"] == MiB and r["bytes_down"] == MiB for r in records)
    by_mode = {r.get("mode", "forward") for r in records}
    assert by_mode == {"forward", "connect"}, records
    assert any(r.get("tls_version") for r in records), records


def _records(path: Path, count: int) -> list[dict[str, Any]] | None:
    records = access_log_records(path.read_text()) if path.exists() else []
    return records if len(records) >= count else None


def _plain(address: str, payload: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=IO_TIMEOUT) as sock:
        return exchange(sock, payload)


def _check(tmp_path: Path, text: str, *flags: str) -> tuple[int, str]:
    path = tmp_path / "tk.toml"
    path.write_text(text)
    result = run([executable("tunnelkit"), "--config", str(path), "--check", *flags], cwd=tmp_path)
    return result.returncode, result.stdout


def test_check_accepts_the_documented_example(tmp_path: Path, serve: Serve) -> None:
    """--check loads the example (certificates included) and says so, exit 0, listening nowhere."""
    backend = serve(echo)
    with refusing_address() as refused:
        path, _ = _localize(tmp_path, backend.address, refused)
        code, output = _check(tmp_path, path.read_text())
    assert (code, output.strip()) == (0, "tunnelkit: configuration OK"), output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # An unknown key, with its near miss; a key in the wrong scope.
        (
            '[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\nconnect_timeout = 3\n',
            "listener[0].connect_timeout: unknown key (did you mean 'connect-timeout'?)",
        ),
        (
            'workers = 1\n[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\nworkers = 2\n',
            "listener[0].workers: a process setting: give it at the top of the file",
        ),
        # A value of the wrong type or out of range; a bad item of a list.
        (
            '[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\nidle-timeout = "5"\n',
            "listener[0].idle-timeout: must be a number of seconds (0 or more), not '5'",
        ),
        (
            '[[listener]]\nlisten = "1"\nto = ["127.0.0.1:1", "db"]\n',
            "listener[0].to[1]: ",
        ),
        # Missing and inconsistent keys.
        ('[[listener]]\nlisten = "1"\n', "listener[0].to: is required in forward mode"),
        (
            '[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\nallow-dest = "10.0.0.0/8"\n',
            "listener[0].allow-dest: applies to mode connect, socks5 and auto only",
        ),
        # What only loading finds: a certificate that is not there, an endpoint type.
        (
            '[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\ntls-cert = "/nonexistent/c.pem"\n',
            "listener[0]: tls-cert /nonexistent/c.pem: No such file or directory",
        ),
        (
            '[[listener]]\nlisten = "bogus:1:2"\nto = "127.0.0.1:1"\n',
            "listener[0].listen[0]: 'bogus' is not an endpoint type",
        ),
        # Not TOML at all.
        ("[[listener]\n", "not valid TOML"),
    ],
)
def test_check_names_each_error_with_its_key_path(tmp_path: Path, text: str, expected: str) -> None:
    """Each kind of error: exit 1, one line naming the file, the key path and what is wrong."""
    code, output = _check(tmp_path, text)
    assert code == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert all(line.startswith(f"tunnelkit: error: {tmp_path / 'tk.toml'}: ") for line in lines)
    assert any(expected in line for line in lines), output


def test_check_reports_every_error_at_once(tmp_path: Path) -> None:
    """Three listeners with one error each: three lines, one per listener."""
    text = "".join(
        f'[[listener]]\nlisten = "{port}"\nto = "127.0.0.1:1"\n{bad}\n'
        for port, bad in ((1, "mss = 0"), (2, "mode = 'socks9'"), (3, "no-such-key = 1"))
    )
    code, output = _check(tmp_path, text)
    assert code == 1
    prefix = f"tunnelkit: error: {tmp_path / 'tk.toml'}: "
    assert [line.removeprefix(prefix).split(":")[0] for line in output.splitlines()] == [
        "listener[0].mss",
        "listener[1].mode",
        "listener[2].no-such-key",
    ], output


def test_check_warns_nothing_but_fails_on_names_that_do_not_resolve(tmp_path: Path) -> None:
    """--check resolves backend names (a start only warns): one that does not resolve fails it."""
    code, output = _check(
        tmp_path, '[[listener]]\nlisten = "1"\nto = "does-not-exist.invalid:80"\n'
    )
    assert code == 1 and "does-not-exist.invalid" in output, output


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--to", "127.0.0.1:2"), "--to cannot be combined with --config"),
        (("--mode", "connect"), "--mode cannot be combined with --config"),
        (("--workers", "3"), "--workers is also set in"),
    ],
)
def test_flags_that_conflict_with_the_file_are_refused(
    tmp_path: Path, flags: tuple[str, ...], expected: str
) -> None:
    """Listener flags never mix with a file; a process flag may only add what the file leaves out."""
    code, output = _check(
        tmp_path, 'workers = 2\n[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\n', *flags
    )
    assert code == 1 and expected in output, output


def test_a_process_flag_adds_what_the_file_leaves_out(tmp_path: Path, serve: Serve) -> None:
    """--drain-timeout beside a file that does not set it is taken; the file still says the rest."""
    backend = serve(echo)
    path = tmp_path / "tk.toml"
    path.write_text(f'[[listener]]\nlisten = "127.0.0.1:0"\nto = "{backend.address}"\n')
    with tunnelkit("--config", str(path), "--drain-timeout", "1", cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        payload = b"x" * 4096
        assert _plain(address, payload) == payload
        assert_clean_stop(tk, tk.stop())


def _many_endpoints(backend: str, counts: tuple[int, ...], engine: str = "auto") -> str:
    return "".join(
        f"[[listener]]\nlisten = {['127.0.0.1:0'] * count!r}\nto = {backend!r}\n"
        f"engine = {engine!r}\n".replace("'", '"')
        for count in counts
    )


def test_listeners_beyond_the_engines_sockets_run_on_twisted(tmp_path: Path, serve: Serve) -> None:
    """One engine takes 64 listening sockets in all: a listener that would pass that runs on Twisted, and says why."""
    backend = serve(echo)
    path = tmp_path / "tk.toml"
    path.write_text(_many_endpoints(backend.address, (40, 40)))
    with twistd("--config", str(path), cwd=tmp_path) as tk:
        addresses = tk.wait_listening(80)
        payload = os.urandom(64 * 1024)
        for address in (addresses[0], addresses[39], addresses[40], addresses[79]):
            assert _plain(address, payload) == payload
        assert_clean_stop(tk, tk.stop())
    assert "listener[0]: relaying with the native engine" in tk.output
    assert (
        "listener[1]: relaying with Twisted, not the native engine: the engine takes at most 64"
        " listening sockets in all, and the listeners before this one use 40"
    ) in tk.output


def test_engine_native_beyond_the_engines_sockets_is_an_error(tmp_path: Path) -> None:
    """engine = "native" on a listener the engine has no room for: --check names it."""
    code, output = _check(tmp_path, _many_endpoints("127.0.0.1:1", (40, 40), engine="native"))
    assert code == 1
    assert "listener[1].engine: native: the engine takes at most 64 listening sockets" in output


def test_process_flags_beside_a_file_are_checked_as_file_values(tmp_path: Path) -> None:
    """A process flag beside --config reaches the settings, and goes through the file's checks."""
    from twisted.internet.testing import MemoryReactorClock

    from tunnelkit.cli.plugin import Options

    path = tmp_path / "tk.toml"
    path.write_text('[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\n')
    options = Options(MemoryReactorClock())
    options.parseOptions(["--config", str(path), "--drain-timeout", "1", "--workers", "2"])
    assert options.settings is not None
    assert (options.settings.drain_timeout, options.settings.workers) == (1.0, 2)
    with pytest.raises(SystemExit) as caught:
        Options(MemoryReactorClock()).parseOptions(
            ["--config", str(path), "--access-log-format", "json"]
        )
    assert "access-log-format: needs access-log" in str(caught.value.code)


def test_listeners_on_twisted_share_one_descriptor_budget_for_pipes(tmp_path: Path) -> None:
    """Each listener has its splice pool, and every pool counts the others' pipes (one fd budget)."""
    from twisted.internet.testing import MemoryReactorClock

    from tunnelkit.app.build import build_service, prepare
    from tunnelkit.cli.plugin import Options

    path = tmp_path / "tk.toml"
    path.write_text(
        "max-connections = 100\n"
        + '[[listener]]\nlisten = "1"\nto = "127.0.0.1:1"\nengine = "python"\n' * 2
    )
    options = Options(MemoryReactorClock())
    options.parseOptions(["--config", str(path)])
    assert options.settings is not None
    service = build_service(prepare(options.settings, options.reactor))
    first, second = (listening.factory().pipes for listening in service.listeners)
    assert first is not None and second is not None and first is not second
    assert first.peers is second.peers and set(map(id, first.peers)) == {id(first), id(second)}


def test_every_worker_serves_every_listener_of_the_file(tmp_path: Path, serve: Serve) -> None:
    """workers = 2 in the file: both workers adopt both listeners (forward and CONNECT) and relay."""
    backend = serve(echo)
    path = tmp_path / "tk.toml"
    path.write_text(
        f'workers = 2\n[[listener]]\nlisten = "127.0.0.1:0"\nto = "{backend.address}"\n'
        '[[listener]]\nlisten = "127.0.0.1:0"\nmode = "connect"\nallow-dest = "127.0.0.0/8"\n'
    )
    with twistd("--config", str(path), cwd=tmp_path) as tk:
        forward, connect = tk.wait_listening(2)
        tk.wait_for(lambda text: text.count("worker ready") == 2, "both workers ready")
        for _ in range(8):  # the kernel spreads the connections over the workers
            payload = os.urandom(64 * 1024)
            assert sha256(_plain(forward, payload)) == sha256(payload)
            assert sha256(_through_connect(connect, backend.address, payload)) == sha256(payload)
        assert_clean_stop(tk, tk.stop())
