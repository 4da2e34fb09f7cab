"""The settings of a tunnelkit process: frozen, typed, and built without side effects.

A :class:`Settings` is what the command line or a TOML file says, checked
and parsed: process-wide values and one :class:`ListenerSettings` per
listener, each with its endpoints, mode, backends, policies, timeouts,
socket options and TLS. Building it opens no file, resolves no name and
imports neither the reactor nor the TLS stack; loading certificates and
password files, binding ports and choosing the plane happen later, in
:mod:`tunnelkit.app.build`, from these values alone.

Every problem found is a :class:`Problem` with the key path it concerns
(``listener[2].to[0]``), collected rather than raised one at a time, so
``--check`` can report all of a file's errors at once. The command line
renders the same paths as flags (``--to 'x'``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from tunnelkit.backends.group import MAX_WEIGHT, Balancing
from tunnelkit.backends.health import MAX_RESPONSE, HealthSettings
from tunnelkit.backends.via_url import SOCKS5_FIELD, Via, ViaURLError, parse_via
from tunnelkit.config.addresses import (
    AddressError,
    HostPort,
    backend_address,
    is_udp,
    listen_description,
    tls_host_port,
)
from tunnelkit.config.keys import KEYS, BadValue, Key, Scope
from tunnelkit.policy.client_limits import ClientLimits
from tunnelkit.policy.sni_routes import RouteMatch, parse_route
from tunnelkit.policy.targets import ClientPolicy, RuleError, TargetPolicy
from tunnelkit.proxy_protocol.build import header as proxy_header
from tunnelkit.relay.socket_options import SocketOptions
from tunnelkit.udp.settings import UdpSettings

#: A key path: ``("listener", 2, "to", 0)`` is ``listener[2].to[0]``.
Path = tuple[str | int, ...]


@attrs.frozen
class Problem:
    """One thing wrong with the settings, and where it was said."""

    path: Path
    #: May name other keys as ``{tls-cert}``: a file shows ``tls-cert``, the command line ``--tls-cert``.
    message: str

    def in_file(self) -> str:
        """``listener[2].to[0]: message``."""
        text = ""
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
        message = self.message
        subject = self._subject()
        if subject is not None:  # "{to} is required" at listener[0].to: "is required"
            message = message[len(subject) + 2 :].lstrip(" :")
        message = _KEY_REF.sub(lambda m: m[1] if m[1] in KEYS else m[0], message)
        return f"{text}: {message}" if text else message

    def _subject(self) -> str | None:
        """The key the message starts with (``{to} ...``) when it is the key at fault."""
        match = _KEY_REF.match(self.message)
        keys = [part for part in self.path if isinstance(part, str)]
        return match[1] if match and keys and keys[-1] == match[1] else None

    def as_flag(self, values: Mapping[str, Any]) -> str:
        """``--to 'db': message``: the flag, and the value given when one item is at fault."""
        message = _KEY_REF.sub(lambda m: f"--{m[1]}" if m[1] in KEYS else m[0], self.message)
        names = [i for i, part in enumerate(self.path) if isinstance(part, str) and part in KEYS]
        if not names or self._subject() is not None:
            return message
        at = names[-1]
        name = str(self.path[at])
        rest = self.path[at + 1 :]
        if rest and isinstance(rest[0], int):
            return f"--{name} {values[name][rest[0]]!r}: {message}"
        return f"--{name}: {message}"


_KEY_REF = re.compile(r"\{([a-z][a-z0-9-]*)\}")


class ConfigError(Exception):
    """The settings cannot be used; ``problems`` says every reason, each with its key path."""

    def __init__(self, problems: Sequence[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p.in_file() for p in self.problems))


@attrs.frozen
class Timeouts:
    """Time limits of one tunnel, in seconds; ``None`` disables a limit.

    ``close_grace`` bounds a graceful close without progress: once the tunnel
    closes, a leg whose reader took nothing of what it is owed for a whole
    grace (checked every grace, so within two) is aborted, as Twisted's
    ``HTTPChannel`` does with its ``abortTimeout``; one still taking bytes is
    left to the fin timer, if a half-close armed it. It also bounds the
    lingering close: a peer owed nothing that has not closed after our FIN.

    ``half_close`` false (``--no-half-close``) gives a half-closed tunnel no
    time at all: the first EOF closes both legs once what was read is sent,
    as nginx's ``proxy_half_close off`` (its default) does, and what a peer
    sends after the other side's FIN is read and dropped until it closes.
    """

    idle: float | None = 3600.0
    fin: float | None = 60.0
    close_grace: float = 5.0
    half_close: bool = True


@attrs.frozen
class CertificatePair:
    """A ``tls-cert`` file (leaf first, then its chain) and the file holding its key."""

    cert: str
    key: str


@attrs.frozen
class ServerTLSSettings:
    """Everything ``tls-*`` and ``alpn`` say about terminating TLS (files are read at build time)."""

    pairs: tuple[CertificatePair, ...]
    strict_sni: bool = False
    min_version: str = "1.2"
    ciphers: str | None = None
    alpn: tuple[bytes, ...] = ()
    client_ca: str | None = None
    client_optional: bool = False
    handshake_timeout: float = 10.0


@attrs.frozen
class BackendTLSSettings:
    """What ``backend-*`` says about TLS towards backends."""

    ca: str | None = None
    sni: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False
    #: ``backend-tls``: every HOST:PORT backend, not only ``tls:`` ones.
    every_backend: bool = False


@attrs.frozen
class BackendSpec:
    """A ``to`` value: a host and port, or a client endpoint string; and whether we speak TLS to it."""

    text: str
    address: HostPort | str
    tls: bool
    weight: int = 1
    #: Takes clients only while every other backend is down.
    backup: bool = False


@attrs.frozen
class RouteSpec:
    """A ``route`` value: what the ClientHello must match, and the backend it then goes to."""

    match: RouteMatch
    backend: BackendSpec


@attrs.frozen
class ListenerSettings:
    """One ``[[listener]]`` table, or the whole command line."""

    #: ``listener[N]`` in a file; the first ``--listen`` on the command line.
    name: str
    #: Where its keys are: ``("listener", N)``, under which its problems are reported.
    path: Path
    #: The ``listen`` values as written, and the endpoint descriptions they became.
    listen: tuple[str, ...]
    endpoints: tuple[str, ...]
    mode: str
    backends: tuple[BackendSpec, ...]
    clients: ClientPolicy
    targets: TargetPolicy
    auth_file: str | None
    timeouts: Timeouts
    connect_timeout: float
    #: From accept to the end of what the listener reads first (a CONNECT head, a SOCKS5 negotiation, ...).
    header_timeout: float
    socket_options: SocketOptions
    engine: str
    splice: str
    access_log: bool
    tls: ServerTLSSettings | None
    backend_tls: BackendTLSSettings | None
    balancing: Balancing = attrs.field(factory=Balancing)
    #: ``None``: no active checks (failed connects still eject a backend).
    health: HealthSettings | None = None
    #: Seconds between resolutions of backend names while running (0: at start only).
    resolve_interval: float = 0.0
    #: auto mode: how long a silent client waits before it goes to ``to`` (or is closed).
    detect_timeout: float = 2.0
    #: sni mode: the ``route`` values, in the order given.
    routes: tuple[RouteSpec, ...] = ()
    #: ``proxy-protocol``: the PROXY header version sent to backends (0: none).
    proxy_protocol: int = 0
    #: ``accept-proxy-protocol`` with its ``trusted-proxies``; ``None``: no header is read.
    trusted_proxies: ClientPolicy | None = None
    #: The upstream proxies every backend is reached through, the first connected to
    #: directly and each next one through the one before (docs/via.md).
    via: tuple[Via, ...] = ()
    #: ``max-conn-per-client``, ``rate-per-client``, ``rate-burst``; ``None``: no per-client limit.
    client_limits: ClientLimits | None = None
    #: A ``udp:`` listener's own settings (docs/udp.md); ``None``: a TCP listener.
    udp: UdpSettings | None = None


@attrs.frozen
class Settings:
    """Everything a tunnelkit process serves."""

    listeners: tuple[ListenerSettings, ...]
    workers: int = 1
    max_connections: int | None = None
    drain_timeout: float = 30.0
    access_log: str | None = None
    access_log_format: str = "text"
    write_through: bool = True
    #: ``admin``: the admin endpoint's string (docs/admin.md); ``None``: no admin endpoint.
    admin: str | None = None
    #: ``admin-token``: the file of the admin endpoint's bearer token.
    admin_token: str | None = None
    #: Where the settings came from: a file's path, or "the command line".
    source: str = "the command line"


#: Keys that only a proxy mode (which chooses its targets) uses.
PROXY_ONLY = ("allow-dest", "deny-dest", "allow-port", "auth-file")
#: The modes whose clients choose their targets: they use the PROXY_ONLY keys.
PROXY_MODES = ("connect", "socks5", "auto")
#: Modes that route by ``route``.
ROUTE_MODES = ("sni", "auto")
#: Keys that mean nothing without ``tls-cert``.
SERVER_TLS_ONLY = ("tls-key", "tls-strict-sni", "tls-ciphers", "alpn", "tls-client-ca", "tls-client-optional")  # fmt: skip
#: Keys that mean nothing without a TLS backend.
BACKEND_TLS_ONLY = ("backend-ca", "backend-sni", "backend-cert", "backend-key", "backend-insecure")


class _Reader:
    """The values of one scope, checked key by key; problems are collected, not raised."""

    def __init__(
        self, values: Mapping[str, Any], path: Path, problems: list[Problem], scope: Scope
    ) -> None:
        self.values = dict(values)
        self.path = path
        self.problems = problems
        for name in self.values:
            key = KEYS.get(name)
            if key is None:
                self.problem((name,), _unknown(name))
            elif key.scope is not scope:
                where = (
                    "at the top of the file"
                    if key.scope is Scope.PROCESS
                    else "in a [[listener]] table"
                )
                self.problem((name,), f"a {key.scope.value} setting: give it {where}")

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(Problem((*self.path, *path), message))

    def given(self, name: str) -> bool:
        return bool(self.values.get(name))

    def __getitem__(self, name: str) -> Any:
        return self.values.get(name, KEYS[name].default)


def _unknown(name: str) -> str:
    close = [k for k in KEYS if k.replace("-", "") == name.replace("-", "").replace("_", "")]
    return f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}"


class BadItem(BadValue):
    """A bad item of a repeatable key's list; ``index`` says which."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def check_value(key: Key, value: object, from_text: bool) -> Any:
    """A value of ``key`` as typed, from a flag's text or a TOML value; raises :class:`BadValue`."""
    read = key.kind.from_text if from_text else key.kind.from_toml
    if key.repeatable:
        items = [value] if isinstance(value, str) or not isinstance(value, list) else value
        checked = []
        for index, item in enumerate(items):
            try:
                checked.append(read(item))
            except BadValue as e:
                raise BadItem(index, str(e)) from None
        return tuple(checked)
    return read(value)  # type: ignore[arg-type]


def build_listener(
    values: Mapping[str, Any],
    *,
    name: str,
    path: Path,
    problems: list[Problem],
    endpoint_types: frozenset[str],
) -> ListenerSettings | None:
    """A listener from typed ``values`` (unset keys take their defaults); ``None`` if it has problems."""
    before = len(problems)
    r = _Reader(values, path, problems, Scope.LISTENER)
    if not r["listen"]:
        r.problem(("listen",), "{listen} is required (e.g. 8888)")
    from tunnelkit.udp.config import tcp_only_checks

    tcp_only_checks(r)
    endpoints = []
    for index, text in enumerate(r["listen"]):
        try:
            endpoints.append(listen_description(text))
        except AddressError as e:
            r.problem(("listen", index), str(e))
    mode = r["mode"]
    if mode != "auto" and r.given("detect-timeout"):
        r.problem(("detect-timeout",), "{detect-timeout} applies to {mode} auto only")
    if mode == "forward" and not r["to"]:
        r.problem(("to",), "{to} is required in forward mode (e.g. 127.0.0.1:80)")
    if mode not in PROXY_MODES:
        for key in PROXY_ONLY:
            if r.given(key):
                r.problem((key,), f"{{{key}}} applies to {{mode}} connect, socks5 and auto only")
    backends = _backends(r, endpoint_types)
    if mode == "sni":
        _sni_checks(r, backends)
    if mode == "auto" and r.given("route") and r.given("tls-cert"):
        r.problem(
            ("route",),
            "{route} and {tls-cert} in {mode} auto: TLS clients are either terminated"
            " ({tls-cert}) or routed by their server name ({route}), not both",
        )
    routes = _routes(r, endpoint_types)
    via = _via(r, mode, backends)
    clients, targets = _policies(r)
    tls = _server_tls(r)
    backend_tls = _backend_tls(r, backends, via)
    health = _health(r)
    client_limits = _client_limits(r)
    proxy_protocol, trusted_proxies = _proxy_protocol(r, backends)
    if health is not None and proxy_protocol:
        # A backend that wants the header wants it from checks too: one that
        # says "use the connection's addresses" (v1 UNKNOWN, v2 LOCAL), as
        # HAProxy's checks send with send-proxy.
        check = proxy_header(proxy_protocol, None, None)
        health = attrs.evolve(health, send=check + (health.send or b""))
    if len(problems) > before:
        return None
    return ListenerSettings(
        name=name,
        path=path,
        listen=tuple(r["listen"]),
        endpoints=tuple(endpoints),
        mode=mode,
        backends=backends,
        clients=clients,
        targets=targets,
        auth_file=r["auth-file"],
        timeouts=Timeouts(
            idle=r["idle-timeout"] or None,
            fin=r["fin-timeout"] or None,
            half_close=not r["no-half-close"],
        ),
        connect_timeout=r["connect-timeout"],
        header_timeout=r["header-timeout"],
        detect_timeout=r["detect-timeout"],
        socket_options=SocketOptions(
            nodelay=not r["no-nodelay"],
            keepalive=r["keepalive"],
            sndbuf=r["sndbuf"],
            rcvbuf=r["rcvbuf"],
            mss=r["mss"],
            read_size=r["read-size"],
        ),
        engine=r["engine"],
        splice=r["splice"],
        access_log=not r["no-access-log"],
        tls=tls,
        backend_tls=backend_tls,
        balancing=Balancing(
            strategy=r["balance"],
            retries=r["connect-retries"],
            max_conn=r["max-conn-per-backend"] or 0,
            eject_after=r["fall"],
            slow_start=r["slow-start"],
            close_on_down=r["close-on-down"],
        ),
        health=health,
        resolve_interval=r["resolve-interval"],
        routes=routes,
        proxy_protocol=proxy_protocol,
        trusted_proxies=trusted_proxies,
        via=via,
        client_limits=client_limits,
    )


def _backends(r: _Reader, endpoint_types: frozenset[str]) -> tuple[BackendSpec, ...]:
    specs = []
    given = [("to", index, text) for index, text in enumerate(r["to"])]
    given += [("backup", index, text) for index, text in enumerate(r["backup"])]
    for key, index, written in given:
        try:
            spec = _backend_spec(written, endpoint_types, r["backend-tls"])
        except (AddressError, ValueError) as e:
            r.problem((key, index), str(e))
            continue
        specs.append(attrs.evolve(spec, backup=True) if key == "backup" else spec)
    if specs and all(spec.backup for spec in specs):
        r.problem(("backup",), "{backup} needs a {to} backend that is not a backup")
    return tuple(specs)


def _backend_spec(written: str, endpoint_types: frozenset[str], every_tls: bool) -> BackendSpec:
    """A backend as written (``HOST:PORT`` or an endpoint, ``,weight=N``, ``,backup``); raises ValueError."""
    text, weight, backup = _backend_options(written)
    address = backend_address(text, endpoint_types)
    # tls:HOST:PORT is ours to verify; other tls: strings are Twisted's own endpoints.
    ours = tls_host_port(text)
    tls = ours is not None or (every_tls and isinstance(address, HostPort))
    return BackendSpec(text, ours or address, tls, weight, backup)


def _sni_checks(r: _Reader, backends: Sequence[BackendSpec]) -> None:
    """What an SNI listener cannot do: it relays the client's TLS as it came."""
    if not (r["to"] or r["route"]):
        r.problem(
            ("route",),
            "{route} or a default {to} is required in sni mode (e.g. example.com=10.0.0.5:443)",
        )
    for key in ("tls-cert", "backend-tls"):
        if r.given(key):
            r.problem(
                (key,),
                f"{{{key}}} does not apply to {{mode}} sni: it relays the client's TLS untouched",
            )
    for index, backend in enumerate(backends):
        if backend.tls and not r["backend-tls"]:
            r.problem(("to", index), _NOT_TLS_AGAIN.format(backend.text))


_NOT_TLS_AGAIN = (
    "{!r}: the client's TLS goes to the backend as it is, not in TLS again; give HOST:PORT"
)


def _routes(r: _Reader, endpoint_types: frozenset[str]) -> tuple[RouteSpec, ...]:
    """The ``route`` values: each a match and a backend (never a TLS one: the bytes are TLS already)."""
    if r["route"] and r["mode"] not in ROUTE_MODES:
        r.problem(("route",), "{route} applies to {mode} sni and auto only")
        return ()
    routes = []
    for index, text in enumerate(r["route"]):
        try:
            match, written = parse_route(text)
            backend = _backend_spec(written, endpoint_types, False)
        except ValueError as e:
            r.problem(("route", index), str(e))
            continue
        if backend.tls:
            r.problem(("route", index), _NOT_TLS_AGAIN.format(backend.text))
            continue
        routes.append(RouteSpec(match, backend))
    for match in dict.fromkeys(route.match for route in routes):
        if all(route.backend.backup for route in routes if route.match == match):
            r.problem(("route",), f"route {match}: every backend is a backup")
    return tuple(routes)


_OPTION = re.compile(r",(weight=[^,]*|backup)$")


def _backend_options(text: str) -> tuple[str, int, bool]:
    """A ``to`` value without its ``,weight=N`` and ``,backup`` suffixes, and what they say."""
    weight, backup = 1, False
    while (found := _OPTION.search(text)) is not None:
        option = found.group(1)
        text = text[: found.start()]
        if option == "backup":
            backup = True
            continue
        value = option.partition("=")[2]
        if not value.isdigit() or int(value) > MAX_WEIGHT:
            raise ValueError(f"weight={value}: a weight is a whole number from 0 to {MAX_WEIGHT}")
        weight = int(value)
    return text, weight, backup


def _proxy_protocol(r: _Reader, backends: Sequence[BackendSpec]) -> tuple[int, ClientPolicy | None]:
    """The PROXY header version sent (0: none), and the trusted proxies whose headers are read."""
    version = {"v1": 1, "v2": 2, None: 0}[r["proxy-protocol"]]
    if version and any(spec.tls or _tls_endpoint(spec.address) for spec in backends):
        r.problem(
            ("proxy-protocol",),
            "{proxy-protocol} with a TLS backend: not supported (the header would have to go"
            " before the TLS handshake)",
        )
    trusted = r["trusted-proxies"]
    if not r["accept-proxy-protocol"]:
        if trusted:
            r.problem(("trusted-proxies",), "{trusted-proxies} needs {accept-proxy-protocol}")
        return version, None
    if not trusted:
        r.problem(
            ("accept-proxy-protocol",),
            "{accept-proxy-protocol} needs {trusted-proxies}: the addresses whose PROXY headers"
            " may be believed (e.g. 10.0.0.0/8)",
        )
        return version, None
    try:
        return version, ClientPolicy.from_options(trusted)
    except ValueError as e:
        r.problem(("trusted-proxies",), str(e))
        return version, None


def _tls_endpoint(address: HostPort | str) -> bool:
    """A Twisted client endpoint string that speaks TLS (``ssl:``, Twisted's own ``tls:``)."""
    return isinstance(address, str) and address.lower().startswith(("ssl:", "tls:"))


def _client_limits(r: _Reader) -> ClientLimits | None:
    if r.given("rate-burst") and not r.given("rate-per-client"):
        r.problem(("rate-burst",), "{rate-burst} needs {rate-per-client}")
    return ClientLimits.from_options(
        r["max-conn-per-client"], r["rate-per-client"], r["rate-burst"]
    )


def _health(r: _Reader) -> HealthSettings | None:
    interval = r["health-interval"]
    if not interval:
        for key in ("health-timeout", "health-send", "health-expect"):
            if r.given(key):
                r.problem((key,), f"{{{key}}} needs {{health-interval}}")
        return None
    send, expect = (_unescape(r, key) for key in ("health-send", "health-expect"))
    if expect is not None and len(expect) > MAX_RESPONSE:
        r.problem(("health-expect",), f"{{health-expect}} is longer than {MAX_RESPONSE} bytes")
        return None
    return HealthSettings(
        interval=interval,
        timeout=r["health-timeout"] or min(interval, r["connect-timeout"]),
        rise=r["rise"],
        fall=r["fall"],
        send=send,
        expect=expect,
    )


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt\\])|\\")
_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}


def _unescape(r: _Reader, key: str) -> bytes | None:
    """``health-send``'s bytes: UTF-8 with ``\\r``, ``\\n``, ``\\t``, ``\\xNN`` and ``\\\\``."""
    text = r[key]
    if text is None:
        return None
    out, at = bytearray(), 0
    for found in _ESCAPE.finditer(text):
        out += text[at : found.start()].encode()
        escape = found.group(1)
        if escape is None:
            r.problem((key,), "a backslash starts \\r, \\n, \\t, \\xNN or \\\\ only")
            return None
        out += bytes([int(escape[1:], 16)]) if escape[0] == "x" else _ESCAPES[escape]
        at = found.end()
    out += text[at:].encode()
    return bytes(out)


def _policies(r: _Reader) -> tuple[ClientPolicy, TargetPolicy]:
    clients, targets = ClientPolicy(), TargetPolicy()
    try:
        clients = ClientPolicy.from_options(r["allow-client"], r["deny-client"])
    except ValueError as e:
        r.problem(("allow-client",), str(e))
    try:
        targets = TargetPolicy.from_options(r["allow-dest"], r["deny-dest"], r["allow-port"])
    except (RuleError, ValueError) as e:
        r.problem(("allow-dest",), str(e))
    return clients, targets


def _server_tls(r: _Reader) -> ServerTLSSettings | None:
    certs, keys = r["tls-cert"], r["tls-key"]
    if not certs:
        for key in SERVER_TLS_ONLY:
            if r.given(key):
                r.problem((key,), f"{{{key}}} needs {{tls-cert}}")
        return None
    if keys and len(keys) != len(certs):
        r.problem(
            ("tls-key",),
            f"{len(certs)} {{tls-cert}} but {len(keys)} {{tls-key}}: give one key per certificate,"
            " or none (keys inside the certificate files)",
        )
        return None
    alpn = tuple(p.strip().encode() for p in (r["alpn"] or "").split(",") if p.strip())
    if any(len(p) > 255 for p in alpn):
        r.problem(("alpn",), "a protocol name is at most 255 bytes")
    if r["alpn"] is not None and not alpn:
        r.problem(("alpn",), f"{{alpn}} {r['alpn']!r}: no protocol name, e.g. h2,http/1.1")
    return ServerTLSSettings(
        pairs=tuple(CertificatePair(c, k) for c, k in zip(certs, keys or certs, strict=True)),
        strict_sni=r["tls-strict-sni"],
        min_version=r["tls-min-version"],
        ciphers=r["tls-ciphers"],
        alpn=alpn,
        client_ca=r["tls-client-ca"],
        client_optional=r["tls-client-optional"],
        handshake_timeout=r["tls-handshake-timeout"],
    )


def _via(r: _Reader, mode: str, backends: Sequence[BackendSpec]) -> tuple[Via, ...]:
    """The ``via`` chain; its backends must be HOST:PORT, which the last proxy resolves.

    A problem is reported at ``via``, never at ``via[N]``: the command line
    would quote the value at fault, password and all.
    """
    chain = []
    for text in r["via"]:
        try:
            chain.append(parse_via(text))
        except ViaURLError as e:
            r.problem(("via",), str(e))
    if not chain:
        return ()
    last = chain[-1]
    if mode in ("connect", "socks5") and not backends:
        # Without --to, a proxy mode dials each client's target itself.
        r.problem(
            ("via",), f"{{via}} reaches {{to}} backends: {{mode}} {mode} needs {{to}} with it"
        )
    for spec in backends:
        if not isinstance(spec.address, HostPort):
            r.problem(("via",), f"the proxy is asked for HOST:PORT backends, not {spec.text!r}")
        elif last.kind == "socks5" and len(spec.address.host.encode()) > SOCKS5_FIELD:
            r.problem(("via",), f"a SOCKS5 proxy takes names of at most {SOCKS5_FIELD} bytes")
    if r.given("resolve-interval"):
        r.problem(("resolve-interval",), "with {via} the proxy resolves backend names")
    return tuple(chain)


def _backend_tls(
    r: _Reader, backends: Sequence[BackendSpec], via: Sequence[Via]
) -> BackendTLSSettings | None:
    # An https:// proxy's certificate is verified as a backend's is.
    if not (r["backend-tls"] or any(b.tls for b in backends) or any(v.tls for v in via)):
        for key in BACKEND_TLS_ONLY:
            if r.given(key):
                r.problem((key,), f"{{{key}}} needs a tls:HOST:PORT backend or {{backend-tls}}")
        return None
    return BackendTLSSettings(
        ca=r["backend-ca"],
        sni=r["backend-sni"],
        cert=r["backend-cert"],
        key=r["backend-key"],
        insecure=r["backend-insecure"],
        every_backend=r["backend-tls"],
    )


def build_settings(
    process: Mapping[str, Any],
    listeners: Sequence[Mapping[str, Any]],
    *,
    source: str,
    endpoint_types: frozenset[str],
    listener_path: str = "listener",
) -> Settings:
    """Settings from typed values; raises :class:`ConfigError` with every problem found."""
    problems: list[Problem] = []
    r = _Reader(process, (), problems, Scope.PROCESS)
    if r["access-log-format"] is not None and r["access-log"] is None:
        r.problem(("access-log-format",), "{access-log-format} needs {access-log}")
    if r["admin-token"] is not None and r["admin"] is None:
        r.problem(("admin-token",), "{admin-token} needs {admin}")
    admin = None
    if r["admin"] is not None:
        try:
            admin = listen_description(r["admin"])
        except AddressError as e:
            r.problem(("admin",), str(e))
    if not listeners:
        problems.append(Problem((listener_path,), "no listener: add a [[listener]] table"))
    built = []
    for index, values in enumerate(listeners):
        udp = any(is_udp(text) for text in values.get("listen", ()))
        listener = (udp_listener if udp else build_listener)(
            values,
            name=f"{listener_path}[{index}]",
            path=(listener_path, index),
            problems=problems,
            endpoint_types=endpoint_types,
        )
        if listener is not None:
            built.append(listener)
    if problems:
        raise ConfigError(problems, source)
    return Settings(
        listeners=tuple(built),
        workers=r["workers"],
        max_connections=r["max-connections"],
        drain_timeout=r["drain-timeout"],
        access_log=r["access-log"],
        access_log_format=r["access-log-format"] or "text",
        write_through=not r["no-write-through"],
        admin=admin,
        admin_token=r["admin-token"],
        source=source,
    )


def from_flags(values: Mapping[str, Any], endpoint_types: frozenset[str]) -> Settings:
    """The settings of a command line (one listener) from its typed flag values.

    Keys left at their defaults are not passed on, so a listener key cannot
    be mistaken for one that was given. Problems are reported as flags:
    ``--to 'db': ...``.
    """
    given = {
        name: value
        for name, value in values.items()
        if name in KEYS and value != KEYS[name].default and value not in (None, [], ())
    }
    process = {k: v for k, v in given.items() if KEYS[k].scope is Scope.PROCESS}
    listener = {k: v for k, v in given.items() if KEYS[k].scope is Scope.LISTENER}
    for name, value in listener.items():
        if KEYS[name].repeatable:
            listener[name] = tuple(value)
    first = (listener.get("listen") or ("",))[0]
    try:
        settings = build_settings(
            process, [listener], source="the command line", endpoint_types=endpoint_types
        )
    except ConfigError as e:
        raise ConfigError([Problem((), p.as_flag(given)) for p in e.problems]) from None
    [built] = settings.listeners
    return attrs.evolve(settings, listeners=(attrs.evolve(built, name=first),))


def udp_listener(
    values: Mapping[str, Any],
    *,
    name: str,
    path: Path,
    problems: list[Problem],
    endpoint_types: frozenset[str],
) -> ListenerSettings | None:
    """A listener whose ``listen`` values are ``udp:`` ones (:mod:`tunnelkit.udp.config`)."""
    from tunnelkit.udp import config

    before = len(problems)
    r = _Reader(values, path, problems, Scope.LISTENER)
    return config.udp_listener(r, name=name, path=path, before=before)
