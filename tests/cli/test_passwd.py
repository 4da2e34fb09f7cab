"""``tunnelkit passwd``: entries that --auth-file accepts, passwords never in argv."""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import child_env, executable

from tunnelkit.policy.htpasswd import Htpasswd


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


def test_file_update_says_what_it_did(tmp_path: Path) -> None:
    """Setting a user in FILE prints one line saying whether it was added or updated."""
    users = tmp_path / "users.htpasswd"
    added = passwd(tmp_path, "alice", str(users), password="first")
    updated = passwd(tmp_path, "alice", str(users), password="second")
    assert added.stdout == f"tunnelkit passwd: added alice in {users}\n"
    assert updated.stdout == f"tunnelkit passwd: updated alice in {users}\n"


#: Runs its arguments with its stdin (a pty) as controlling terminal, as under a login shell.
ON_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0);"
    " os.execv(sys.argv[1], sys.argv[1:])"
)


def _read_until(master: int, wanted: bytes, seen: bytearray, timeout: float = 20) -> bool:
    """Read the terminal into ``seen`` until ``wanted`` is in it (True) or it closes (False)."""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{wanted!r} not within {timeout:g} s: {bytes(seen)!r}"
        ready, _, _ = select.select([master], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every copy of the terminal's other side is closed
            return False
        if not chunk:
            return False
        seen += chunk
    return True


def on_terminal(cwd: Path, key: bytes) -> tuple[int, str]:
    """Run ``tunnelkit passwd alice FILE`` on a pseudo-terminal, press ``key`` at the prompt."""
    argv = [executable("tunnelkit"), "passwd", "alice", str(cwd / "users"), "--cost", "4"]
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", ON_TERMINAL, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=child_env(),
            start_new_session=True,
        )
    finally:
        os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"New password: ", seen)
        os.write(master, key)
        _read_until(master, b"\0never\0", seen)
        return process.wait(30), seen.decode("utf-8", "replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        os.close(master)


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        (b"\x04", 1, "tunnelkit passwd: error: no password given (end of input)"),
        (b"\x03", 130, "tunnelkit passwd: interrupted; nothing was changed"),
    ],
    ids=["ctrl-d", "ctrl-c"],
)
def test_ctrl_d_or_ctrl_c_at_the_prompt(
    tmp_path: Path, key: bytes, status: int, message: str
) -> None:
    """Ctrl-D or Ctrl-C at the password prompt ends with one message line, no traceback, and no file."""
    returncode, output = on_terminal(tmp_path, key)
    assert returncode == status, output
    assert "Traceback" not in output
    lines = [line for line in output.replace("\r", "").splitlines() if line.strip()]
    assert lines[-1] == message, output
    assert lines[:-1] == ["New password: "] or lines[:-1] == ["New password: ^C"], output
    assert not (tmp_path / "users").exists()
