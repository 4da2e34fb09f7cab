"""Telling systemd (or any service manager that speaks its protocol) what the process is doing.

``sd_notify(3)`` without libsystemd: when ``NOTIFY_SOCKET`` names a UNIX
datagram socket (a path, or ``@name`` in the abstract namespace), the process
systemd watches (``twistd -n``; with ``--workers``, the supervisor) sends it

* ``READY=1`` once it serves: listening and running (the supervisor: once
  every worker is up), so a ``Type=notify`` unit is "active" only then and
  units ordered after it start against a working proxy;
* ``RELOADING=1`` with ``MONOTONIC_USEC`` on SIGHUP, and ``READY=1`` when the
  reload is done (every worker's, with ``--workers``), which is what
  ``Type=notify-reload`` waits for and what makes ``systemctl reload`` wait;
* ``STOPPING=1`` when the drain starts, with ``EXTEND_TIMEOUT_USEC`` covering
  ``--drain-timeout``, so that systemd does not kill a drain the operator
  asked for;
* a ``STATUS=`` line with each (``systemctl status`` shows it);
* ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` when ``WatchdogSec=`` is
  set, from the reactor, so a wedged event loop gets the unit restarted.

Messages go out without blocking (``MSG_DONTWAIT``); one that cannot be sent
is logged and dropped: the service manager's bookkeeping never stops the
proxy. Worker processes get none of these variables (:data:`MANAGER_VARIABLES`):
systemd accepts messages from its main process only (``NotifyAccess=main``).

Socket activation (``--listen systemd:domain=INET:index=0`` or ``name=``)
is Twisted's endpoint; :func:`endpoint_problem` says what was wrong when no
such socket was passed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="tunnelkit.systemd")

#: The service manager's variables, for the process it started only (never a worker).
MANAGER_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def notify_address(value: str) -> str | None:
    """The socket address ``NOTIFY_SOCKET`` names: a path, or ``@name`` (abstract, a NUL first)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), if the watchdog is ours."""
    pid = environ.get("WATCHDOG_PID")
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends ``sd_notify`` messages to one address (see the module docstring)."""

    def __init__(self, address: str, watchdog: float | None = None) -> None:
        self.address = address
        #: Seconds between watchdog pings; ``None``: no ``WatchdogSec=``.
        self.watchdog = watchdog
        self._pings: LoopingCall | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier ``NOTIFY_SOCKET`` asks for, or ``None`` (not run by a service manager)."""
        value = environ.get("NOTIFY_SOCKET")
        if not value:
            return None
        address = notify_address(value)
        if address is None:
            log.warn(
                "NOTIFY_SOCKET={value!r} is neither a path nor an @name: not notifying",
                event="sd_notify_unsupported",
                value=value,
            )
            return None
        return cls(address, watchdog_interval(environ))

    def send(self, **fields: object) -> bool:
        """One message of ``KEY=value`` lines (keyword order); False if it could not be sent."""
        message = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as e:
            log.warn(
                "sd_notify {fields}: {error}",
                event="sd_notify_failed",
                fields=sorted(fields),
                error=e.strerror or str(e),
            )
            return False
        return True

    def ready(self, status: str) -> None:
        """Serving: after start-up, and after each reload."""
        self.send(READY=1, STATUS=status)

    def reloading(self, status: str) -> None:
        """A reload starts; :meth:`ready` says when it is done."""
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self, status: str, within: float) -> None:
        """The drain starts and ends within ``within`` seconds: systemd waits that long at least."""
        self.send(STOPPING=1, STATUS=status, EXTEND_TIMEOUT_USEC=int(within * 1e6))

    def start_watchdog(self, reactor: Any) -> None:
        """Ping every :attr:`watchdog` seconds from ``reactor`` (nothing without ``WatchdogSec=``)."""
        if self.watchdog is None or self._pings is not None:
            return
        self._pings = LoopingCall(self.send, WATCHDOG=1)
        self._pings.clock = reactor
        self._pings.start(self.watchdog)


def manager_free(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without :data:`MANAGER_VARIABLES`: the environment of a worker process."""
    return {name: value for name, value in environ.items() if name not in MANAGER_VARIABLES}


def endpoint_problem(description: str, error: Exception) -> str:
    """What to say when Twisted could not make ``description`` an endpoint.

    For ``systemd:`` its own error is a bare ``list index out of range``
    (or the missing name): say that no such socket was passed instead.
    """
    if not description.lower().startswith("systemd:") or not isinstance(
        error, IndexError | KeyError
    ):
        return str(error)
    return (
        "systemd passed no such socket (LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES"
        " name the sockets of the .socket unit that starts this service; see docs/deploy.md)"
    )


def passed_socket_problem(fd: int, family: int) -> str | None:
    """What is wrong with the socket passed as ``fd`` for a ``systemd:`` listener of ``family``, if any.

    Twisted adopts whatever it is given: a ``domain=INET`` listener on the
    IPv6 socket that ``ListenStream=443`` makes would report a garbled
    address, and a datagram socket would fail at the first accept.
    """
    try:
        probe = socket.socket(fileno=fd)  # its real family and type
    except OSError as e:
        return f"descriptor {fd}: {e.strerror or e}"
    try:
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        real_family, kind = probe.family, probe.type
    finally:
        probe.detach()
    if real_family != family:
        domain = real_family.name.removeprefix("AF_")
        return f"the socket passed is {real_family.name}: give domain={domain}"
    if kind != socket.SOCK_STREAM or not listening:
        return "the socket passed is not a listening stream socket (ListenStream=)"
    return None


@implementer(IStreamServerEndpoint)
class AdoptedBySupervisor:
    """A ``systemd:`` listener in a worker of ``--workers``: never listened on.

    systemd passed the socket to the supervisor, which hands each worker its
    duplicate to adopt; the worker has no such socket of its own.
    """

    def __init__(self, description: str) -> None:
        self.description = description

    def listen(self, factory: object) -> Deferred[Any]:
        return fail(RuntimeError(f"{self.description} is adopted from the supervisor"))
