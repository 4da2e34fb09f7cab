"""Checks before anything listens: twistd's files, backend names, ``--check`` (in memory)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher

from tunnelkit.app.build import client_endpoint_types
from tunnelkit.cli import preflight
from tunnelkit.cli.plugin import Options
from tunnelkit.config.addresses import HostPort

TYPES = client_endpoint_types()


def test_unwritable_says_why(tmp_path: Path) -> None:
    """A missing directory and a directory in the file's place are named; a new or existing file is fine."""
    (tmp_path / "there").write_text("")
    assert preflight.unwritable(str(tmp_path / "new.log")) is None
    assert preflight.unwritable(str(tmp_path / "there")) is None
    assert preflight.unwritable(str(tmp_path / "nope" / "x.log")) == (
        f"directory {tmp_path / 'nope'} does not exist"
    )
    assert preflight.unwritable(str(tmp_path)) == "is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_directory(tmp_path: Path) -> None:
    """A directory the user may not write to is named."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert preflight.unwritable(str(locked / "x.pid")) == (
        f"cannot create a file in {locked}: permission denied"
    )


TWISTD = {"logfile": None, "logger": None, "syslog": False, "pidfile": "twistd.pid"}


@pytest.mark.parametrize(
    ("parent", "files"),
    [
        (None, []),
        ({"logFile": "x"}, []),  # twist's options: it opens its --log-file itself
        ({**TWISTD, "nodaemon": True}, [("--pidfile", "twistd.pid")]),
        ({**TWISTD, "nodaemon": False}, [("--logfile", "twistd.log"), ("--pidfile", "twistd.pid")]),
        ({**TWISTD, "nodaemon": True, "logfile": "-", "pidfile": ""}, []),
        ({**TWISTD, "nodaemon": False, "logger": "x.y", "chroot": "/srv"}, []),
        ({**TWISTD, "nodaemon": True, "logfile": "/l/t.log"}, [("--logfile", "/l/t.log"), ("--pidfile", "twistd.pid")]),
    ],
)  # fmt: skip
def test_twistd_files(parent: dict[str, Any] | None, files: list[tuple[str, str]]) -> None:
    """The files twistd will write: its log unless another observer takes it, its pid file unless chrooted."""
    assert list(preflight.twistd_files(parent)) == files


def test_named_backends_are_the_host_names() -> None:
    """Only HOST:PORT and tls:HOST:PORT backends whose host is a name need resolving."""
    texts = ["127.0.0.1:1", "[::1]:2", "db.internal:5432", "tls:api.example:443", "unix:/s", "x"]
    assert preflight.named_backends(texts, TYPES) == [
        HostPort("db.internal", 5432),
        HostPort("api.example", 443),
    ]


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def parse(*argv: str) -> Options:
    options = Options(reactor=MemoryReactorClock())
    options.parseOptions(list(argv))
    return options


def fake_getaddrinfo(monkeypatch: pytest.MonkeyPatch, known: set[str]) -> None:
    """The system resolver knows only ``known`` (no DNS query leaves the machine)."""

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host not in known:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_check_ok(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--check with good options and resolvable names says so and exits 0."""
    fake_getaddrinfo(monkeypatch, {"db.internal"})
    with pytest.raises(SystemExit) as caught:
        parse("--listen", "1", "--to", "db.internal:5432", "--check")
    assert caught.value.code == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("tunnelkit: configuration OK\n", "")


def test_check_fails_on_unresolvable_names(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check names each backend that does not resolve, one error line each, and exits 1."""
    fake_getaddrinfo(monkeypatch, {"db.internal"})
    argv = ["--listen", "1", "--to", "gone.example:80", "--to", "db.internal:1"]
    with pytest.raises(SystemExit) as caught:
        parse(*argv, "--to", "tls:lost.example:443", "--check")
    assert caught.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "tunnelkit: error: --to gone.example:80: cannot resolve 'gone.example':"
        " [Errno -2] Name or service not known",
        "tunnelkit: error: --to lost.example:443: cannot resolve 'lost.example':"
        " [Errno -2] Name or service not known",
    ]


def test_check_still_refuses_bad_options() -> None:
    """--check does not soften the usual errors: a bad option is still the one-line error."""
    with pytest.raises(SystemExit, match="--connect-timeout: must be"):
        parse("--listen", "1", "--to", "127.0.0.1:1", "--connect-timeout", "0", "--check")


def test_start_up_resolves_names_into_backends(
    monkeypatch: pytest.MonkeyPatch, logged: list[LogEvent]
) -> None:
    """Names are resolved at start: each address a backend; one that does not resolve is a warning and stays a name."""
    from tunnelkit.app.build import prepare
    from tunnelkit.backends.endpoints import AddressEndpoint

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        found = {"one.example": ["192.0.2.1"], "two.example": ["192.0.2.1", "2001:db8::2"]}
        if host not in found:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in found[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    argv = ["--listen", "127.0.0.1:0", "--max-connections", "8", "--to", "one.example:80"]
    config = parse(*argv, "--to", "two.example:81", "--to", "gone.example:80")
    assert config.settings is not None
    [listener] = prepare(config.settings, config.reactor).listeners
    assert [b.name for b in listener.backends] == [
        "one.example:80",
        "two.example:81 (192.0.2.1)",
        "two.example:81 (2001:db8::2)",
        "gone.example:80",
    ]
    dials = [b.endpoint for b in listener.backends]
    assert [(e.host, e.port) for e in dials[:3]] == [  # type: ignore[attr-defined]
        ("192.0.2.1", 80),
        ("192.0.2.1", 81),
        ("2001:db8::2", 81),
    ]
    assert all(type(e) is AddressEndpoint for e in dials[:3])
    assert type(dials[3]) is not AddressEndpoint  # resolved per connection, by Twisted
    [warning] = [e for e in logged if e.get("event") == "backend_unresolved"]
    assert warning["backend"] == "gone.example:80"
    assert listener.why_twisted is not None and "gone.example:80" in listener.why_twisted
