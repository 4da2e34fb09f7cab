"""Run ``twistd``, ``twist`` and the ``tunnelkit`` script as real processes, for end-to-end tests.

Every wait here is bounded, output is collected line by line while the process
runs (so a test can wait for a log line), and :class:`Process` kills what it
started when its ``with`` block ends, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from planes import Plane

#: The scripts of the interpreter running the tests (a venv's ``bin``).
BIN = Path(sys.executable).parent

#: Longest wait for a process to start listening or to exit.
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 20.0

#: A SIGTERM that drained cleanly exits 0 (twistd alone would re-raise the
#: signal and show "killed by SIGTERM").
CLEAN_SIGTERM_EXIT = 0

T = TypeVar("T")

_LISTENING = re.compile(r"\[tunnelkit\.service#info\] listening on (\S+) \(")
#: The text of a ``tunnel_closed`` event (tunnelkit.logs.tunnel_log.tunnel_text).
_TUNNEL_TEXT = (
    r"(?P<client>\S*) -> (?P<backend>\S+) \((?P<backend_address>\S+)\)"
    r" (?P<close_kind>\S+) by (?P<closed_by>\S+) after (?P<duration>[\d.]+)s:"
    r" up (?P<bytes_up>\d+) B, down (?P<bytes_down>\d+) B; (?P<reason>.*)$"
)
#: A worker's events show its number after the level (tunnelkit.app.supervisor.tag_worker).
_TUNNEL_CLOSED = re.compile(r"\[tunnelkit\.tunnel#info(?: worker \d+)?\] " + _TUNNEL_TEXT)
#: A text line of ``--access-log``: twistd's timestamp, then the event's text.
_ACCESS_LINE = re.compile(r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) " + _TUNNEL_TEXT)


def executable(name: str) -> str:
    """The script ``name`` next to ``sys.executable`` (twistd, twist, tunnelkit)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return str(path)


def child_env() -> dict[str, str]:
    """The environment for a child: ours, unbuffered, with no stray Python path."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just gave out for ``host`` (bound to port 0, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def json_events(text: str) -> list[dict[str, Any]]:
    """Every JSON object logged (the JSON observer starts each record with \\x1e, a line break)."""
    events: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def mapped_cryptography(pid: int) -> int:
    """How many of the process's memory mappings are cryptography's (OpenSSL's) libraries."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum("cryptography" in line for line in maps)


def listening_addresses(text: str) -> list[str]:
    """Addresses of the ``listening`` events in a text or JSON (``twist``) log."""
    found = [m[1] for m in _LISTENING.finditer(text)]
    found += [e["address"] for e in json_events(text) if e.get("event") == "listening"]
    return found


def _text_fields(match: re.Match[str]) -> dict[str, Any]:
    event: dict[str, Any] = match.groupdict()
    event["bytes_up"] = int(event["bytes_up"])
    event["bytes_down"] = int(event["bytes_down"])
    return event


def tunnel_closed_events(text: str) -> list[dict[str, Any]]:
    """The ``tunnel_closed`` events of a text or JSON log, with the fields of docs/logging.md."""
    events = [_text_fields(m) for line in text.splitlines() if (m := _TUNNEL_CLOSED.search(line))]
    events += [e for e in json_events(text) if e.get("event") == "tunnel_closed"]
    return events


def access_log_records(text: str) -> list[dict[str, Any]]:
    """The records of an ``--access-log`` file (text or JSON lines); any other line fails the test."""
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        if m := _ACCESS_LINE.match(line):
            records.append(_text_fields(m))
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        assert isinstance(event, dict) and event.get("event") == "tunnel_closed", repr(line)
        records.append(event)
    return records


class Process:
    """A command running in the background, its stdout and stderr collected as it goes.

    A ``twistd`` started on a ``plane`` is checked to relay on it once it listens.
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        plane: Plane | None = None,
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.plane = plane
        self._changed = threading.Condition()
        self._out: list[str] = []
        self._err: list[str] = []
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env={**child_env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _collect(self, pipe: IO[bytes], into: list[str]) -> None:
        for line in iter(pipe.readline, b""):
            with self._changed:
                into.append(line.decode("utf-8", "replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._err)

    @property
    def output(self) -> str:
        """Everything written so far, stdout then stderr, for assertion messages."""
        return f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"

    def _ended(self) -> bool:
        return self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)

    def wait_for(
        self, found: Callable[[str], T | None], what: str, timeout: float = START_TIMEOUT
    ) -> T:
        """Wait until ``found(stdout + stderr)`` is truthy and return it; fail on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = found("".join(self._out) + "".join(self._err))
                if result:
                    return result
                if self._ended():
                    raise AssertionError(
                        f"{what}: {self.argv} exited with {self.proc.returncode}\n{self.output}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{what}: not within {timeout:g} s\n{self.output}")
                self._changed.wait(min(remaining, 0.1))

    def wait_listening(self, count: int = 1, timeout: float = START_TIMEOUT) -> list[str]:
        """The bound addresses, once ``count`` listeners have logged ``listening`` (on :attr:`plane`)."""

        def enough(text: str) -> list[str] | None:
            found = listening_addresses(text)
            return found if len(found) >= count else None

        addresses = self.wait_for(enough, f"{count} listening event(s)", timeout)
        if self.plane is not None:
            self.plane.check_log(self.stdout + self.stderr)
        return addresses

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit status (``-N`` for signal N) once the process and its output have ended."""
        returncode = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        """Send ``sig`` and return the exit status."""
        self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process if it still runs; close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(EXIT_TIMEOUT)
        finally:
            for reader in self._readers:
                reader.join(5)
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def start(
    argv: Sequence[str],
    cwd: Path,
    plane: Plane | None = None,
    *,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Process:
    """Start ``argv`` in ``cwd`` (which also holds ``twistd.pid`` for ``twistd -n``).

    ``plane``: the one ``argv`` selects (see :func:`twistd_argv`), checked once it listens;
    ``env``: variables added to :func:`child_env`'s; ``pass_fds``: descriptors it inherits.
    """
    return Process(argv, cwd, plane, env=env, pass_fds=pass_fds)


def twistd_argv(
    *args: str, twistd_options: Sequence[str] = (), plane: Plane | None = None
) -> list[str]:
    """``twistd -n TWISTD_OPTIONS tunnelkit [PLANE OPTIONS] ARGS``: twistd's own options go before the plugin name."""
    selected = plane.args if plane is not None else ()
    return [executable("twistd"), "-n", *twistd_options, "tunnelkit", *selected, *args]


def twistd(
    *args: str, cwd: Path, twistd_options: Sequence[str] = (), plane: Plane | None = None
) -> Process:
    """``twistd -n TWISTD_OPTIONS tunnelkit ARGS`` in the foreground, logging to stdout.

    ``twistd_options`` are twistd's own, such as ``("--logger", "tunnelkit.json_log.observer")``;
    ``plane`` (tests/planes.py) is the relay plane it must run on.
    """
    return start(twistd_argv(*args, twistd_options=twistd_options, plane=plane), cwd, plane)


def twist(*args: str, cwd: Path) -> Process:
    """``twist tunnelkit ARGS`` (logs JSON lines to stdout when that is not a tty)."""
    return start([executable("twist"), "tunnelkit", *args], cwd)


def tunnelkit(*args: str, cwd: Path) -> Process:
    """The ``tunnelkit ARGS`` console script."""
    return start([executable("tunnelkit"), *args], cwd)


def run(
    argv: Sequence[str], cwd: Path, timeout: float = EXIT_TIMEOUT, pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion; stdout and stderr interleaved in ``.stdout``."""
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        pass_fds=pass_fds,
    )


def assert_clean_stop(process: Process, returncode: int) -> None:
    """The process stopped on SIGTERM after a complete shutdown, without a traceback."""
    assert returncode == CLEAN_SIGTERM_EXIT, process.output
    assert "Traceback" not in process.output, process.output
    assert "Main loop terminated." in process.output, process.output


def need(program: str) -> str:
    """The path of ``program``; the test is skipped when it is not installed."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed")
    return path


# -- a proxy (CONNECT, SOCKS5) as a process ------------------------------------

#: Targets a proxy under test may reach: loopback, IPv4 and IPv6 (``localhost``
#: may resolve to both, and every address of a name must be allowed).
LOOPBACK_TARGETS = ("--allow-dest", "127.0.0.0/8", "--allow-dest", "[::1]")


def auth_file(cwd: Path, user: str, password: str) -> str:
    """An htpasswd file in ``cwd`` of one bcrypt entry (cheap rounds: tests only), for ``--auth-file``."""
    from tunnelkit.policy.htpasswd import make_entry

    users = cwd / "users.htpasswd"
    users.write_text(make_entry(user, password, rounds=4) + "\n")
    return str(users)


class Proxy:
    """A running ``twistd -n tunnelkit`` proxy and the address it listens on."""

    def __init__(self, process: Process, address: str) -> None:
        self.process = process
        self.address = address
        self.host, _, port = address.rpartition(":")
        self.port = int(port)

    def closed(self, what: str, **fields: Any) -> dict[str, Any]:
        """The first ``tunnel_closed`` event with these field values (waits for it)."""

        def found(text: str) -> dict[str, Any] | None:
            for event in tunnel_closed_events(text):
                if all(event.get(name) == value for name, value in fields.items()):
                    return event
            return None

        return self.process.wait_for(found, f"tunnel_closed of {what}", 10)


def start_proxy(cwd: Path, *args: str) -> Proxy:
    """``twistd -n`` (JSON log lines on stdout) ``tunnelkit --listen 127.0.0.1:0 ARGS`` in ``cwd``."""
    json_log = ("--logger", "tunnelkit.json_log.observer")
    process = twistd("--listen", "127.0.0.1:0", *args, cwd=cwd, twistd_options=json_log)
    try:
        [address] = process.wait_listening()
    except BaseException:
        process.kill()
        raise
    return Proxy(process, address)


@contextlib.contextmanager
def running_proxy(cwd: Path, *args: str) -> Iterator[Proxy]:
    """A proxy (``ARGS`` give its mode) for the ``with`` block; then SIGTERM, and it must exit cleanly."""
    proxy = start_proxy(cwd, "--drain-timeout", "2", *args)
    with proxy.process:
        yield proxy
        assert_clean_stop(proxy.process, proxy.process.stop())


# -- /proc of a running process ---------------------------------------------


def proc_status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``-style field of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False if not allowed here."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


#: Under the sanitizers (scripts/sanitize) freed memory waits in ASan's
#: quarantine, so RSS says nothing of the proxy's buffers there: memory bounds
#: are asserted in normal runs only (every other check of those tests stays).
MEMORY_CHECKED = not os.environ.get("TUNNELKIT_SANITIZED")


def assert_rss_growth_below(
    limit_mib: float, baseline: int, stalled: int, peak: int, stalled_at: int
) -> None:
    """RSS (KiB) grew less than ``limit_mib`` from ``baseline`` to the larger of ``stalled`` and ``peak``.

    ``stalled_at`` (how far the backend had sent when the reader stalled) is for the message.
    """
    growth_mib = (max(peak, stalled) - baseline) / 1024
    assert not MEMORY_CHECKED or growth_mib < limit_mib, (
        f"RSS grew {growth_mib:.1f} MiB (baseline {baseline} KiB, stalled {stalled} KiB, "
        f"peak {peak} KiB, backend stalled at {stalled_at} B)"
    )


# -- daemons: not our children once twistd has forked, so tracked by pid file --


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie left for a non-reaping init counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_until(condition: Callable[[], T], what: str, timeout: float = START_TIMEOUT) -> T:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def read_text(path: Path) -> str:
    """The file's text, or ``""`` while it does not exist yet."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def kill_pid(pid: int) -> None:
    """SIGKILL a daemon we started, if it still runs, and wait (bounded) for it to go."""
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_until(lambda: not pid_alive(pid), f"pid {pid} to die", EXIT_TIMEOUT)
