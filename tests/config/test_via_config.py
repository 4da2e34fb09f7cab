"""``via``: the URL, the key on the command line and in the file, and what it may be combined with."""

from __future__ import annotations

from pathlib import Path

import pytest
from processes import executable, run

from tunnelkit.backends.via_url import Via, ViaURLError, parse_via
from tunnelkit.config.model import ConfigError, from_flags
from tunnelkit.config.toml_file import load

TYPES = frozenset({"tcp", "tls", "unix", "ssl"})
SECRET = "s3cr%40t"


@pytest.mark.parametrize(
    ("text", "via"),
    [
        ("http://proxy:3128", Via("http", False, "proxy", 3128)),
        ("HTTPS://proxy.corp:443/", Via("http", True, "proxy.corp", 443)),
        ("socks5://[::1]:1080", Via("socks5", False, "::1", 1080)),
        ("socks5h://u:@10.0.0.1:1080", Via("socks5", False, "10.0.0.1", 1080, "u", "")),
        (f"http://al%3Aice:{SECRET}@p:8080", Via("http", False, "p", 8080, "al:ice", "s3cr@t")),
    ],
)
def test_urls(text: str, via: Via) -> None:
    """Schemes, IPv6 hosts and percent-encoded credentials are read as a curl user writes them."""
    assert parse_via(text) == via


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("proxy:3128", "give http://[USER:PASS@]HOST:PORT"),
        ("ftp://proxy:21", "give http://"),
        (f"http://u:{SECRET}@proxy", "http://u:***@proxy: give the proxy's port"),
        (f"http://u:{SECRET}@proxy:99999", "http://u:***@proxy:99999: Port out of range"),
        ("http://proxy:3128/path", "a proxy URL has no path, query or fragment"),
        (f"http://:{SECRET}@proxy:1", "a password needs a user name"),
        (f"socks5://{'u' * 256}:p@proxy:1", "a SOCKS5 user name is at most 255 bytes"),
    ],
)
def test_bad_urls(text: str, message: str) -> None:
    """Each bad URL says what is wrong, and never shows its password."""
    with pytest.raises(ViaURLError) as caught:
        parse_via(text)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


def test_shown_and_repr_mask_the_password() -> None:
    """The URL in messages and the object's repr keep the user and hide the password."""
    via = parse_via(f"socks5://alice:{SECRET}@proxy:1080")
    assert via.shown == "socks5://alice:***@proxy:1080"
    assert "s3cr" not in repr(via)


def test_flag_and_file(tmp_path: Path) -> None:
    """``--via`` and ``via =`` in a [[listener]] give the same settings."""
    url = f"http://alice:{SECRET}@proxy:3128"
    flags = from_flags({"listen": ["1"], "to": ["db:5432"], "via": [url]}, TYPES)
    path = tmp_path / "tk.toml"
    path.write_text(f'[[listener]]\nlisten = "1"\nto = "db:5432"\nvia = "{url}"\n')
    [by_flag], [in_file] = flags.listeners, load(str(path), TYPES).listeners
    assert by_flag.via == in_file.via == (Via("http", False, "proxy", 3128, "alice", "s3cr@t"),)


def test_chain_flag_and_file(tmp_path: Path) -> None:
    """Several ``--via`` (a list in the file) are a chain, in the order given."""
    urls = ["http://p1:3128", "socks5://p2:1080"]
    flags = from_flags({"listen": ["1"], "to": ["db:5432"], "via": urls}, TYPES)
    path = tmp_path / "tk.toml"
    path.write_text(
        f'[[listener]]\nlisten = "1"\nto = "db:5432"\nvia = {urls!r}\n'.replace("'", '"')
    )
    [by_flag], [in_file] = flags.listeners, load(str(path), TYPES).listeners
    chain = (Via("http", False, "p1", 3128), Via("socks5", False, "p2", 1080))
    assert by_flag.via == in_file.via == chain


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"via": [f"http://u:{SECRET}@p"]}, "--via: http://u:***@p: give the proxy's port"),
        ({"via": ["http://p:1", f"socks5://u:{SECRET}@q"]}, "--via: socks5://u:***@q: give the proxy's port"),
        ({"via": ["http://p:1"], "to": ["unix:/run/app.sock"]}, "--via: the proxy is asked for HOST:PORT backends, not 'unix:/run/app.sock'"),
        ({"via": ["http://p:1"], "mode": "connect", "to": []}, "--via reaches --to backends: --mode connect needs --to with it"),
        ({"via": ["http://p:1"], "resolve-interval": 5.0}, "--resolve-interval: with --via the proxy resolves backend names"),
        ({"via": ["socks5://p:1"], "to": [f"{'a' * 256}:1"]}, "--via: a SOCKS5 proxy takes names of at most 255 bytes"),
        ({"backend-ca": "ca.pem"}, "--backend-ca needs a tls:HOST:PORT backend"),
    ],
)  # fmt: skip
def test_problems(values: dict[str, object], expected: str) -> None:
    """What ``via`` cannot be combined with is said with the flags, the password masked."""
    with pytest.raises(ConfigError) as caught:
        from_flags({"listen": ["1"], "to": ["h:1"], **values}, TYPES)
    assert expected in str(caught.value), str(caught.value)
    assert SECRET not in str(caught.value)


def test_https_proxy_takes_backend_ca() -> None:
    """An https:// proxy, also later in a chain, is verified like a TLS backend: --backend-ca applies."""
    settings = from_flags(
        {
            "listen": ["1"],
            "to": ["h:1"],
            "via": ["http://p:1", "https://q:443"],
            "backend-ca": "ca.pem",
        },
        TYPES,
    )
    [listener] = settings.listeners
    assert listener.backend_tls is not None and listener.backend_tls.ca == "ca.pem"


def test_engine_native_refuses_via(tmp_path: Path) -> None:
    """``--engine native --via``: the start refuses, saying the proxy is negotiated by Python."""
    result = run(
        [executable("tunnelkit"), "--listen", "127.0.0.1:0", "--to", "127.0.0.1:1",
         "--via", "http://127.0.0.1:3128", "--engine", "native", "--check"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "--engine native: --via: Python negotiates with the upstream proxy" in result.stdout


def test_check_resolves_the_proxy_not_the_backends(tmp_path: Path) -> None:
    """--check leaves backend names to the proxy, and fails on a proxy name that does not resolve."""
    argv = [
        executable("tunnelkit"),
        "--listen",
        "127.0.0.1:0",
        "--to",
        "db.invalid:5432",
        "--check",
    ]
    through = run([*argv, "--via", f"http://u:{SECRET}@127.0.0.1:3128"], cwd=tmp_path)
    assert (through.returncode, through.stdout.strip()) == (0, "tunnelkit: configuration OK")
    unknown = run([*argv, "--via", f"socks5://u:{SECRET}@proxy.invalid:1080"], cwd=tmp_path)
    assert unknown.returncode == 1, unknown.stdout
    assert "--via socks5://u:***@proxy.invalid:1080: " in unknown.stdout
    assert SECRET not in unknown.stdout
