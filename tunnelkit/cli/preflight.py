"""Checks made before anything listens: files twistd will write, backend names.

``twistd`` opens its ``--logfile`` and writes its ``--pidfile`` only after the
plugin's service is made, the second after daemonizing: a path in a missing
directory then ends in tracebacks (in the log, if there is one) after the
listeners were briefly up. The plugin's options are parsed first, with
twistd's own at hand as the parent options, so those paths are checked here
and a bad one is a one-line error in the shell.

A backend given by name is resolved at start-up (each address a backend,
see :mod:`tunnelkit.app.build`); a name that does not resolve then is not an
error (DNS may come later: Twisted resolves it per connection meanwhile, with
a warning), but ``--check`` reports it as an error (:func:`unresolved`).
Behind ``--via`` the proxy resolves the backends' names, and ``--check``
resolves the proxy's instead (:func:`unresolved_proxies`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tunnelkit.backends.resolver import ResolveError, lookup
from tunnelkit.backends.via_url import Via
from tunnelkit.config.addresses import AddressError, HostPort, backend_address, tls_host_port


def unwritable(path: str) -> str | None:
    """Why a file cannot be appended to or created at ``path``; ``None`` if it can."""
    full = os.path.abspath(path)
    directory = os.path.dirname(full)
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if os.path.isdir(full):
        return "is a directory"
    if os.path.exists(full):
        return None if os.access(full, os.W_OK) else "permission denied"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create a file in {directory}: permission denied"
    return None


def twistd_files(parent: Mapping[str, Any] | None) -> Iterator[tuple[str, str]]:
    """``(option, path)`` for each file twistd will write, when ``parent`` is twistd's options.

    The log file: ``--logfile``, or ``twistd.log`` for a daemon given none
    (unless ``--logger`` or ``--syslog`` takes the log). The pid file:
    ``--pidfile`` (``twistd.pid`` by default, also with ``-n``), except under
    ``--chroot``, where the path is only known inside the new root.
    """
    if parent is None or "pidfile" not in parent or "nodaemon" not in parent:
        return  # not twistd: twist opens its --log-file itself, a worker writes no file
    if not (parent.get("logger") or parent.get("syslog")):
        logfile = parent.get("logfile") or (None if parent["nodaemon"] else "twistd.log")
        if logfile and logfile != "-":
            yield "--logfile", logfile
    if parent["pidfile"] and parent.get("chroot") is None:
        yield "--pidfile", parent["pidfile"]


def twistd_file_errors(parent: Mapping[str, Any] | None) -> list[str]:
    """One message per twistd file that cannot be written, naming the option and the path."""
    errors = []
    for option, path in twistd_files(parent):
        why = unwritable(path)
        if why is not None:
            errors.append(f"{option} {path}: {why}")
    return errors


def named_backends(texts: Sequence[str], endpoint_types: frozenset[str]) -> list[HostPort]:
    """The ``--to`` values (``HOST:PORT``, ``tls:HOST:PORT``) whose host is a name, not an address."""
    names = []
    for text in texts:
        try:
            address = tls_host_port(text) or backend_address(text, endpoint_types)
        except AddressError:
            continue
        if isinstance(address, HostPort) and not is_ip(address.host):
            names.append(address)
    return names


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP address (a scoped IPv6 one too), not a name."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def unresolved(backends: Sequence[HostPort], option: str = "--to") -> list[str]:
    """``--check``: one message per backend name (of ``option``) that does not resolve now (blocking)."""
    errors = []
    for backend in backends:
        try:
            lookup(backend.host, backend.port)
        except ResolveError as e:
            errors.append(f"{option} {backend}: {e}")
    return errors


def unresolved_proxies(proxies: Sequence[Via]) -> list[str]:
    """``--check``: one message per ``--via`` proxy name that does not resolve now (blocking)."""
    errors = []
    for via in proxies:
        if is_ip(via.host):
            continue
        try:
            lookup(via.host, via.port)
        except ResolveError as e:
            errors.append(f"--via {via.shown}: {e}")
    return errors
