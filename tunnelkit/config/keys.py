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

from tunnelkit.backends import balance
from tunnelkit.policy import client_limits
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


def _number(
    kind: type[int] | type[float], low: float, what: str, high: float | None = None
) -> Kind:
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

    return Kind(what, parse, ranged)


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


SECONDS = _number(float, 0, "a number of seconds (0 or more)")
POSITIVE_SECONDS = Kind(
    "a positive number of seconds",
    lambda text: _positive(float(text)),
    lambda value: _positive(SECONDS.check(value)),
)
WHOLE_SECONDS = _number(int, 1, "a positive whole number of seconds")
COUNT = _number(int, 1, "a positive whole number")
BYTES = _number(int, 1, "a positive whole number of bytes")
TEXT = Kind("a non-empty string", _text, _text)
RATE = Kind("a positive rate: N, N/s or N/m", client_limits.parse_rate, client_limits.parse_rate)
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
        _many("listen", L, "Where to accept clients (repeatable); a bare PORT listens on all IPv4 interfaces"),
        _many("to", L, "A backend, HOST:PORT or an endpoint, optionally ,weight=N (1-256) or ,backup (repeatable; see --balance)"),
        _many("backup", L, "A backup backend: takes clients only while every --to is down (repeatable)"),
        Key("mode", L, _choice("forward", "connect", "socks5", "sni", "auto"), "forward", "forward (relay to --to), connect (HTTP CONNECT proxy), socks5 (SOCKS5 proxy), sni (route TLS by its server name, untouched: --route) or auto (one port for all: see docs/auto.md)"),
        _many("route", L, "sni and auto modes: NAME[,alpn=PROTOCOL]=BACKEND sends TLS clients naming NAME (a host, *.DOMAIN or *) to BACKEND, most specific first; --to takes the rest (repeatable; the same NAME twice balances; see docs/sni.md)"),
        # -- balancing, retries and health (docs/balancing.md)
        Key("balance", L, _choice(*balance.NAMES), "round-robin", "How clients are spread over the backends: round-robin (by weight), least-conn (fewest connections per weight), random (power of two choices), source-hash (a client address stays on its backend), first (ordered failover)"),
        Key("connect-retries", L, _number(int, 0, "a whole number (0 or more)"), 2, "Further backends tried when a connect is refused or times out (each within --connect-timeout)"),
        Key("max-conn-per-backend", L, COUNT, None, "Connections one backend takes at most; the next takes the rest (default: no limit)"),
        Key("health-interval", L, SECONDS, 0.0, "Seconds between active health checks of each backend (0: off; failed connects still eject a backend for a while)"),
        Key("health-timeout", L, POSITIVE_SECONDS, None, "Seconds one health check may take (default: the interval, at most --connect-timeout)"),
        Key("health-send", L, TEXT, None, "Bytes a health check sends once connected (\\r, \\n, \\t, \\xNN and \\\\ escapes)"),
        Key("health-expect", L, TEXT, None, "Bytes a health check must receive (same escapes); default: connecting (and a TLS backend's handshake) is enough"),
        Key("rise", L, COUNT, 2, "Health checks in a row that bring a backend back up"),
        Key("fall", L, COUNT, 3, "Failed health checks, or connects, in a row that take a backend down"),
        Key("slow-start", L, SECONDS, 0.0, "Seconds over which a backend that comes back up ramps to its full weight (0: at once)"),
        Key("resolve-interval", L, SECONDS, 0.0, "Seconds between resolutions of backend names while running; a changed set of addresses is swapped in (0: resolved at start only)"),
        _switch("close-on-down", L, "Abort a backend's live tunnels when its health checks take it down (default: they go on)"),
        # -- who may connect, and where to
        _many("allow-client", L, "Only clients from this address or CIDR may connect (repeatable)"),
        _many("deny-client", L, "Clients from this address or CIDR are closed at once (repeatable)"),
        Key("max-conn-per-client", L, COUNT, None, "Tunnels one client address may have open at once on this listener; its next connections are closed at once (default: no limit; see docs/limits.md)"),
        Key("rate-per-client", L, RATE, None, "New connections one client address may open: N or N/s per second, N/m per minute (a token bucket; connections beyond it are closed at once; default: no limit)"),
        Key("rate-burst", L, COUNT, None, "With --rate-per-client: connections a client may open at once before the rate applies (default: one second's worth, at least 1)"),
        _many("allow-dest", L, "connect, socks5 and auto modes: allow targets matching CIDR, NAME or *.DOMAIN, optionally :PORT[-PORT] (repeatable; overrides the refusal of private addresses)"),
        _many("deny-dest", L, "connect, socks5 and auto modes: refuse targets matching this rule (repeatable; beats --allow-dest)"),
        _many("allow-port", L, "connect, socks5 and auto modes: only these target ports, PORT or PORT-PORT (repeatable; default: all)"),
        Key("auth-file", L, TEXT, None, "connect, socks5 and auto modes: htpasswd file of bcrypt entries (htpasswd -B, tunnelkit passwd); SOCKS5 then requires username/password"),
        Key("detect-timeout", L, POSITIVE_SECONDS, 2.0, "auto mode: seconds a client may stay silent before it goes to --to (protocols where the server speaks first) or is closed"),
        Key("header-timeout", L, POSITIVE_SECONDS, 10.0, "Seconds from accept to the end of what the listener reads first (a PROXY header, a CONNECT head, a SOCKS5 negotiation, a ClientHello; in auto mode, the first bytes too)"),
        # -- the PROXY protocol (docs/proxy-protocol.md)
        Key("proxy-protocol", L, _choice("v1", "v2"), None, "Send a PROXY protocol header to each backend before any payload: v1 (text) or v2 (binary, with TLVs for ALPN, SNI and the client certificate when TLS is terminated)"),
        _switch("accept-proxy-protocol", L, "Read a PROXY protocol header (v1 or v2) from each client first: its address then stands for the client's (needs --trusted-proxies)"),
        _many("trusted-proxies", L, "With --accept-proxy-protocol: the only addresses or CIDRs that may connect, each sending a PROXY header (repeatable)"),
        # -- timeouts
        Key("connect-timeout", L, POSITIVE_SECONDS, 10.0, "Seconds to connect to a backend"),
        Key("idle-timeout", L, SECONDS, 3600.0, "Close a tunnel that moved no byte this long (0: never)"),
        Key("fin-timeout", L, SECONDS, 60.0, "Longest a half-closed tunnel may linger (0: no limit)"),
        _switch("no-half-close", L, "Close both sides at the first EOF, as nginx's proxy_half_close off does (default: pass the EOF on and keep the other way open)"),
        # -- sockets and the relay
        _switch("no-nodelay", L, "Leave Nagle's algorithm on"),
        Key("keepalive", L, WHOLE_SECONDS, None, "TCP keepalive idle time, seconds (off by default)"),
        Key("sndbuf", L, BYTES, None, "SO_SNDBUF for both legs, bytes (kernel default)"),
        Key("rcvbuf", L, BYTES, None, "SO_RCVBUF for both legs, bytes (kernel default)"),
        Key("mss", L, BYTES, None, "TCP_MAXSEG, the TCP segment size for both legs, bytes"),
        Key("read-size", L, BYTES, DEFAULT_READ_SIZE, "Bytes read per event on each leg"),
        Key("engine", L, _choice("auto", "native", "python"), "auto", "Who relays plain forwarding: auto (the native engine where the options allow it), native (insist), python (always Twisted); see docs/performance.md"),
        Key("splice", L, _choice("auto", "on", "off"), "auto", "Move bytes in the kernel with splice(2) (plain TCP/UNIX legs, Linux): auto (tunnels that move bulk data), on (every tunnel; fails where splice is missing), off"),
        _switch("no-access-log", L, "Log no tunnel_closed event per connection (other events are still logged)"),
        # -- TLS towards clients
        _many("tls-cert", L, "Terminate TLS with this certificate (chain) file (repeatable: chosen by SNI)"),
        _many("tls-key", L, "The key of the --tls-cert at the same position (default: in the certificate file)"),
        _switch("tls-strict-sni", L, "Refuse TLS clients whose SNI name no --tls-cert serves"),
        Key("tls-min-version", L, _choice("1.2", "1.3"), "1.2", "Oldest TLS version accepted from clients: 1.2 or 1.3"),
        Key("tls-ciphers", L, TEXT, None, "OpenSSL cipher list for TLS 1.2 clients"),
        Key("alpn", L, TEXT, None, "ALPN protocols offered to clients, e.g. http/1.1 (offer h2 only if every backend speaks HTTP/2: tunnelkit does not translate)"),
        Key("tls-client-ca", L, TEXT, None, "Require client certificates signed by a CA in this file"),
        _switch("tls-client-optional", L, "With --tls-client-ca: accept clients without a certificate"),
        Key("tls-handshake-timeout", L, POSITIVE_SECONDS, 10.0, "Seconds a TLS client has to complete its handshake"),
        # -- TLS towards backends
        _switch("backend-tls", L, "TLS to every HOST:PORT backend (see docs/tls.md)"),
        Key("backend-ca", L, TEXT, None, "CA file backend certificates must chain to (default: system)"),
        Key("backend-sni", L, TEXT, None, "SNI name sent to TLS backends and checked in their certificate"),
        Key("backend-cert", L, TEXT, None, "Client certificate presented to TLS backends"),
        Key("backend-key", L, TEXT, None, "Key of --backend-cert (default: read from that file)"),
        _switch("backend-insecure", L, "Do not verify backend certificates (warns: traffic can be read and changed)"),
        # -- upstream proxies (docs/via.md)
        _many("via", L, "Reach every backend through this proxy: http://[USER:PASS@]HOST:PORT (CONNECT), https://... (TLS to the proxy) or socks5://[USER:PASS@]HOST:PORT; backend names are resolved by the proxy (repeatable: a chain, each proxy reached through the one before)"),
        # -- UDP listeners (docs/udp.md)
        Key("udp-idle-timeout", L, POSITIVE_SECONDS, 60.0, "udp: listeners: end a client's session after this many seconds without a datagram either way"),
        Key("udp-replies", L, COUNT, None, "udp: listeners: end a session after this many datagrams from the backend (1 for DNS-style request and reply; default: only the idle timeout ends it)"),
        Key("udp-sessions-per-source", L, COUNT, 64, "udp: listeners: most sessions one client address (all its ports) may have at once"),
        Key("udp-session-rate", L, COUNT, 20, "udp: listeners: new sessions per second one client address may open (a burst of as many); more are dropped"),
        # -- the process
        Key("workers", P, _number(int, 1, f"a whole number from 1 to {MAX_WORKERS}", MAX_WORKERS), 1, "Processes accepting on the listeners (one core each), supervised by this one"),
        Key("max-connections", P, COUNT, None, "Most tunnels at once (default: what the file-descriptor limit allows)"),
        Key("drain-timeout", P, SECONDS, 30.0, "On SIGTERM, seconds to let tunnels finish"),
        Key("access-log", P, TEXT, None, "Write the tunnel_closed records to this file instead of twistd's log (reopened on SIGHUP); see docs/logging.md"),
        Key("access-log-format", P, _choice("text", "json"), None, "Lines of --access-log: text (the default) or json"),
        _switch("no-write-through", P, "Always queue writes in Twisted (diagnostics; slower): see docs/performance.md"),
        # -- the admin endpoint (docs/admin.md)
        Key("admin", P, TEXT, None, "Serve /metrics (Prometheus), /healthz, /readyz and the /status page on this endpoint, e.g. 127.0.0.1:9100 (loopback only unless --admin-token is given)"),
        Key("admin-token", P, TEXT, None, "A file holding the bearer token every --admin request must present (Authorization: Bearer TOKEN); needed to serve --admin beyond loopback"),
    )  # fmt: skip


#: Every key, by name, in the order ``--help`` shows them.
KEYS: dict[str, Key] = {key.name: key for key in _keys()}
