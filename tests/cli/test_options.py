"""Command-line options of the twistd plugin, parsed in memory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import write_pair
from records import a_record
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from tunnelkit.app.build import Listener, Prepared, build_service, prepare
from tunnelkit.backends.endpoints import AddressEndpoint
from tunnelkit.cli.plugin import Options
from tunnelkit.config.model import ConfigError
from tunnelkit.modes.connect import ConnectMode
from tunnelkit.modes.socks5 import Socks5Mode
from tunnelkit.policy.htpasswd import make_entry
from tunnelkit.relay.socket_options import DEFAULT_READ_SIZE


def parse(*argv: str) -> Options:
    options = Options(reactor=MemoryReactorClock())
    options.parseOptions(list(argv))
    return options


def start(*argv: str) -> Prepared:
    """What a start loads for ``argv`` (nothing listens); errors end it as they end twistd."""
    options = parse(*argv)
    assert options.settings is not None
    try:
        return prepare(options.settings, options.reactor)
    except ConfigError as e:
        raise SystemExit(options.error_lines(e)) from None


def listener(*argv: str) -> Listener:
    [loaded] = start(*argv).listeners
    return loaded


def test_defaults() -> None:
    """Defaults: nodelay on, documented timeouts, the default read size."""
    prepared = start("--listen", "8888", "--to", "backend.example:80")
    [loaded] = prepared.listeners
    settings = loaded.settings
    assert settings.socket_options.nodelay is True
    assert settings.socket_options.read_size == DEFAULT_READ_SIZE
    assert (settings.connect_timeout, settings.timeouts.idle, settings.timeouts.fin) == (
        10.0,
        3600.0,
        60.0,
    )
    assert prepared.settings.drain_timeout == 30.0
    assert [name for name, _ in loaded.endpoints] == ["8888"]
    [backend] = loaded.backends
    assert isinstance(backend.endpoint, HostnameEndpoint)


def test_address_backends_skip_name_resolution() -> None:
    """IP-literal backends get direct TCP endpoints (no getaddrinfo thread hop per connection)."""
    loaded = listener(
        "--listen", "1", "--to", "127.0.0.1:80", "--to", "[::1]:80", "--to", "db.example:5432"
    )
    kinds = [type(b.endpoint) for b in loaded.backends]
    assert kinds == [AddressEndpoint, AddressEndpoint, HostnameEndpoint]


def test_socket_options_parsed() -> None:
    """Socket flags become SocketOptions for both legs."""
    [settings] = parse(
        "--listen", "8888", "--to", "h:1", "--no-nodelay", "--keepalive", "30",
        "--sndbuf", "1000000", "--rcvbuf", "2000000", "--mss", "1200", "--read-size", "65536",
    ).settings.listeners  # fmt: skip
    s = settings.socket_options
    assert (s.nodelay, s.keepalive, s.sndbuf, s.rcvbuf, s.mss, s.read_size) == (
        False, 30, 1000000, 2000000, 1200, 65536,
    )  # fmt: skip


def test_repeatable_listen_and_to_keep_order() -> None:
    """Several --listen and --to are kept in the order given."""
    loaded = listener(
        "--listen", "1", "--listen", "unix:/tmp/x.sock", "--to", "a:1", "--to", "tls:b:2"
    )
    assert [n for n, _ in loaded.endpoints] == ["1", "unix:/tmp/x.sock"]
    assert [b.name for b in loaded.backends] == ["a:1", "tls:b:2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--to", "a:1"], "--listen is required"),
        (["--listen", "1"], "--to is required"),
        (["--listen", "1", "--to", "nohost"], "--to 'nohost'"),
        (["--listen", "bogus:1:2", "--to", "a:1"], "--listen 'bogus:1:2'"),
        # --listen says which forms it takes, and which directory is missing.
        (
            ["--listen", "bogus:1:2", "--to", "a:1"],
            "'bogus' is not an endpoint type; give PORT (all IPv4 interfaces), ADDR:PORT,",
        ),
        (["--listen", ":21113", "--to", "a:1"], "--listen ':21113': no address before the port"),
        (["--listen", "127.0.0.1:", "--to", "a:1"], "--listen '127.0.0.1:': no port after"),
        (
            ["--listen", "unix:/nonexistent/dir/tk.sock", "--to", "a:1"],
            "--listen 'unix:/nonexistent/dir/tk.sock': directory /nonexistent/dir does not exist",
        ),
        # A bad value names its option and says what it must be.
        (
            ["--listen", "1", "--to", "a:1", "--idle-timeout", "soon"],
            "--idle-timeout: must be a number of seconds (0 or more), not 'soon'",
        ),
        (
            ["--listen", "1", "--to", "a:1", "--mss", "0"],
            "--mss: must be a positive whole number of bytes, not '0'",
        ),
        (
            ["--listen", "1", "--to", "a:1", "--connect-timeout", "-1"],
            "--connect-timeout: must be a positive number of seconds, not '-1'",
        ),
        (
            ["--listen", "1", "--to", "a:1", "--workers", "0"],
            "--workers: must be a whole number from 1 to 256, not '0'",
        ),
        (
            ["--listen", "1", "--to", "a:1", "--workers", "257"],
            "--workers: must be a whole number from 1 to 256, not '257'",
        ),
        (
            ["--listen", "1", "--to", "a:1", "--read-size", "0"],
            "--read-size: must be a positive whole number of bytes, not '0'",
        ),
        (
            ["--listen", "1", "--to", "a:1", "--max-connections", "0"],
            "--max-connections: must be a positive whole number, not '0'",
        ),
        (
            ["--listen", "1", "--to", "a:1", "--keepalive", "1.5"],
            "--keepalive: must be a positive whole number of seconds, not '1.5'",
        ),
        (["--listen", "1", "--to", "a:1", "--nodelay", "--no-nodelay"], "contradict"),
        (["--bogus"], "--bogus not recognized"),
        # --mode connect: bad mode, proxy-only options in forward mode, bad rules and auth files.
        (["--mode", "socks9", "--listen", "1"], "--mode: must be one of"),
        (["--listen", "1", "--to", "a:1", "--splice", "sometimes"], "--splice: must be one of"),
        (["--listen", "1", "--to", "a:1", "--engine", "turbo"], "--engine: must be one of"),
        # --engine native says why the options need Twisted's path.
        (
            ["--listen", "1", "--to", "a.invalid:1", "--engine", "native"],
            "did not resolve at start-up",
        ),
        (["--mode", "connect", "--listen", "1", "--engine", "native"], "reads a request first"),
        (
            ["--mode", "socks5", "--listen", "1", "--engine", "native"],
            "socks5 reads a request first",
        ),
        (
            ["--listen", "1", "--to", "tls:127.0.0.1:1", "--engine", "native"],
            "TLS to backends is relayed",
        ),
        (
            ["--listen", "1", "--engine", "native"]
            + [arg for port in range(1, 66) for arg in ("--to", f"127.0.0.1:{port}")],
            "at most 64 backends",
        ),
        (
            ["--to", "127.0.0.1:1", "--engine", "native"]
            + [arg for port in range(1, 66) for arg in ("--listen", f"127.0.0.1:{port}")],
            "at most 64 listeners",
        ),
        (["--listen", "1", "--to", "a:1", "--allow-dest", "10.0.0.0/8"], "--allow-dest applies"),
        (["--mode", "connect", "--listen", "1", "--allow-dest", "10.0.0.1/8"], "host bits"),
        (["--mode", "connect", "--listen", "1", "--auth-file", "/nonexistent"], "--auth-file"),
        (["--mode", "socks5", "--listen", "1", "--allow-dest", "10.0.0.1/8"], "host bits"),
        (["--mode", "socks5", "--listen", "1", "--auth-file", "/nonexistent"], "--auth-file"),
        # --access-log: an unwritable path says which and why; contradictions and orphans.
        (
            ["--listen", "1", "--to", "a:1", "--access-log", "/nonexistent/a.log"],
            "--access-log /nonexistent/a.log: No such file or directory",
        ),
        (["--listen", "1", "--to", "a:1", "--access-log", "/a", "--no-access-log"], "contradict"),
        (
            ["--listen", "1", "--to", "a:1", "--access-log", "/a", "--access-log-format", "xml"],
            "--access-log-format: must be one of text, json",
        ),
        (["--listen", "1", "--to", "a:1", "--access-log-format", "json"], "needs --access-log"),
    ],
)
def test_errors_are_one_line(argv: list[str], message: str) -> None:
    """A bad command line ends with a single 'tunnelkit: error:' line, not a usage dump."""
    with pytest.raises(SystemExit) as caught:
        start(*argv)
    text = str(caught.value.code)
    assert text.startswith("tunnelkit: error:")
    assert message in text
    assert "\n" not in text


def test_help_has_no_double_periods() -> None:
    """Each option's help reads as sentences: Twisted's ". Must be ..." never follows a period."""
    text = str(Options())
    assert re.search(r"(?<!\.)\.\.(?!\.)", text) is None, text
    assert "Must be a positive number of seconds." in text


def test_bare_port_says_it_listens_on_all_interfaces() -> None:
    """--listen 8888 binds 0.0.0.0: the help says so, and the start-up line names the bound address and the scope."""
    assert "PORT (all IPv4 interfaces" in str(Options())
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        build_service(start("--listen", "8888", "--to", "127.0.0.1:1")).listen()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = [formatEvent(e) for e in events if e.get("event") == "listening"]
    assert line == "listening on 0.0.0.0:8888 (8888; all IPv4 interfaces)"


def test_alpn_help_warns_about_h2() -> None:
    """--help's --alpn example does not offer h2 to HTTP/1 backends and says when h2 is safe."""
    text = " ".join(str(Options()).split())
    assert "h2,http/1.1" not in text
    assert "offer h2 only if every backend speaks HTTP/2" in text


def test_zero_disables_idle_and_fin_timeouts() -> None:
    """--idle-timeout 0 and --fin-timeout 0 mean no limit."""
    service = build_service(
        start("--listen", "1", "--to", "a:1", "--idle-timeout", "0", "--fin-timeout", "0")
    )
    factory = service.listeners[0].factory()
    assert factory.timeouts.idle is None
    assert factory.timeouts.fin is None


def test_max_connections_reaches_registry() -> None:
    """--max-connections caps the registry."""
    prepared = start("--listen", "1", "--to", "a:1", "--max-connections", "7")
    assert build_service(prepared).registry.max_tunnels == 7


def test_connect_mode_policies_parsed() -> None:
    """--mode connect needs no --to and turns the dest, port and client rules into policies."""
    [o] = parse(
        "--mode", "connect", "--listen", "3128", "--allow-dest", "10.0.0.0/8:5432",
        "--deny-dest", "10.0.0.9", "--allow-port", "443", "--deny-client", "192.0.2.0/24",
        "--header-timeout", "3",
    ).settings.listeners  # fmt: skip
    assert o.backends == ()
    assert [r.text for r in o.targets.allow] == ["10.0.0.0/8:5432"]
    assert [r.text for r in o.targets.deny] == ["10.0.0.9"]
    assert o.targets.decide("10.0.0.9", 5432).refusal is not None
    assert o.targets.decide("10.1.2.3", 5432).allowed
    assert not o.clients.allows("192.0.2.1")
    assert o.header_timeout == 3.0


def test_connect_mode_with_to_builds_a_fixed_tunnel() -> None:
    """--mode connect --to B: every CONNECT listener dials B after the policy check."""
    prepared = start("--mode", "connect", "--listen", "1", "--to", "127.0.0.1:6379")
    factory = build_service(prepared).listeners[0].factory()
    mode = factory.mode  # type: ignore[attr-defined]
    assert isinstance(mode, ConnectMode)
    assert mode.settings.fixed is not None
    assert [b.name for b in mode.settings.fixed.backends] == ["127.0.0.1:6379"]


def _socks5_mode(prepared: Prepared) -> Socks5Mode:
    mode = build_service(prepared).listeners[0].factory().mode  # type: ignore[attr-defined]
    assert isinstance(mode, Socks5Mode)
    return mode


def test_socks5_mode_from_flags_and_from_a_file(tmp_path: Path) -> None:
    """--mode socks5 with the proxy keys, as flags or in a [[listener]] table: the same SOCKS5 listener."""
    users = tmp_path / "users"
    users.write_text(make_entry("alice", "pw", rounds=4) + "\n")
    flags = ("--mode", "socks5", "--listen", "1080", "--allow-dest", "10.0.0.0/8")
    flags += ("--deny-dest", "10.0.0.9", "--allow-port", "443", "--auth-file", str(users))
    flags += ("--header-timeout", "3", "--to", "127.0.0.1:6379")
    config = tmp_path / "tk.toml"
    config.write_text(
        '[[listener]]\nlisten = "1080"\nmode = "socks5"\nallow-dest = ["10.0.0.0/8"]\n'
        'deny-dest = ["10.0.0.9"]\nallow-port = ["443"]\n'
        f'auth-file = "{users}"\nheader-timeout = 3\nto = ["127.0.0.1:6379"]\n'
    )
    for prepared in (start(*flags), start("--config", str(config))):
        [loaded] = prepared.listeners
        assert loaded.settings.mode == "socks5" and loaded.why_twisted is not None
        settings = _socks5_mode(prepared).settings
        assert settings.header_timeout == 3.0
        assert settings.authenticate is not None
        assert settings.policy.decide("10.1.2.3", 443).allowed
        assert not settings.policy.decide("10.0.0.9", 443).allowed
        assert not settings.policy.decide("10.1.2.3", 22).allowed
        assert settings.fixed is not None
        assert [b.name for b in settings.fixed.backends] == ["127.0.0.1:6379"]


@pytest.mark.parametrize(
    ("listen", "backlog"),
    [
        ("127.0.0.1:0", 1024),
        ("tcp:0:interface=127.0.0.1", 1024),
        ("tcp:0:interface=127.0.0.1:backlog=7", 7),
    ],
)
def test_listen_backlog(listen: str, backlog: int) -> None:
    """Every TCP listener gets a backlog of 1024 (Twisted's is 50) unless its string sets one."""
    [(_, endpoint)] = listener("--listen", listen, "--to", "a:1").endpoints
    assert endpoint._backlog == backlog  # type: ignore[attr-defined]


def test_access_log_takes_the_records_and_reopens_on_sighup(tmp_path: Path) -> None:
    """--access-log: the listeners' records go to the file, and SIGHUP's action reopens it."""
    path = tmp_path / "a.log"
    o = start("--listen", "1", "--to", "127.0.0.1:1", "--access-log", str(path),
              "--access-log-format", "json")  # fmt: skip
    assert o.access_log is not None
    try:
        service = build_service(o)
        tunnel_log = service.listeners[0].factory().tunnel_log
        tunnel_log(a_record("127.0.0.1:7"), "1")
        tunnel_log.flush()
        [line] = path.read_text().splitlines()
        assert json.loads(line)["client"] == "127.0.0.1:7"
        path.rename(tmp_path / "a.log.1")
        assert service.on_reload is not None
        service.on_reload()
        assert path.exists()
    finally:
        o.access_log.close()


def test_engine_native_says_why_the_engine_cannot_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No built module, or a pyOpenSSL that lends no OpenSSL to it: --engine native says so; auto uses Twisted."""
    from tunnelkit.engine import driver as native
    from tunnelkit.engine import tls as native_tls

    pair = write_pair(trustme.CA(), tmp_path, "localhost")
    tls = ("--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    plain = ("--listen", "1", "--to", "127.0.0.1:1")
    assert native.built() and listener(*plain, *tls).why_twisted is None

    monkeypatch.setattr(native_tls, "_lib", None)
    why = "TLS is terminated by Python: this pyOpenSSL has no OpenSSL._util bindings"
    assert listener(*plain, *tls).why_twisted == why
    with pytest.raises(SystemExit, match=f"--engine native: {why}"):
        start(*plain, *tls, "--engine", "native")
    assert listener(*plain).why_twisted is None

    monkeypatch.setattr(native, "_engine", None)
    with pytest.raises(SystemExit, match="native engine is not built"):
        start(*plain, "--engine", "native")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({}, None),
        ({"mode": "connect"}, "--mode connect reads a request first"),
        ({"backend_tls": True}, "TLS to backends is relayed by Python"),
        ({"write_through": False}, "--no-write-through is a diagnostic of the Python path"),
        ({"listen": ["ssl:8443"]}, "--listen 'ssl:8443' is a TLS listener"),
        ({"listen": ["1"] * 65}, "it takes at most 64 listeners"),
        (
            {"backends": ["example.com:80"]},
            "--to 'example.com:80' did not resolve at start-up: Twisted resolves it per"
            " connection (the engine dials addresses and UNIX paths)",
        ),
    ],
)
def test_why_not_native_takes_one_listeners_values(change: dict[str, Any], why: str | None) -> None:
    """why_not_native is asked per listener with plain values (no Options), and says why as the flags name it."""
    from twisted.internet import reactor

    from tunnelkit.backends.endpoints import host_endpoint
    from tunnelkit.backends.group import Backend
    from tunnelkit.engine.driver import why_not_native

    values: dict[str, Any] = {
        "mode": "forward",
        "listen": ["1"],
        "backends": ["127.0.0.1:80"],
        "terminates_tls": False,
        "backend_tls": False,
        "write_through": True,
        **change,
    }
    addresses = [text.rpartition(":") for text in values["backends"]]
    values["backends"] = [
        Backend(f"{host}:{port}", host_endpoint(reactor, host, int(port), 5.0))
        for host, _, port in addresses
    ]
    assert why_not_native(**values) == why


def test_start_up_line_says_the_engine_is_not_built_and_how_to_see_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a built engine the start-up line says Twisted relays, why, and that pip install -v shows the build error."""
    from tunnelkit.app.build import log_relay_plane
    from tunnelkit.engine import driver as native

    monkeypatch.setattr(native, "_engine", None)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        log_relay_plane(start("--listen", "1", "--to", "127.0.0.1:1"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = [formatEvent(e) for e in events if e.get("event") == "engine"]
    assert line.startswith(
        "relaying with Twisted, not the native engine: the native engine is not built"
    )
    assert "`pip install -v` shows why" in line
