"""A ``udp:`` listener's settings from its keys: which keys apply, and what they become.

Called by :func:`tunnelkit.config.model.udp_listener` for a listener whose
``listen`` values are ``udp:`` ones; its problems are collected with the
others, at the same key paths. UDP forwarding takes fewer keys than TCP: a
key that would mean nothing (TLS, timeouts of a TCP tunnel, modes that read
a request) is a problem, not silently ignored.
"""

from __future__ import annotations

from tunnelkit.backends.group import Balancing
from tunnelkit.config.addresses import (
    AddressError,
    is_udp,
    udp_backend_address,
    udp_listen_address,
)
from tunnelkit.config.model import (
    BackendSpec,
    ListenerSettings,
    Path,
    Timeouts,
    _backend_options,
    _health,
    _policies,
    _Reader,
)
from tunnelkit.relay.socket_options import SocketOptions
from tunnelkit.udp.settings import UdpSettings

#: The keys only a UDP listener uses.
UDP_ONLY = ("udp-idle-timeout", "udp-replies", "udp-sessions-per-source", "udp-session-rate")
#: Every key a UDP listener takes.
UDP_KEYS = frozenset(
    {
        "listen",
        "to",
        "backup",
        "mode",
        "balance",
        "allow-client",
        "deny-client",
        "no-access-log",
        "engine",
    }
    | {"health-interval", "health-timeout", "health-send", "health-expect", "rise", "fall"}
    | set(UDP_ONLY)
)


def tcp_only_checks(r: _Reader) -> None:
    """A TCP listener given a UDP-only key, or a ``udp:`` backend: say so."""
    for key in UDP_ONLY:
        if r.given(key):
            r.problem((key,), f"{{{key}}} applies to udp: listeners only")
    for index, text in enumerate(r["to"]):
        if is_udp(text):
            r.problem(("to", index), "a udp: backend needs a udp: {listen} (e.g. udp:5353)")


def udp_listener(r: _Reader, *, name: str, path: Path, before: int) -> ListenerSettings | None:
    """The settings of a listener whose ``listen`` values are ``udp:``; ``None`` if it has problems."""
    addresses = _addresses(r)
    for key in sorted(r.values):
        if key not in UDP_KEYS and r.given(key):
            r.problem((key,), f"{{{key}}} does not apply to udp: listeners")
    if r["mode"] != "forward":
        r.problem(("mode",), "udp: listeners forward only ({mode} forward)")
    if r["engine"] == "native":
        r.problem(("engine",), "{engine} native: UDP runs on Twisted's plane (docs/udp.md)")
    if not r["to"]:
        r.problem(("to",), "{to} is required (e.g. udp:127.0.0.1:53)")
    backends = _backends(r)
    clients, targets = _policies(r)
    health = _health(r)
    if health is not None and (health.send is None or health.expect is None):
        r.problem(
            ("health-interval",),
            "{health-interval} on a udp: listener needs {health-send} and {health-expect}:"
            " a UDP backend says nothing unless asked",
        )
    if len(r.problems) > before:
        return None
    return ListenerSettings(
        name=name,
        path=path,
        listen=tuple(r["listen"]),
        endpoints=tuple(r["listen"]),
        mode="forward",
        backends=backends,
        clients=clients,
        targets=targets,
        auth_file=None,
        timeouts=Timeouts(),
        connect_timeout=r["connect-timeout"],
        header_timeout=r["header-timeout"],
        socket_options=SocketOptions(),
        engine="python",
        splice="off",
        access_log=not r["no-access-log"],
        tls=None,
        backend_tls=None,
        balancing=Balancing(strategy=r["balance"]),
        health=health,
        udp=UdpSettings(
            addresses=addresses,
            idle_timeout=r["udp-idle-timeout"],
            replies=r["udp-replies"],
            sessions_per_source=r["udp-sessions-per-source"],
            session_rate=r["udp-session-rate"],
        ),
    )


def _addresses(r: _Reader) -> tuple[tuple[str, int], ...]:
    found = []
    for index, text in enumerate(r["listen"]):
        if not is_udp(text):
            r.problem(("listen", index), "udp: and TCP in one listener: give each its own")
            continue
        try:
            found.append(udp_listen_address(text))
        except AddressError as e:
            r.problem(("listen", index), str(e))
    return tuple(found)


def _backends(r: _Reader) -> tuple[BackendSpec, ...]:
    specs = []
    given = [("to", index, text) for index, text in enumerate(r["to"])]
    given += [("backup", index, text) for index, text in enumerate(r["backup"])]
    for key, index, written in given:
        try:
            text, weight, backup = _backend_options(written)
            if not is_udp(text):
                raise ValueError(f"{text!r}: a udp: listener forwards to udp:HOST:PORT")
            address = udp_backend_address(text)
        except (AddressError, ValueError) as e:
            r.problem((key, index), str(e))
            continue
        specs.append(BackendSpec(text, address, False, weight, backup or key == "backup"))
    if specs and all(spec.backup for spec in specs):
        r.problem(("backup",), "{backup} needs a {to} backend that is not a backup")
    return tuple(specs)
