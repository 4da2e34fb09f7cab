"""udp: listeners from flags and the TOML file: their short forms, their keys, their problems."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelkit.config.addresses import (
    AddressError,
    HostPort,
    listen_description,
    udp_listen_address,
)
from tunnelkit.config.model import ConfigError, from_flags
from tunnelkit.config.toml_file import load
from tunnelkit.udp.settings import UdpSettings

TYPES = frozenset({"tcp", "tls", "unix", "ssl"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("udp:5353", ("0.0.0.0", 5353)),
        ("udp:[::]:51820", ("::", 51820)),
        ("udp:[::1]:0", ("::1", 0)),
        ("udp:127.0.0.1:53", ("127.0.0.1", 53)),
        ("UDP:localhost:53", ("127.0.0.1", 53)),
    ],
)
def test_udp_listen_short_forms(text: str, expected: tuple[str, int]) -> None:
    """udp:PORT, udp:[V6]:PORT and udp:ADDR:PORT are an interface and a port, as the TCP short forms."""
    assert udp_listen_address(text) == expected


@pytest.mark.parametrize(
    "text", ["udp:", "udp:70000", "udp:host.example:53", "udp:[nope]:1", "udp:1:2:3"]
)
def test_bad_udp_listen_addresses(text: str) -> None:
    """A udp: listen value that is not one of the short forms is an error that says which forms exist."""
    with pytest.raises(AddressError):
        udp_listen_address(text)


@given(st.integers(0, 65535), st.sampled_from(["", "127.0.0.1:", "[::1]:"]))
def test_udp_listen_round_trip(port: int, host: str) -> None:
    """Every port and short form parses back to the port written."""
    assert udp_listen_address(f"udp:{host}{port}")[1] == port


def test_flags_make_a_udp_listener() -> None:
    """--listen udp:... --to udp:... (several: balanced) with the udp keys gives a UDP listener's settings."""
    settings = from_flags(
        {
            "listen": ["udp:5353", "udp:[::]:5353"],
            "to": ["udp:10.0.0.2:53", "udp:[fd00::2]:53,weight=3"],
            "balance": "source-hash",
            "udp-idle-timeout": 5.0,
            "udp-replies": 1,
        },
        TYPES,
    )
    [listener] = settings.listeners
    assert listener.udp == UdpSettings(
        addresses=(("0.0.0.0", 5353), ("::", 5353)), idle_timeout=5.0, replies=1
    )
    assert [(b.address, b.weight) for b in listener.backends] == [
        (HostPort("10.0.0.2", 53), 1),
        (HostPort("fd00::2", 53), 3),
    ]
    assert listener.balancing.strategy == "source-hash"
    assert listener.name == "udp:5353"


def test_udp_listener_in_the_file(tmp_path: Path) -> None:
    """A [[listener]] with udp: values beside a TCP one: each gets its own settings."""
    path = tmp_path / "tk.toml"
    path.write_text(
        'max-connections = 100\n[[listener]]\nlisten = "udp:127.0.0.1:53"\nto = ["udp:127.0.0.1:5300"]\n'
        "udp-idle-timeout = 30\nudp-sessions-per-source = 4\nudp-session-rate = 2\n"
        '[[listener]]\nlisten = "8080"\nto = "127.0.0.1:80"\n'
    )
    settings = load(str(path), TYPES)
    udp, tcp = settings.listeners
    assert udp.udp == UdpSettings(
        addresses=(("127.0.0.1", 53),), idle_timeout=30.0, sessions_per_source=4, session_rate=2
    )
    assert tcp.udp is None
    assert settings.max_connections == 100


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"listen": ["udp:53"], "to": ["127.0.0.1:53"]}, "--to '127.0.0.1:53': '127.0.0.1:53': a udp: listener forwards to udp:HOST:PORT"),
        ({"listen": ["udp:53", "53"], "to": ["udp:h:53"]}, "--listen '53': udp: and TCP in one listener"),
        ({"listen": ["udp:53"]}, "--to is required"),
        ({"listen": ["udp:53"], "to": ["udp:h:53"], "tls-cert": ["c.pem"]}, "--tls-cert does not apply to udp: listeners"),
        ({"listen": ["udp:53"], "to": ["udp:h:53"], "mode": "connect"}, "udp: listeners forward only"),
        ({"listen": ["udp:53"], "to": ["udp:h:53"], "engine": "native"}, "--engine native: UDP runs on Twisted's plane"),
        ({"listen": ["udp:53"], "to": ["udp:h:53,backup"]}, "--backup needs a --to backend that is not a backup"),
        ({"listen": ["udp:53"], "to": ["udp:h:53"], "health-interval": 1.0, "health-expect": "x"}, "--health-interval on a udp: listener needs --health-send and --health-expect"),
        ({"listen": ["53"], "to": ["h:53"], "udp-replies": 1}, "--udp-replies applies to udp: listeners only"),
        ({"listen": ["53"], "to": ["udp:h:53"]}, "--to 'udp:h:53': a udp: backend needs a udp: --listen"),
        ({"listen": ["udp:h.example:53"], "to": ["udp:h:53"]}, "--listen 'udp:h.example:53': 'h.example' is not an IPv4 address"),
    ],
)  # fmt: skip
def test_udp_problems(values: dict[str, object], expected: str) -> None:
    """What a UDP listener cannot take is a problem naming the flag, never silently ignored."""
    with pytest.raises(ConfigError) as caught:
        from_flags(values, TYPES)
    assert expected in str(caught.value), str(caught.value)


def test_tcp_listen_forms_are_unchanged() -> None:
    """The TCP short forms still make tcp: endpoints (udp: is a form of its own)."""
    assert listen_description("5353") == "tcp:5353:backlog=1024"
