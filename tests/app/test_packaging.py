"""The wheel and the editable install: twistd finds the plugin, and uninstalling leaves Twisted intact.

These build the wheel with pip (build isolation fetches hatchling) and install
it into one fresh virtualenv, so they need the package index; each command is
bounded in time. They run ``twistd --help`` from an empty directory, so the
checkout itself is never on the path by accident.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import run

REPO = Path(__file__).resolve().parents[2]

#: Longest a pip command may take (it may download Twisted and its dependencies).
PIP_TIMEOUT = 300.0

_LISTED = re.compile(r"^\s+tunnelkit\s+Port forwarder", re.MULTILINE)


def pip(venv: Path, *args: str) -> None:
    """Run this interpreter's pip on the environment of ``venv``'s python."""
    python = str(venv / "bin" / "python")
    argv = [sys.executable, "-m", "pip", "--python", python, *args]
    result = run(argv, cwd=venv, timeout=PIP_TIMEOUT)
    assert result.returncode == 0, result.stdout


def twistd_help(venv: Path, cwd: Path, *args: str) -> str:
    """``twistd [ARGS] --help`` of ``venv`` run in ``cwd``; it must succeed without a traceback."""
    result = run([str(venv / "bin" / "twistd"), *args, "--help"], cwd=cwd)
    assert result.returncode == 0, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    return result.stdout


def site_packages(venv: Path) -> Path:
    [path] = venv.glob("lib/python3*/site-packages")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tunnelkit wheel built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(out)]
    result = run(argv, cwd=out, timeout=PIP_TIMEOUT)
    assert result.returncode == 0, result.stdout
    [built] = out.glob("tunnelkit-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One fresh virtualenv (without pip: the test interpreter's pip installs into it)."""
    path = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60
    )
    yield path


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    """A working directory with nothing importable in it."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


def test_wheel_ships_only_the_plugin_file_under_twisted(wheel: Path) -> None:
    """The wheel's only file under twisted/ is the plugin module: no __init__.py, no dropin.cache."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert [n for n in names if n.startswith("twisted/")] == ["twisted/plugins/tunnelkit_plugin.py"]
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert {"tunnelkit/__init__.py", "tunnelkit/cli/plugin.py", "tunnelkit/cli/command.py"} <= set(
        names
    )
    # Read at run time: the status page of --admin is a file of its own.
    assert "tunnelkit/admin/status.html" in names
    assert re.search(r"^tunnelkit = tunnelkit\.cli\.command:main$", scripts, re.MULTILINE), scripts


def test_wheel_carries_the_native_engine(wheel: Path) -> None:
    """The wheel holds the compiled engine and is tagged for this platform, not py3-none-any."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert [n for n in names if re.fullmatch(r"tunnelkit/engine/_engine\..*\.so", n)], names
    assert not wheel.name.endswith("-none-any.whl"), wheel.name


def test_wheel_without_a_compiler_is_pure_python(tmp_path: Path) -> None:
    """With no working compiler ($CC=false) the wheel still builds, says why, and is pure Python."""
    argv = ["env", "CC=false", sys.executable, "-m", "pip", "wheel", "-v", "--no-deps"]
    result = run([*argv, str(REPO), "-w", str(tmp_path)], cwd=tmp_path, timeout=PIP_TIMEOUT)
    assert result.returncode == 0, result.stdout
    assert "the native engine was not built" in result.stdout, result.stdout
    [built] = tmp_path.glob("tunnelkit-*.whl")
    assert built.name.endswith("-py3-none-any.whl"), built.name
    with zipfile.ZipFile(built) as archive:
        assert not [n for n in archive.namelist() if "_engine" in n and n.endswith(".so")]


def test_wheel_install_registers_plugin_and_uninstall_keeps_twisted(
    wheel: Path, venv: Path, empty_dir: Path
) -> None:
    """Installing the wheel makes twistd list tunnelkit; uninstalling removes it and leaves Twisted's plugins package working."""
    pip(venv, "install", "-q", str(wheel))
    plugins = site_packages(venv) / "twisted" / "plugins"
    try:
        assert (plugins / "tunnelkit_plugin.py").is_file()
        assert _LISTED.search(twistd_help(venv, empty_dir))
        assert "--listen" in twistd_help(venv, empty_dir, "tunnelkit")
        engine = run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "from tunnelkit.engine import driver; print(driver.built())",
            ],
            cwd=empty_dir,
        )
        assert engine.stdout.strip() == "True", engine.stdout
    finally:
        pip(venv, "uninstall", "-q", "-y", "tunnelkit")
    assert not (plugins / "tunnelkit_plugin.py").exists()
    assert (plugins / "__init__.py").is_file()
    listing = twistd_help(venv, empty_dir)
    assert "portforward" in listing
    assert not _LISTED.search(listing)


def test_editable_install_registers_plugin(venv: Path, empty_dir: Path) -> None:
    """pip install -e of the checkout makes twistd list tunnelkit, loaded from the checkout."""
    pip(venv, "install", "-q", "-e", str(REPO))
    try:
        assert _LISTED.search(twistd_help(venv, empty_dir))
        assert "--listen" in twistd_help(venv, empty_dir, "tunnelkit")
        where = run(
            [str(venv / "bin" / "python"), "-c", "import tunnelkit; print(tunnelkit.__file__)"],
            cwd=empty_dir,
        )
        assert Path(where.stdout.strip()) == REPO / "tunnelkit" / "__init__.py"
        assert not (site_packages(venv) / "twisted" / "plugins" / "tunnelkit_plugin.py").exists()
    finally:
        pip(venv, "uninstall", "-q", "-y", "tunnelkit")
