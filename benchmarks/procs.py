"""Processes the benchmark starts, and what /proc says about them.

Every process is started in its own session, so that stopping it by its id
(``killpg`` on the process group it leads) also ends the children it forked
(socat forks one per connection), and is remembered in :data:`STARTED` so the
runner can stop whatever is still alive when it exits, however it exits. Every
wait is bounded: a benchmark that hangs is worse than one that fails.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Clock ticks per second of the utime/stime fields of /proc/PID/stat.
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Longest wait for a process to listen, and for one to exit after SIGTERM.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

#: Bounds on walking a process tree (socat with 1,000 idle connections has
#: 1,001 processes).
MAX_TREE = 5000


class BenchError(Exception):
    """A step could not be carried out; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out for ``host`` (bound to port 0, then released).

    For peers that cannot report the port they bound themselves (socat,
    haproxy, nginx, iperf3); the tiny race with another process taking the
    same port is covered by :meth:`Proc.wait_port` failing loudly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; children inherit it.

    1,000 idle connections need 1,000 descriptors in the client and the echo
    backend and 2,000 in a single-process proxy; the default soft limit is
    often 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 16)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Proc:
    """One started command, its output going to a log file in the run's temp dir."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        app_log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        #: A log file the program writes itself (twistd's --logfile), read before ``log``.
        self.app_log = app_log
        # Never read an earlier run's lines (such as the port it listened on).
        if app_log is not None:
            app_log.unlink(missing_ok=True)
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
            start_new_session=True,
        )
        STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, limit: int = 4000) -> str:
        """The tail of what the process wrote (its own log file, then stdout/stderr)."""
        text = ""
        for path in (self.app_log, self.log):
            if path is None:
                continue
            try:
                text += path.read_text(errors="replace")
            except OSError:
                continue
        return text[-limit:]

    def wait_for(self, found: Callable[[], object], what: str, timeout: float) -> object:
        """Poll ``found()`` until it is truthy; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            result = found()
            if result:
                return result
            if not self.alive():
                raise BenchError(
                    f"{self.name}: exited with {self.popen.returncode} before {what}\n"
                    f"{' '.join(self.argv)}\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {what} within {timeout:g} s\n{self.output()}")
            time.sleep(0.02)

    def wait_port(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until something accepts TCP connections on 127.0.0.1:``port``."""

        def accepting() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        self.wait_for(accepting, f"listener on port {port}", timeout)

    def stop(self) -> int | None:
        """SIGTERM the process group, then SIGKILL it if it outlives the bound."""
        if self in STARTED:
            STARTED.remove(self)
        try:
            if self.alive():
                _signal_group(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _signal_group(self.pid, signal.SIGKILL)
                    self.popen.wait(STOP_TIMEOUT)
            # Forked children (socat) may outlive their parent: end the group.
            _signal_group(self.pid, signal.SIGKILL)
            return self.popen.returncode
        finally:
            self._log_file.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


#: Every process started and not yet stopped, newest last.
STARTED: list[Proc] = []


def stop_all() -> None:
    """Stop every process still running, newest first (proxies before backends)."""
    for proc in reversed(list(STARTED)):
        try:
            proc.stop()
        except Exception as e:  # keep stopping the others
            print(f"warning: stopping {proc.name} ({proc.pid}): {e}")


# -- /proc ---------------------------------------------------------------


def tree(root: int) -> list[int]:
    """``root`` and its live descendants, from /proc/PID/task/TID/children."""
    pids = [root]
    i = 0
    while i < len(pids) and len(pids) < MAX_TREE:
        pid = pids[i]
        i += 1
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return pids


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(root: int) -> float:
    """User + system CPU of ``root`` and its descendants, including reaped children.

    Each live process contributes its own time plus that of the children it
    has already reaped (cutime/cstime), so a socat child that served a
    connection and exited is still counted, in its parent.
    """
    ticks = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # fields[0] is field 3 (state): utime..cstime are fields 14..17.
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def kernel_threads_cpu() -> float:
    """CPU of all kernel threads (children of kthreadd, pid 2), user + system seconds.

    At high packet rates the kernel finishes loopback softirq work in
    ksoftirqd threads, which belong to no benchmark process; counting them as
    the benchmark's keeps that work out of the foreign-load estimate.
    """
    return sum(cpu_seconds_own(pid) for pid in tree(2)[1:])


def cpu_seconds_own(pid: int) -> float:
    """User + system CPU of one process or thread, without its children."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_count(root: int) -> int:
    """How many descendants ``root`` has right now."""
    return len(tree(root)) - 1


def settle_children(root: int, timeout: float = 5.0, at_most: int = 0) -> int:
    """Wait (bounded) until ``root`` has at most ``at_most`` descendants; return the count.

    socat's children exit when their connection closes and are reaped a little
    later; CPU and memory are read once they are gone so nothing is counted
    twice or missed.
    """
    deadline = time.monotonic() + timeout
    count = children_count(root)
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.02)
        count = children_count(root)
    return count


@dataclass(frozen=True)
class Memory:
    """Resident memory of a process tree, in KiB."""

    rss_kb: int
    pss_kb: int
    processes: int


def memory(root: int) -> Memory:
    """Summed VmRSS and Pss of ``root``'s tree.

    RSS counts shared pages once per process, which makes fork-per-connection
    designs look enormous; PSS splits shared pages between the sharers and is
    the fair figure for them.
    """
    rss = pss = n = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
        except OSError:
            continue
    return Memory(rss, pss, n)


@dataclass(frozen=True)
class MachineTimes:
    """Whole-machine CPU times from the first line of /proc/stat, in ticks."""

    busy: int
    steal: int
    total: int

    @staticmethod
    def read() -> MachineTimes:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
        total = user + nice + system + idle + iowait + irq + softirq + steal
        busy = user + nice + system + irq + softirq
        return MachineTimes(busy, steal, total)


def machine_shares(before: MachineTimes, after: MachineTimes) -> tuple[float, float]:
    """(busy %, steal %) of all CPUs between two readings (100 % = every core busy)."""
    total = max(1, after.total - before.total)
    return (
        100.0 * (after.busy - before.busy) / total,
        100.0 * (after.steal - before.steal) / total,
    )


def children_cpu() -> float:
    """User + system CPU of this runner's reaped children (the load clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    """User + system CPU of this runner (it holds the idle connections itself)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_bounded(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a client to completion with a hard time bound (killed past it)."""
    try:
        return subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]}: still running after {timeout:g} s; killed") from e


def wait_quiet(max_wait: float, threshold: float = 10.0, sample: float = 0.5) -> float:
    """Wait (at most ``max_wait`` s) until the machine is nearly idle; return the last busy %.

    Called with the proxy started but unloaded, so whatever keeps the machine
    busy belongs to someone else (a test suite in another session, say); a
    measurement started then would measure the neighbour as much as the proxy.
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = MachineTimes.read()
        time.sleep(sample)
        busy, _ = machine_shares(before, MachineTimes.read())
        if busy <= threshold or time.monotonic() >= deadline:
            return busy
