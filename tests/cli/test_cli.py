"""The ``tunnelkit`` command: twist's --log-format among the plugin's options, its help and version."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from loopback import Serve, assert_echoes, echo
from processes import executable, json_events, run, tunnelkit

from tunnelkit.cli.command import split_arguments


@pytest.mark.parametrize(
    ("args", "twist", "plugin"),
    [
        (["--listen", "1", "--to", "a:1"], [], ["--listen", "1", "--to", "a:1"]),
        (["--listen", "1", "--log-format", "text", "--to", "a:1"], ["--log-format", "text"], ["--listen", "1", "--to", "a:1"]),
        (["--log-format=JSON", "--listen", "1"], ["--log-format", "json"], ["--listen", "1"]),
    ],
)  # fmt: skip
def test_log_format_goes_to_twist(args: list[str], twist: list[str], plugin: list[str]) -> None:
    """--log-format, in either spelling and anywhere, is twist's; the rest stays the plugin's, in order."""
    assert split_arguments(args) == (twist, plugin)


@pytest.mark.parametrize("args", [["--log-format", "xml"], ["--log-format"], ["--log-format="]])
def test_bad_log_format_is_one_line(args: list[str]) -> None:
    """A missing or unknown format is the one-line error."""
    with pytest.raises(
        SystemExit, match=r"^tunnelkit: error: --log-format must be one of text, json"
    ):
        split_arguments(["--listen", "1", *args])


def test_version_is_tunnelkits(tmp_path: Path) -> None:
    """tunnelkit --version prints tunnelkit's version from its package metadata, then Twisted's."""
    done = run([executable("tunnelkit"), "--version"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[0] == f"tunnelkit {version('tunnelkit')}"
    assert lines[1].startswith("Twisted ")
    assert len(lines) == 2


def test_help_reads_as_the_commands_own(tmp_path: Path) -> None:
    """tunnelkit --help starts with its own usage lines, lists --log-format and mentions passwd."""
    done = run([executable("tunnelkit"), "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "Usage: tunnelkit [options]",
        "       tunnelkit passwd USER [FILE] [--cost N]",
    ]
    assert "plugin" not in done.stdout
    assert "--log-format=" in done.stdout
    assert "tunnelkit passwd USER FILE sets USER's password" in done.stdout


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_format_is_chosen(tmp_path: Path, serve: Serve, fmt: str) -> None:
    """tunnelkit --log-format text|json logs that way to a pipe (twist's default there is JSON) and relays."""
    backend = serve(echo)
    argv = ("--listen", "127.0.0.1:0", "--log-format", fmt, "--to", backend.address)
    with tunnelkit(*argv, cwd=tmp_path) as tk:
        [address] = tk.wait_listening()
        assert_echoes(address, 1024)
        assert tk.stop() == 0, tk.output
    has_json = any(e.get("event") == "listening" for e in json_events(tk.stdout))
    assert has_json == (fmt == "json"), tk.output
    assert ("[tunnelkit.service#info] listening on" in tk.stdout) == (fmt == "text"), tk.output
