"""The settings model and its TOML file: typed values, every problem with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnelkit.config.addresses import HostPort
from tunnelkit.config.keys import KEYS, Scope
from tunnelkit.config.model import ConfigError, Settings, from_flags
from tunnelkit.config.toml_file import load

TYPES = frozenset({"tcp", "tls", "unix", "ssl"})

THREE = """
workers = 1
drain-timeout = 5
access-log-format = "json"
access-log = "access.log"

[[listener]]
listen = ["127.0.0.1:8888"]
to = ["127.0.0.1:8080", "[::1]:8080"]
idle-timeout = 0
no-half-close = true

[[listener]]
listen = "127.0.0.1:3128"
mode = "connect"
allow-dest = ["127.0.0.0/8"]
allow-port = "443"
header-timeout = 2.5

[[listener]]
listen = ["127.0.0.1:8443"]
to = ["unix:/run/app.sock"]
tls-cert = ["site.pem"]
tls-key = ["site.key"]
alpn = "http/1.1"
"""


def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "tk.toml"
    path.write_text(text)
    return load(str(path), TYPES)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert all(
        line.startswith(str(tmp_path / "tk.toml") + ": ") for line in str(caught.value).splitlines()
    )
    return [p.in_file() for p in caught.value.problems]


def test_three_listeners_of_different_modes(tmp_path: Path) -> None:
    """A file with a forward, a CONNECT and a TLS listener gives three typed listeners and the process values."""
    settings = _load(tmp_path, THREE)
    assert (settings.workers, settings.drain_timeout, settings.access_log_format) == (
        1,
        5.0,
        "json",
    )
    forward, connect, tls = settings.listeners
    assert forward.mode == "forward" and connect.mode == "connect" and tls.tls is not None
    assert [b.address for b in forward.backends] == [
        HostPort("127.0.0.1", 8080),
        HostPort("::1", 8080),
    ]
    assert forward.timeouts.idle is None and not forward.timeouts.half_close
    assert forward.endpoints == ("tcp:8888:interface=127.0.0.1:backlog=1024",)
    assert connect.listen == ("127.0.0.1:3128",) and connect.header_timeout == 2.5
    assert connect.targets.ports is not None
    assert tls.tls.pairs[0].cert == "site.pem" and tls.tls.alpn == (b"http/1.1",)
    assert tls.backends[0].address == "unix:/run/app.sock"
    assert [listener.name for listener in settings.listeners] == [
        "listener[0]",
        "listener[1]",
        "listener[2]",
    ]


def test_an_auto_listener_needs_nothing_but_where_to_listen() -> None:
    """``--mode auto`` alone serves SOCKS5 and CONNECT; --to and --detect-timeout are optional."""
    [listener] = from_flags({"listen": ["1"], "mode": "auto"}, TYPES).listeners
    assert (listener.mode, listener.backends, listener.detect_timeout) == ("auto", (), 2.0)
    [listener] = from_flags(
        {"listen": ["1"], "mode": "auto", "detect-timeout": 0.5}, TYPES
    ).listeners
    assert listener.detect_timeout == 0.5


def test_defaults_are_the_flags_defaults(tmp_path: Path) -> None:
    """A listener that sets only listen and to gets every other key's default."""
    [listener] = _load(tmp_path, '[[listener]]\nlisten = "8888"\nto = "h:80"\n').listeners
    assert listener.connect_timeout == KEYS["connect-timeout"].default
    assert listener.timeouts.fin == 60.0 and listener.socket_options.nodelay
    assert (listener.engine, listener.splice, listener.access_log) == ("auto", "auto", True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nconnect_timeout = 3\n', "listener[0].connect_timeout: unknown key (did you mean 'connect-timeout'?)"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nbogus = 3\n', "listener[0].bogus: unknown key"),
        ('workers = 2\nidle-timeout = 3\n[[listener]]\nlisten = "1"\nto = "h:1"\n', "idle-timeout: a listener setting: give it in a [[listener]] table"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nworkers = 2\n', "listener[0].workers: a process setting: give it at the top of the file"),
        ('[[listener]]\nlisten = "1"\nto = ["h:1", 5]\n', "listener[0].to[1]: must be a non-empty string, not 5"),
        ('[[listener]]\nlisten = "1"\nto = ["h:1", "nope"]\n', "listener[0].to[1]: 'nope' is neither host:port, [v6]:port nor a client endpoint string (ssl, tcp, tls, unix)"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nconnect-timeout = -1\n', "listener[0].connect-timeout: must be a positive number of seconds, not -1"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nconnect-timeout = "5"\n', "listener[0].connect-timeout: must be a positive number of seconds, not '5'"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nno-half-close = "yes"\n', "listener[0].no-half-close: must be true or false, not 'yes'"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nmode = "socks"\n', "listener[0].mode: must be one of forward, connect"),
        ('workers = 0\n[[listener]]\nlisten = "1"\nto = "h:1"\n', "workers: must be a whole number from 1 to 256, not 0"),
        ('[[listener]]\nto = "h:1"\n', 'listener[0].listen: is required (e.g. 8888)'),
        ('[[listener]]\nlisten = "1"\n', 'listener[0].to: is required in forward mode (e.g. 127.0.0.1:80)'),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nallow-dest = "10.0.0.0/8"\n', "listener[0].allow-dest: applies to mode connect, socks5 and auto only"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\ntls-key = "k.pem"\n', "listener[0].tls-key: needs tls-cert"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nbackend-ca = "ca.pem"\n', "listener[0].backend-ca: needs a tls:HOST:PORT backend or backend-tls"),
        ('[[listener]]\nlisten = ":80"\nto = "h:1"\n', "listener[0].listen[0]: no address before the port"),
        ('access-log-format = "json"\n[[listener]]\nlisten = "1"\nto = "h:1"\n', "access-log-format: needs access-log"),
        ('[[listener]]\nlisten = "1"\nto = "h:1,weight=300"\n', "listener[0].to[0]: weight=300: a weight is a whole number from 0 to 256"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nbalance = "rr"\n', "listener[0].balance: must be one of round-robin, least-conn, random, source-hash, first, not 'rr'"),
        ('[[listener]]\nlisten = "1"\nto = "h:1,backup"\n', "listener[0].backup: needs a to backend that is not a backup"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nhealth-send = "x"\n', "listener[0].health-send: needs health-interval"),
        ('[[listener]]\nlisten = "1"\nto = "h:1"\nhealth-interval = 1\nhealth-expect = "\\\\q"\n', "listener[0].health-expect: a backslash starts"),
        ("workers = 1\n", "listener: no listener: add a [[listener]] table"),
        ('[listener]\nlisten = "1"\n', "listener: must be an array of tables: write [[listener]]"),
        ("workers = \n", "not valid TOML"),
    ],
)  # fmt: skip
def test_each_kind_of_error_names_its_key_path(tmp_path: Path, text: str, expected: str) -> None:
    """Unknown keys, wrong scope, wrong type, out of range, missing and inconsistent keys: each is reported with its key path."""
    problems = _problems(tmp_path, text)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Problems in several listeners come back together, in file order."""
    text = '[[listener]]\nlisten = "1"\n\n[[listener]]\nlisten = "2"\nto = "h:1"\nidle-timeout = -5\nbogus = 1\n'
    problems = _problems(tmp_path, text)
    assert [p.split(":")[0] for p in problems] == [
        "listener[1].idle-timeout",
        "listener[0].to",
        "listener[1].bogus",
    ]


def test_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is one problem naming the file."""
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path / "absent.toml"), TYPES)
    assert (
        str(caught.value) == f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"
    )


def test_every_key_has_a_scope_and_help() -> None:
    """The key table is complete: a scope, a help text and a kind for each key."""
    for key in KEYS.values():
        assert isinstance(key.scope, Scope) and key.help and key.kind.what


def test_flags_give_one_listener_named_after_its_first_listen() -> None:
    """The command line's values make one listener, named after its first --listen."""
    settings = from_flags(
        {"listen": ["127.0.0.1:8888"], "to": ["h:80"], "workers": 2, "idle-timeout": 0.0},
        TYPES,
    )
    [listener] = settings.listeners
    assert (listener.name, settings.workers, listener.timeouts.idle) == ("127.0.0.1:8888", 2, None)
    assert settings.source == "the command line"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"listen": ["1"], "to": ["h:1", "nope"]}, "--to 'nope': 'nope' is neither"),
        ({"listen": ["1"], "to": ["h:1"], "tls-key": ["k"]}, "--tls-key needs --tls-cert"),
        ({"listen": ["1"], "to": ["h:1"], "allow-dest": ["10.0.0.0/8"]}, "--allow-dest applies to --mode connect, socks5 and auto only"),
        ({"to": ["h:1"]}, "--listen is required (e.g. 8888)"),
        ({"listen": ["1"], "to": ["h:1"], "detect-timeout": 1.0}, "--detect-timeout applies to --mode auto only"),
        ({"listen": ["1"], "mode": "auto", "route": ["a.test=h:2"], "tls-cert": ["c.pem"]}, "--route and --tls-cert in --mode auto: TLS clients are either terminated"),
    ],
)  # fmt: skip
def test_flag_problems_name_flags(values: dict[str, object], expected: str) -> None:
    """A problem on the command line names the flag (and the value at fault), never a key path."""
    with pytest.raises(ConfigError) as caught:
        from_flags(values, TYPES)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_balancing_keys(tmp_path: Path) -> None:
    """Weights and backups in the to values, the strategy, retries, health checks and their escapes."""
    settings = _load(
        tmp_path,
        '[[listener]]\nlisten = "1"\nto = ["a:1,weight=3", "b:1,backup"]\nbackup = ["c:1,weight=0"]\n'
        'balance = "least-conn"\nconnect-retries = 0\nmax-conn-per-backend = 9\nslow-start = 4\n'
        'health-interval = 2\nhealth-send = "PING\\\\r\\\\n\\\\x00"\nhealth-expect = "+PONG"\nrise = 1\nfall = 5\n'
        "resolve-interval = 30\n",
    )
    [listener] = settings.listeners
    assert [(b.text, b.weight, b.backup) for b in listener.backends] == [
        ("a:1", 3, False),
        ("b:1", 1, True),
        ("c:1", 0, True),
    ]
    balancing = listener.balancing
    assert (balancing.strategy, balancing.retries, balancing.max_conn) == ("least-conn", 0, 9)
    assert (balancing.eject_after, balancing.slow_start) == (5, 4.0)
    health = listener.health
    assert health is not None
    assert (health.interval, health.timeout, health.rise, health.fall) == (2.0, 2.0, 1, 5)
    assert (health.send, health.expect) == (b"PING\r\n\x00", b"+PONG")
    assert listener.resolve_interval == 30.0


def test_balancing_defaults(tmp_path: Path) -> None:
    """Round-robin, two retries, fall 3 for passive ejection, no active checks, names resolved at start only."""
    [listener] = _load(tmp_path, '[[listener]]\nlisten = "1"\nto = "h:1"\n').listeners
    assert listener.balancing.strategy == "round-robin" and listener.balancing.retries == 2
    assert listener.balancing.eject_after == 3 and listener.health is None
    assert listener.resolve_interval == 0.0


def test_the_balancing_docs_example_is_valid(tmp_path: Path) -> None:
    """docs/balancing.md's file example parses into what it says."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "balancing.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert block is not None
    [listener] = _load(tmp_path, block[1]).listeners
    assert [(b.weight, b.backup) for b in listener.backends] == [(2, False), (1, False), (1, True)]
    assert listener.balancing.strategy == "least-conn"
    assert listener.health is not None and listener.health.send == b"PING\r\n"
