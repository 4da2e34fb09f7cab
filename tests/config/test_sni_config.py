"""``--mode sni`` and ``route`` as flags and in the TOML file; what an SNI listener cannot be given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli.test_preflight import fake_getaddrinfo, parse

from tunnelkit.config.addresses import HostPort
from tunnelkit.config.model import BackendSpec, ConfigError, RouteSpec, from_flags
from tunnelkit.config.toml_file import load
from tunnelkit.policy.sni_routes import RouteMatch

TYPES = frozenset({"tcp", "tls", "unix", "ssl"})

FILE = """
[[listener]]
listen = ["127.0.0.1:8443"]
mode = "sni"
route = ["API.example.com=10.0.0.5:443,weight=3", "*.example.com,alpn=h2=10.0.0.6:443"]
to = ["10.0.0.9:443"]
header-timeout = 2.5
"""

EXPECTED = (
    RouteSpec(
        RouteMatch("api.example.com"),
        BackendSpec("10.0.0.5:443", HostPort("10.0.0.5", 443), False, weight=3),
    ),
    RouteSpec(
        RouteMatch("*.example.com", b"h2"),
        BackendSpec("10.0.0.6:443", HostPort("10.0.0.6", 443), False),
    ),
)


def test_routes_in_a_file(tmp_path: Path) -> None:
    """A [[listener]] of mode sni reads its routes, each with its backend's weight."""
    path = tmp_path / "tk.toml"
    path.write_text(FILE)
    [listener] = load(str(path), TYPES).listeners
    assert (listener.mode, listener.routes, listener.header_timeout) == ("sni", EXPECTED, 2.5)
    assert [b.text for b in listener.backends] == ["10.0.0.9:443"]


def test_routes_as_flags() -> None:
    """The same routes as repeated --route flags; a route alone, without --to, is enough."""
    settings = from_flags(
        {
            "listen": ["127.0.0.1:8443"],
            "mode": "sni",
            "route": [
                "API.example.com=10.0.0.5:443,weight=3",
                "*.example.com,alpn=h2=10.0.0.6:443",
            ],
        },
        TYPES,
    )
    [listener] = settings.listeners
    assert (listener.routes, listener.backends) == (EXPECTED, ())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"mode": "sni"}, "--route or a default --to is required in sni mode"),
        ({"to": ["h:1"], "route": ["a.test=h:2"]}, "--route applies to --mode sni and auto only"),
        ({"mode": "connect", "route": ["a.test=h:2"]}, "--route applies to --mode sni and auto only"),
        ({"mode": "sni", "route": ["a.*.test=h:2"]}, "--route 'a.*.test=h:2': 'a.*.test' is not a host name"),
        ({"mode": "sni", "route": ["a.test=nope"]}, "--route 'a.test=nope': 'nope' is neither"),
        ({"mode": "sni", "route": ["a.test=tls:h:443"]}, "--route 'a.test=tls:h:443': 'tls:h:443': the client's TLS goes to the backend as it is"),
        ({"mode": "sni", "to": ["tls:h:443"]}, "--to 'tls:h:443': 'tls:h:443': the client's TLS goes"),
        ({"mode": "sni", "route": ["a.test=h:1,backup"]}, "--route: route a.test: every backend is a backup"),
        ({"mode": "sni", "to": ["h:1"], "tls-cert": ["c.pem"]}, "--tls-cert does not apply to --mode sni"),
        ({"mode": "sni", "to": ["h:1"], "backend-tls": True}, "--backend-tls does not apply to --mode sni"),
        ({"mode": "sni", "to": ["h:1"], "allow-dest": ["10.0.0.0/8"]}, "--allow-dest applies to --mode connect, socks5 and auto only"),
    ],
)  # fmt: skip
def test_problems(values: dict[str, object], expected: str) -> None:
    """What an SNI listener needs and cannot be given is an error naming the flag."""
    with pytest.raises(ConfigError) as caught:
        from_flags({"listen": ["1"], **values}, TYPES)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_problems_in_a_file_name_the_route(tmp_path: Path) -> None:
    """In a file, a bad route is named by its key path."""
    path = tmp_path / "tk.toml"
    path.write_text('[[listener]]\nlisten = "1"\nmode = "sni"\nroute = ["a.test=h:1", "b=c=d"]\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), TYPES)
    [problem] = caught.value.problems
    assert problem.in_file().startswith("listener[0].route[1]: 'c=d'"), problem.in_file()


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    """docs/sni.md's TOML example loads: four routes, the same name twice, an ALPN route."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "sni.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None, "docs/sni.md has no ```toml example"
    path = tmp_path / "tk.toml"
    path.write_text(block[1])
    [listener] = load(str(path), TYPES).listeners
    assert [str(route.match) for route in listener.routes] == [
        "api.example.com",
        "api.example.com",
        "*.example.com",
        "*,alpn=acme-tls/1",
    ]


def test_check_resolves_route_names(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check resolves the routes' backend names too, and names the route's backend that does not."""
    fake_getaddrinfo(monkeypatch, {"api.internal"})
    argv = ["--listen", "1", "--mode", "sni", "--route", "a.test=api.internal:443"]
    with pytest.raises(SystemExit) as caught:
        parse(*argv, "--route", "b.test=gone.example:443", "--check")
    assert caught.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "tunnelkit: error: --route gone.example:443: cannot resolve 'gone.example':"
        " [Errno -2] Name or service not known",
    ]
