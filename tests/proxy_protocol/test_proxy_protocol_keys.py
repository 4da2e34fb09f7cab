"""The PROXY protocol's keys: flags and the TOML file alike, every misuse named, the plane chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from tunnelkit.app.build import prepare
from tunnelkit.cli.plugin import Options
from tunnelkit.config.model import ConfigError, from_flags
from tunnelkit.config.toml_file import load

TYPES = frozenset({"tcp", "tls", "unix", "ssl"})


def test_flags_and_file_say_the_same(tmp_path: Path) -> None:
    """--proxy-protocol, --accept-proxy-protocol and --trusted-proxies as flags and as file keys."""
    flags = from_flags(
        {
            "listen": ["1"],
            "to": ["h:1"],
            "proxy-protocol": "v2",
            "accept-proxy-protocol": True,
            "trusted-proxies": ["10.0.0.0/8", "::1"],
        },
        TYPES,
    ).listeners[0]
    path = tmp_path / "tk.toml"
    path.write_text(
        '[[listener]]\nlisten = "1"\nto = "h:1"\nproxy-protocol = "v2"\n'
        'accept-proxy-protocol = true\ntrusted-proxies = ["10.0.0.0/8", "::1"]\n'
    )
    [listener] = load(str(path), TYPES).listeners
    for each in (flags, listener):
        assert each.proxy_protocol == 2
        assert each.trusted_proxies is not None
        assert each.trusted_proxies.allows("10.1.2.3") and not each.trusted_proxies.allows(
            "192.0.2.1"
        )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"accept-proxy-protocol": True}, "--accept-proxy-protocol needs --trusted-proxies"),
        ({"trusted-proxies": ["10.0.0.1"]}, "--trusted-proxies needs --accept-proxy-protocol"),
        ({"accept-proxy-protocol": True, "trusted-proxies": ["nope"]}, "--trusted-proxies"),
        ({"proxy-protocol": "v1", "to": ["tls:h:443"]}, "--proxy-protocol with a TLS backend"),
        ({"proxy-protocol": "v2", "to": ["ssl:h:443"]}, "--proxy-protocol with a TLS backend"),
        (
            {"proxy-protocol": "v2", "to": ["h:443"], "backend-tls": True},
            "--proxy-protocol with a TLS backend",
        ),
    ],
)
def test_misuse_is_named(values: dict[str, object], expected: str) -> None:
    """Accepting without trusted proxies (or the reverse), a bad CIDR, a bad version, TLS backends."""
    with pytest.raises(ConfigError) as caught:
        from_flags({"listen": ["1"], "to": ["h:1"], **values}, TYPES)
    assert expected in str(caught.value), str(caught.value)


def _why_twisted(*argv: str) -> str | None:
    options = Options(reactor=MemoryReactorClock())
    options.parseOptions(["--listen", "1", "--to", "127.0.0.1:1", *argv])
    assert options.settings is not None
    [listener] = prepare(options.settings, options.reactor).listeners
    return listener.why_twisted


def test_sending_stays_on_the_engine_accepting_does_not() -> None:
    """--proxy-protocol is the engine's too; --accept-proxy-protocol reads first, so Twisted relays."""
    assert _why_twisted("--proxy-protocol", "v1") is None
    why = _why_twisted("--accept-proxy-protocol", "--trusted-proxies", "127.0.0.1")
    assert why == "--accept-proxy-protocol reads a PROXY header first"
    with pytest.raises(ConfigError, match="native: --accept-proxy-protocol reads a PROXY header"):
        _why_twisted(
            "--accept-proxy-protocol", "--trusted-proxies", "127.0.0.1", "--engine", "native"
        )


@pytest.mark.parametrize(
    ("version", "send", "expected"),
    [
        ("v1", None, b"PROXY UNKNOWN\r\n"),
        ("v1", "PING\\r\\n", b"PROXY UNKNOWN\r\nPING\r\n"),
        ("v2", None, b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"),
    ],
)
def test_health_checks_begin_with_a_header(version: str, send: str | None, expected: bytes) -> None:
    """A backend that wants the header gets one from checks too: v1 UNKNOWN or v2 LOCAL first."""
    values: dict[str, object] = {"health-interval": 2.0, "proxy-protocol": version}
    if send is not None:
        values["health-send"] = send
    [listener] = from_flags({"listen": ["1"], "to": ["h:1"], **values}, TYPES).listeners
    assert listener.health is not None and listener.health.send == expected


def test_an_ssl_listener_cannot_accept(tmp_path: Path) -> None:
    """An ssl: listener reads nothing before its own TLS: accepting there is refused with the way out."""
    import trustme
    from certs import write_pair

    pair = write_pair(trustme.CA(), tmp_path, "localhost")
    options = Options(reactor=MemoryReactorClock())
    options.parseOptions(
        [
            "--listen", f"ssl:0:privateKey={pair.key}:certKey={pair.cert}",
            "--to", "127.0.0.1:1",
            "--accept-proxy-protocol", "--trusted-proxies", "127.0.0.1",
        ]
    )  # fmt: skip
    assert options.settings is not None
    with pytest.raises(ConfigError, match="reads no PROXY header before its TLS"):
        prepare(options.settings, options.reactor)
