"""docs/deploy.md's unit files work as written: their command lines pass ``--check``, systemd accepts them.

Each fenced block of the page that starts with ``# /path`` is that file:
the units' ``ExecStart``/``ExecStartPre`` lines are run with the paths of
this installation (``/opt/tunnelkit/bin/`` is the test's virtualenv) and the
TOML files shown; the socket-activated service is started for real, through
tests/fake_systemd.py, with a socket made as its ``.socket`` unit says.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from fake_systemd import activated_argv, activated_fds
from processes import BIN, child_env, run, start

DEPLOY = Path(__file__).parents[2] / "docs" / "deploy.md"
INSTALLED = "/opt/tunnelkit/bin/"
_BLOCK = re.compile(r"^```(\w+)\n# (/\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def documented_files() -> dict[str, str]:
    """Path -> text of every file the page shows (a block whose first line is ``# /path``)."""
    return {path: text for _, path, text in _BLOCK.findall(DEPLOY.read_text())}


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def here(argv: list[str], configs: dict[str, Path]) -> list[str]:
    """A documented command line with this installation's paths."""
    return [
        str(configs[arg]) if arg in configs else arg.replace(INSTALLED, f"{BIN}/") for arg in argv
    ]


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Path]:
    """The page's TOML files, written under ``tmp_path``, by their documented paths."""
    written = {}
    for path, text in documented_files().items():
        if path.endswith(".toml"):
            written[path] = tmp_path / Path(path).name
            written[path].write_text(text)
    return written


def services() -> list[str]:
    return [path for path in documented_files() if path.endswith(".service")]


def test_the_page_shows_the_units_and_their_files() -> None:
    """The service, the socket and the socket-activated service, and their configuration files."""
    assert sorted(Path(p).name for p in documented_files()) == [
        "activated.toml",
        "tunnelkit-activated.service",
        "tunnelkit.service",
        "tunnelkit.socket",
        "tunnelkit.toml",
    ]


@pytest.mark.parametrize("key", ["ExecStartPre", "ExecStart"])
def test_the_service_command_lines_pass_check(
    tmp_path: Path, configs: dict[str, Path], key: str
) -> None:
    """tunnelkit.service's ExecStartPre and ExecStart lines, with ``--check``: configuration OK."""
    unit = documented_files()["/etc/systemd/system/tunnelkit.service"]
    [line] = unit_values(unit, key)
    argv = here(shlex.split(line), configs)
    if "--check" not in argv:
        argv.append("--check")
    done = run(argv, tmp_path)
    assert done.returncode == 0, done.stdout
    assert "configuration OK" in done.stdout


def passed_socket(unit: str) -> tuple[str, socket.socket]:
    """The socket a ``.socket`` unit's ``ListenStream=`` makes (a bare port: IPv6, taking IPv4 too), on loopback."""
    [listen] = unit_values(unit, "ListenStream")
    [name] = unit_values(unit, "FileDescriptorName")
    family, host = (socket.AF_INET6, "::1") if listen.isdigit() else (socket.AF_INET, "127.0.0.1")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
    except OSError as e:
        sock.close()
        pytest.skip(f"cannot bind {host}: {e}")
    sock.listen(16)
    return name, sock


def test_the_socket_activated_service_listens_on_the_socket(
    tmp_path: Path, configs: dict[str, Path]
) -> None:
    """The service tunnelkit.socket starts, given its socket: it listens there, workers and all, and stops cleanly."""
    files = documented_files()
    socket_unit = files["/etc/systemd/system/tunnelkit.socket"]
    # The service a socket starts: its Service=, else the one named like it.
    [activated] = unit_values(socket_unit, "Service") or ["tunnelkit.service"]
    unit = files[f"/etc/systemd/system/{activated}"]
    [line] = unit_values(unit, "ExecStart")
    name, sock = passed_socket(socket_unit)
    with sock:
        sockets = [(name, sock)]
        argv = activated_argv(here(shlex.split(line), configs), sockets)
        with start(argv, tmp_path, pass_fds=activated_fds(sockets)) as tk:
            host, port = sock.getsockname()[:2]
            assert tk.wait_listening() == [f"[{host}]:{port}"]
            tk.wait_for(lambda text: text.count("worker ready") >= 2 or None, "two workers")
            assert tk.stop() == 0, tk.output
    assert "ended" not in tk.output, tk.output


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    """``systemd-analyze verify``: every unit loads, with no unknown key or bad value."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = []
    for path, text in documented_files().items():
        if path.startswith("/etc/systemd/"):
            unit = tmp_path / Path(path).name
            unit.write_text(text.replace(INSTALLED, f"{BIN}/"))
            units.append(str(unit))
    env = {**child_env(), "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    done = subprocess.run(
        [analyze, "verify", "--man=no", *units],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
