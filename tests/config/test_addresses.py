"""Short forms of --listen and --to."""

from __future__ import annotations

import re

import pytest

from tunnelkit.config.addresses import (
    DEFAULT_BACKLOG,
    AddressError,
    HostPort,
    backend_address,
    listen_description,
    wildcard_scope,
)

TYPES = frozenset({"tcp", "ssl", "unix", "tls"})
B = DEFAULT_BACKLOG


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8888", f"tcp:8888:backlog={B}"),
        ("127.0.0.1:8888", f"tcp:8888:interface=127.0.0.1:backlog={B}"),
        ("localhost:8888", f"tcp:8888:interface=127.0.0.1:backlog={B}"),
        ("[::1]:8888", f"tcp6:8888:interface=\\:\\:1:backlog={B}"),
        ("tcp:8443:interface=127.0.0.1", f"tcp:8443:interface=127.0.0.1:backlog={B}"),
        ("TCP6:8443", f"TCP6:8443:backlog={B}"),
        ("unix:/run/tk.sock", f"unix:/run/tk.sock:backlog={B}"),
        ("ssl:443:privateKey=k.pem", f"ssl:443:privateKey=k.pem:backlog={B}"),
        # backlog= given: kept as it is, per listener.
        ("tcp:8443:backlog=4096", "tcp:8443:backlog=4096"),
        ("unix:/run/a\\:backlog=b:backlog=8", "unix:/run/a\\:backlog=b:backlog=8"),
        # A path that merely contains "backlog=" after an escaped colon gets one.
        ("unix:/run/a\\:backlog=b", f"unix:/run/a\\:backlog=b:backlog={B}"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listen_forms(text: str, expected: str) -> None:
    """Short listen forms become TCP endpoint strings; endpoint strings get a backlog of 1024 unless they set one."""
    assert listen_description(text) == expected


@pytest.mark.parametrize("text", ["", "70000", "[zz::1]:80", "127.0.0.1:65536"])
def test_listen_rejects(text: str) -> None:
    """Empty input, bad ports and bad IPv6 literals are refused with a reason."""
    with pytest.raises(AddressError):
        listen_description(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (":21113", "no address before the port: 21113 listens on all IPv4 interfaces"),
        ("127.0.0.1:", "no port after 127.0.0.1"),
        ("[::1]:", "no port after [::1]"),
    ],
)
def test_listen_short_form_missing_a_part(text: str, reason: str) -> None:
    """A short form without its address or its port says which part is missing."""
    with pytest.raises(AddressError, match=re.escape(reason)):
        listen_description(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backend.example:80", HostPort("backend.example", 80)),
        ("127.0.0.1:6379", HostPort("127.0.0.1", 6379)),
        ("[::1]:80", HostPort("::1", 80)),
        ("tls:db.internal:5433", "tls:db.internal:5433"),
        ("tcp:127.0.0.1:80", "tcp:127.0.0.1:80"),
        ("unix:/run/app.sock", "unix:/run/app.sock"),
    ],
)
def test_backend_forms(text: str, expected: object) -> None:
    """host:port and [v6]:port are short forms; endpoint strings pass through."""
    assert backend_address(text, TYPES) == expected


def test_endpoint_type_is_never_a_host_name() -> None:
    """``tcp:80`` is the tcp endpoint type, not a host called tcp."""
    assert backend_address("tcp:80", TYPES) == "tcp:80"


@pytest.mark.parametrize("text", ["", "backend", "host:0", "host:65536", "bogus:x:1", "[1:2"])
def test_backend_rejects(text: str) -> None:
    """Unusable backends are refused with a reason."""
    with pytest.raises(AddressError):
        backend_address(text, TYPES)


def test_hostport_renders_v6_in_brackets() -> None:
    """IPv6 backends print as [addr]:port."""
    assert str(HostPort("::1", 80)) == "[::1]:80"
    assert str(HostPort("a.example", 80)) == "a.example:80"


@pytest.mark.parametrize(
    ("host", "scope"),
    [
        ("0.0.0.0", "; all IPv4 interfaces"),
        ("::", "; all interfaces"),
        ("127.0.0.1", ""),
        ("::1", ""),
        (None, ""),
    ],
)
def test_wildcard_scope(host: str | None, scope: str) -> None:
    """Only a wildcard bind (0.0.0.0, ::) gets the note that every network can reach it."""
    assert wildcard_scope(host) == scope
