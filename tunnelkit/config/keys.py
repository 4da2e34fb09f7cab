"""Every setting tunnelkit has, defined once: its name, scope, type, default and help.

The command line and the TOML file are two spellings of the same settings: a
key's name is its long flag (``connect-timeout``), and its :class:`Kind`
turns either a flag's text or a TOML value into the typed value, or says in
one line what was wrong. :mod:`tunnelkit.cli.command.options` makes the flags from
this table, :mod:`tunnelkit.config.toml_file` checks the file's keys against
it, and :mod:`tunnelkit.config.model` builds the frozen settings from the
values, so a key cannot mean one thing on the command line and another in a
file.

Nothing here imports the reactor or the TLS stack.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from tunnelkit.relay.socket_options import DEFAULT_READ_SIZE


class Scope(enum.Enum):
    """Where a key may be set in a file: at the top, or in a ``[[listener]]`` table."""

    PROCESS = "process"
    LISTENER = "listener"


class BadValue(ValueError):
    """A value of the wrong type or out of range; the message says what it must be."""


@attrs.frozen
class Kind:
    """How a value is read: from a flag's text (``parse``) and from a TOML value (``check``)."""

    what: str
    parse: Callable[[str], Any]
    check: Callable[[object], Any]

    def from_text(self, text: str) -> Any:
        try:
            return self.parse(text)
        except (ValueError, TypeError):
            raise BadValue(f"must be {self.what}, not {text!r}") from None

    def from_toml(self, value: object) -> Any:
        try:
            return self.check(value)
        except (ValueError, TypeError):
            raise BadValue(f"must be {self.what}, not {value!r}") from None


def _number(kind: type[int] | type[float], low: float, high: float | None = None) -> Kind:
    whole = kind is int

    def ranged(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        if whole and not isinstance(value, int):
            raise TypeError(value)
        if value < low or (high is not None and value > high):
            raise ValueError(value)
        return kind(value)

    def parse(text: str) -> Any:
        return ranged(kind(text.strip()))

    unit = "a whole number" if whole else "a number"
    bounds = f"from {low:g}" if high is None else f"from {low:g} to {high:g}"
    return Kind(f"{unit} {bounds}", parse, ranged)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(value)
    return value


def _choice(*choices: str) -> Kind:
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(value)
        assert isinstance(value, str)
        return value

    return Kind("one of " + ", ".join(choices), check, check)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


SECONDS = _number(float, 0)
POSITIVE_SECONDS = Kind(
    "a positive number of seconds",
    lambda text: _positive(float(text)),
    lambda value: _positive(_number(float, 0).check(value)),
)
COUNT = _number(int, 1)
BYTES = _number(int, 1)
TEXT = Kind("a non-empty string", _text, _text)
FLAG = Kind("true or false", lambda text: True, _boolean)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(value)
    return value


@attrs.frozen
class Key:
    """One setting: a flag on the command line and a key in the file."""

    name: str
    scope: Scope
    kind: Kind
    default: Any
    help: str
    #: Given several times on the command line, a list in the file.
    repeatable: bool = False
    #: A switch (``--no-half-close``): no value on the command line, a boolean in the file.
    switch: bool = False

    @property
    def attribute(self) -> str:
        """The Python name of the value (``connect_timeout``)."""
        return self.name.replace("-", "_")


MAX_WORKERS = 256

P, L = Scope.PROCESS, Scope.LISTENER


def _switch(name: str, scope: Scope, help: str) -> Key:
    return Key(name, scope, FLAG, False, help, switch=True)


def _many(name: str, scope: Scope, help: str) -> Key:
    return Key(name, scope, TEXT, (), help, repeatable=True)


def _keys() -> Sequence[Key]:
    return (
        # -- where, and what
        _many("listen", L, "where to accept clients: PORT (every interface), ADDR:PORT, [V6]:PORT or an endpoint string"),
        _many("to", L, "a backend: HOST:PORT, [V6]:PORT or a client endpoint string (tried in order)"),
        Key("mode", L, _choice("forward", "connect"), "forward", "forward (relay to --to) or connect (HTTP CONNECT proxy)"),
        # -- who may connect, and where to
        _many("allow-client", L, "only clients from this address or CIDR may connect"),
        _many("deny-client", L, "clients from this address or CIDR are closed at once"),
        _many("allow-dest", L, "connect mode: allow targets matching CIDR, NAME or *.DOMAIN, optionally :PORT[-PORT]"),
        _many("deny-dest", L, "connect mode: refuse targets matching this rule (beats allow-dest)"),
        _many("allow-port", L, "connect mode: only these target ports, PORT or PORT-PORT"),
        Key("auth-file", L, TEXT, None, "connect mode: htpasswd file of bcrypt entries"),
        Key("header-timeout", L, POSITIVE_SECONDS, 10.0, "connect mode: seconds from accept to the end of the request head"),
        # -- timeouts
        Key("connect-timeout", L, POSITIVE_SECONDS, 10.0, "seconds to connect to a backend"),
        Key("idle-timeout", L, SECONDS, 3600.0, "close a tunnel that moved no byte this long (0: never)"),
        Key("fin-timeout", L, SECONDS, 60.0, "longest a half-closed tunnel may linger (0: no limit)"),
        _switch("no-half-close", L, "close both sides at the first EOF, as nginx's proxy_half_close off does"),
        # -- sockets and the relay
        _switch("no-nodelay", L, "leave Nagle's algorithm on (TCP_NODELAY is set by default)"),
        Key("keepalive", L, COUNT, None, "TCP keepalive idle time, whole seconds (off by default)"),
        Key("sndbuf", L, BYTES, None, "SO_SNDBUF for both legs, bytes (kernel default)"),
        Key("rcvbuf", L, BYTES, None, "SO_RCVBUF for both legs, bytes (kernel default)"),
        Key("mss", L, BYTES, None, "TCP_MAXSEG, the TCP segment size for both legs, bytes"),
        Key("read-size", L, BYTES, DEFAULT_READ_SIZE, "bytes read per event on each leg"),
        Key("engine", L, _choice("auto", "native", "python"), "auto", "who relays: auto, native (insist) or python (Twisted)"),
        Key("splice", L, _choice("auto", "on", "off"), "auto", "move bytes in the kernel with splice(2): auto, on or off"),
        _switch("no-access-log", L, "log no tunnel_closed record for this listener's tunnels"),
        # -- TLS towards clients
        _many("tls-cert", L, "terminate TLS with this certificate (chain) file (several: chosen by SNI)"),
        _many("tls-key", L, "the key of the tls-cert at the same position (default: in the certificate file)"),
        _switch("tls-strict-sni", L, "refuse TLS clients whose SNI name no tls-cert serves"),
        Key("tls-min-version", L, _choice("1.2", "1.3"), "1.2", "oldest TLS version accepted from clients"),
        Key("tls-ciphers", L, TEXT, None, "OpenSSL cipher list for TLS 1.2 clients"),
        Key("alpn", L, TEXT, None, "ALPN protocols offered to clients, e.g. http/1.1"),
        Key("tls-client-ca", L, TEXT, None, "require client certificates signed by a CA in this file"),
        _switch("tls-client-optional", L, "with tls-client-ca: accept clients without a certificate"),
        Key("tls-handshake-timeout", L, POSITIVE_SECONDS, 10.0, "seconds a TLS client has to complete its handshake"),
        # -- TLS towards backends
        _switch("backend-tls", L, "TLS to every HOST:PORT backend"),
        Key("backend-ca", L, TEXT, None, "CA file backend certificates must chain to (default: the system's)"),
        Key("backend-sni", L, TEXT, None, "SNI name sent to TLS backends and checked in their certificate"),
        Key("backend-cert", L, TEXT, None, "client certificate presented to TLS backends"),
        Key("backend-key", L, TEXT, None, "key of backend-cert (default: read from that file)"),
        _switch("backend-insecure", L, "do not verify backend certificates (warns)"),
        # -- the process
        Key("workers", P, _number(int, 1, MAX_WORKERS), 1, "processes accepting on the listeners, supervised by this one"),
        Key("max-connections", P, COUNT, None, "most tunnels at once (default: what the fd limit allows)"),
        Key("drain-timeout", P, SECONDS, 30.0, "on SIGTERM, seconds to let tunnels finish"),
        Key("access-log", P, TEXT, None, "write the tunnel_closed records to this file (reopened on SIGHUP)"),
        Key("access-log-format", P, _choice("text", "json"), None, "lines of access-log: text (the default) or json"),
        _switch("no-write-through", P, "always queue writes in Twisted (diagnostics; slower)"),
    )  # fmt: skip


#: Every key, by name, in the order ``--help`` shows them.
KEYS: dict[str, Key] = {key.name: key for key in _keys()}
