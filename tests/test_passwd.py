"""``tunnelkit passwd``: entries that --auth-file accepts, passwords never in argv."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from processes import child_env, executable

from tunnelkit.htpasswd import Htpasswd


def passwd(cwd: Path, *args: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [executable("tunnelkit"), "passwd", *args, "--cost", "4"],
        input=password + "\n",
        capture_output=True,
        text=True,
        cwd=cwd,
        env=child_env(),
        timeout=30,
        check=False,
    )


def test_sets_and_replaces_users_in_file(tmp_path: Path) -> None:
    """Entries are added, a user's entry is replaced, and the new file is private (0600)."""
    users = tmp_path / "users.htpasswd"
    assert passwd(tmp_path, "alice", str(users), password="first").returncode == 0
    assert passwd(tmp_path, "bob", str(users), password="bobs").returncode == 0
    assert passwd(tmp_path, "alice", str(users), password="second").returncode == 0
    loaded = Htpasswd.load(users)
    assert loaded.users == {"alice", "bob"}
    assert loaded.check("alice", "second")
    assert not loaded.check("alice", "first")
    assert loaded.check("bob", "bobs")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


def test_prints_entry_without_file(tmp_path: Path) -> None:
    """With no FILE the entry is printed: one bcrypt line for the user, not the password."""
    done = passwd(tmp_path, "carol", password="hunter2")
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith("carol:$2y$04$")
    assert "hunter2" not in done.stdout + done.stderr


def test_bad_user_is_one_line_error(tmp_path: Path) -> None:
    """A user name the file cannot hold exits 1 with one error line."""
    done = passwd(tmp_path, "a:b", password="x")
    assert done.returncode == 1
    assert done.stderr.startswith("tunnelkit passwd: error:")
    assert len(done.stderr.splitlines()) == 1
