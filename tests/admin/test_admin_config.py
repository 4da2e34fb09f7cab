"""``admin`` and ``admin-token``: the settings, in a file and as flags, and the token file read at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor

from tunnelkit.app.build import prepare
from tunnelkit.config.model import ConfigError, Settings, from_flags
from tunnelkit.config.toml_file import load

TYPES = frozenset({"tcp", "tls", "unix", "ssl"})


def _flags(**given: object) -> Settings:
    return from_flags({"listen": ["127.0.0.1:0"], "to": ["127.0.0.1:9"], **given}, TYPES)


def test_admin_takes_the_short_forms_of_listen(tmp_path: Path) -> None:
    """``admin`` is a process key written as ``listen`` is; ``admin-token`` is the file's path."""
    path = tmp_path / "tk.toml"
    path.write_text(
        'admin = "127.0.0.1:9100"\nadmin-token = "admin.token"\n\n'
        '[[listener]]\nlisten = "127.0.0.1:0"\nto = "127.0.0.1:9"\n'
    )
    settings = load(str(path), TYPES)
    assert settings.admin == "tcp:9100:interface=127.0.0.1:backlog=1024"
    assert settings.admin_token == "admin.token"
    assert _flags(admin="unix:/run/tk-admin.sock").admin == "unix:/run/tk-admin.sock:backlog=1024"


def test_admin_problems() -> None:
    """A token without an endpoint, and an endpoint that is not one, are refused by name."""
    with pytest.raises(ConfigError) as caught:
        _flags(**{"admin-token": "t"})
    assert [p.message for p in caught.value.problems] == ["--admin-token needs --admin"]
    with pytest.raises(ConfigError) as caught:
        _flags(admin=":9100")
    [problem] = caught.value.problems
    assert problem.message.startswith("--admin: no address before the port"), problem


def test_an_unknown_endpoint_type_is_found_before_listening() -> None:
    """``--check`` (which runs ``prepare``) reports it, as for ``--listen``."""
    with pytest.raises(ConfigError) as caught:
        prepare(_flags(admin="htpp:9100"), MemoryReactor())
    [problem] = caught.value.problems
    assert problem.as_flag({}) == "--admin: 'htpp' is not an endpoint type"


@pytest.mark.parametrize(
    ("content", "error"),
    [(None, "No such file or directory"), (b" \n", "is empty")],
)
def test_a_token_file_is_read_at_start(tmp_path: Path, content: bytes | None, error: str) -> None:
    """A missing or empty token file is a start-up (and --check) error; the token read drops whitespace."""
    token = tmp_path / "admin.token"
    if content is not None:
        token.write_bytes(content)
    settings = _flags(admin="127.0.0.1:0", **{"admin-token": str(token)})
    with pytest.raises(ConfigError) as caught:
        prepare(settings, MemoryReactor())
    [problem] = caught.value.problems
    assert problem.path == ("admin-token",) and error in problem.message, problem
    token.write_bytes(b"  s3cret\n")
    assert prepare(settings, MemoryReactor()).admin_token == b"s3cret"
