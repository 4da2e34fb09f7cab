"""The test plays systemd: a notification socket to read ``sd_notify`` messages, and socket activation.

:class:`NotifySocket` is what systemd binds for ``Type=notify`` services: a
UNIX datagram socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace), with ``SO_PASSCRED`` so that each message carries the
sender's pid, as systemd checks for ``NotifyAccess=main``.

:func:`activated_argv` runs a command as systemd runs the service of a
``.socket`` unit: the listening sockets at descriptors 3, 4, ... and
``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` (the pid of the process
that execs the command, which keeps it) in its environment. Run as a script,
this module is that exec shim: ``python fake_systemd.py NAME=FD[,NAME=FD...] -- ARGV``.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


@attrs.frozen
class Notification:
    """One datagram: its ``KEY=value`` lines in order, and the pid the kernel says sent it."""

    fields: tuple[tuple[str, str], ...]
    pid: int

    def get(self, key: str) -> str | None:
        return dict(self.fields).get(key)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.fields)


class NotifySocket:
    """systemd's end of ``NOTIFY_SOCKET``; ``abstract``: an ``@`` name rather than a path."""

    def __init__(self, directory: Path, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"tunnelkit-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.received: list[Notification] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def receive(self, timeout: float) -> Notification | None:
        """The next datagram, or ``None`` after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = struct.unpack("3i", payload[:12])[0]
        lines = data.decode().split("\n")
        fields = tuple(tuple(line.split("=", 1)) for line in lines if line)
        note = Notification(fields, pid)  # type: ignore[arg-type]
        self.received.append(note)
        return note

    def wait_for(self, key: str, count: int = 1, timeout: float = 20.0) -> list[Notification]:
        """Everything received until ``count`` messages with ``key`` have come (bounded wait)."""
        deadline = time.monotonic() + timeout
        while sum(key in note.keys for note in self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.receive(remaining) is None:
                raise AssertionError(
                    f"{count} {key} message(s) not within {timeout:g} s: {self.received}"
                )
        return list(self.received)


class Recorder:
    """A :class:`tunnelkit.app.systemd.Notifier` stand-in that records the calls made to it, in memory."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def ready(self, status: str) -> None:
        self.calls.append("ready")

    def reloading(self, status: str) -> None:
        self.calls.append("reloading")

    def stopping(self, status: str, within: float) -> None:
        self.calls.append(f"stopping {within:g}")


def activated_argv(argv: Sequence[str], sockets: Sequence[tuple[str, socket.socket]]) -> list[str]:
    """``argv`` run through this module's shim, with ``sockets`` (name, socket) passed as systemd does.

    Give the same sockets to the process's ``pass_fds``; :func:`activated_fds` lists them.
    """
    passed = ",".join(f"{name}={sock.fileno()}" for name, sock in sockets)
    return [sys.executable, __file__, passed, "--", *argv]


def activated_fds(sockets: Sequence[tuple[str, socket.socket]]) -> tuple[int, ...]:
    return tuple(sock.fileno() for _, sock in sockets)


def _exec_activated(passed: str, argv: list[str]) -> None:
    """Move the passed descriptors to 3, 4, ..., say so in the environment, exec ``argv`` (same pid)."""
    named = [item.split("=") for item in passed.split(",")]
    # Duplicated above 3, 4, ... first: a passed descriptor may sit there already.
    above = LISTEN_FDS_START + len(named)
    moved = [(name, fcntl.fcntl(int(fd), fcntl.F_DUPFD, above)) for name, fd in named]
    for index, (_, fd) in enumerate(moved):
        os.dup2(fd, LISTEN_FDS_START + index)  # inheritable, as dup2 makes it
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(moved))
    os.environ["LISTEN_FDNAMES"] = ":".join(name for name, _ in moved)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(argv[0], argv)


if __name__ == "__main__":
    assert sys.argv[2] == "--", sys.argv
    _exec_activated(sys.argv[1], sys.argv[3:])
