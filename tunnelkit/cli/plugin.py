"""``twistd tunnelkit`` / ``twist tunnelkit``: command-line options and the service.

Every option is validated while parsing, before ``twistd`` daemonizes, and a
bad one ends the command with a one-line message and exit status 1 (twistd's
own handling would print the whole usage text first); so are the log and pid
files twistd itself will write (:mod:`tunnelkit.cli.preflight`). This module imports
nothing of the reactor: whether the TLS stack may load is decided from the
options first (:mod:`tunnelkit.app.tls_stack`); the service is built by
:mod:`tunnelkit.app.build`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.application.service import IService, MultiService
from twisted.python import usage

from tunnelkit.app import tls_stack
from tunnelkit.cli import preflight
from tunnelkit.policy.targets import ClientPolicy, TargetPolicy
from tunnelkit.relay import splice
from tunnelkit.relay.socket_options import DEFAULT_READ_SIZE, SocketOptions

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamServerEndpoint

    from tunnelkit.backends.dialer import Backend
    from tunnelkit.logs.access_file import AccessLogFile
    from tunnelkit.policy.htpasswd import Htpasswd
    from tunnelkit.tls.backend import BackendTLS
    from tunnelkit.tls.server import ServerTLS, ServerTLSSettings

#: The values of ``--mode``.
MODES = ("forward", "connect")

#: The most ``--workers``: more processes than this only compete for the cores.
MAX_WORKERS = 256

#: The values of ``--engine``.
ENGINE_CHOICES = ("auto", "native", "python")

#: The values of ``--splice``.
SPLICE_CHOICES = ("auto", "on", "off")


def _number(
    kind: Callable[[str], Any], low: float, what: str, high: float | None = None
) -> Callable[[str], Any]:
    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise ValueError(f"must be {what}, not {text!r}")
        return value

    coerce.coerceDoc = f"Must be {what}."  # type: ignore[attr-defined]
    return coerce


_seconds = _number(float, 0, "a number of seconds (0 or more)")
_positive_seconds = _number(float, 0.001, "a positive number of seconds")
_whole_seconds = _number(int, 1, "a positive whole number of seconds")
_bytes = _number(int, 1, "a positive whole number of bytes")
_count = _number(int, 1, "a positive whole number")


class _NamedParameter(usage.CoerceParameter):
    """A coerced option whose bad value is reported with the option's name.

    Twisted's own says ``Parameter type enforcement failed: '-1' is below
    0.001``, naming no option.
    """

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}: {e}") from None


class Options(usage.Options):
    """Options of the ``tunnelkit`` twistd plugin."""

    synopsis = "--listen ENDPOINT [--mode connect] [--to BACKEND ...] [options]"
    longdesc = (
        "Relay every connection accepted on --listen to the first --to backend that "
        "connects, or with --mode connect to the target of an HTTP CONNECT request "
        "(loopback, private and link-local targets are refused unless --allow-dest "
        "names them). ENDPOINT is PORT (all IPv4 interfaces: reachable from every network "
        "the host is on), ADDR:PORT (e.g. 127.0.0.1:8888, this machine only), [V6ADDR]:PORT "
        "or any Twisted server endpoint string (tcp:, ssl:, unix:, systemd:). BACKEND is HOST:PORT, "
        "[V6ADDR]:PORT (names resolve to IPv4 and IPv6) or a client endpoint string "
        "(tcp:, tls:, unix:)."
    )
    optFlags = [
        ["nodelay", None, "Set TCP_NODELAY on both legs (the default)."],
        ["no-nodelay", None, "Leave Nagle's algorithm on."],
        [
            "no-write-through",
            None,
            "Always queue writes in Twisted (diagnostics; slower): see docs/performance.md.",
        ],
        [
            "no-access-log",
            None,
            "Log no tunnel_closed event per connection (other events are still logged).",
        ],
        [
            "no-half-close",
            None,
            "Close both sides at the first EOF, as nginx's proxy_half_close off does"
            " (default: pass the EOF on and keep the other way open).",
        ],
        ["tls-strict-sni", None, "Refuse TLS clients whose SNI name no --tls-cert serves."],
        [
            "tls-client-optional",
            None,
            "With --tls-client-ca: accept clients without a certificate.",
        ],
        ["backend-tls", None, "TLS to every HOST:PORT backend (see docs/tls.md)."],
        [
            "backend-insecure",
            None,
            "Do not verify backend certificates (warns: traffic can be read and changed).",
        ],
        [
            "check",
            None,
            "Check the options, the files they name and that backend names resolve, then exit"
            " (0: configuration OK, 1: the errors); nothing listens.",
        ],
    ]
    optParameters = [
        ["mode", "m", "forward", "forward (relay to --to) or connect (HTTP CONNECT proxy)."],
        [
            "splice",
            None,
            "auto",
            "Move bytes in the kernel with splice(2) (plain TCP/UNIX legs, Linux): auto"
            " (tunnels that move bulk data), on (every tunnel; fails where splice is"
            " missing), off.",
        ],
        [
            "engine",
            None,
            "auto",
            "Who relays plain forwarding: auto (the native engine where the options allow"
            " it), native (insist), python (always Twisted); see docs/performance.md.",
        ],
        [
            "access-log",
            None,
            None,
            "Write the tunnel_closed records to this file instead of twistd's log (reopened"
            " on SIGHUP); see docs/logging.md.",
        ],
        ["access-log-format", None, None, "Lines of --access-log: text (the default) or json."],
        [
            "keepalive",
            None,
            None,
            "TCP keepalive idle time, seconds (off by default)",
            _whole_seconds,
        ],
        ["sndbuf", None, None, "SO_SNDBUF for both legs, bytes (kernel default)", _bytes],
        ["rcvbuf", None, None, "SO_RCVBUF for both legs, bytes (kernel default)", _bytes],
        ["mss", None, None, "TCP_MAXSEG, the TCP segment size for both legs, bytes", _bytes],
        ["read-size", None, DEFAULT_READ_SIZE, "Bytes read per event on each leg", _bytes],
        ["connect-timeout", None, 10.0, "Seconds to connect to a backend", _positive_seconds],
        [
            "idle-timeout",
            None,
            3600.0,
            "Close a tunnel that moved no byte this long (0: never)",
            _seconds,
        ],
        [
            "fin-timeout",
            None,
            60.0,
            "Longest a half-closed tunnel may linger (0: no limit)",
            _seconds,
        ],
        ["drain-timeout", None, 30.0, "On SIGTERM, seconds to let tunnels finish", _seconds],
        [
            "workers",
            None,
            1,
            "Processes accepting on the listeners (one core each), supervised by this one",
            _number(int, 1, f"a whole number from 1 to {MAX_WORKERS}", MAX_WORKERS),
        ],
        [
            "max-connections",
            None,
            None,
            "Most tunnels at once (default: what the file-descriptor limit allows)",
            _count,
        ],
        [
            "header-timeout",
            None,
            10.0,
            "connect mode: seconds from accept to the end of the request head",
            _positive_seconds,
        ],
        [
            "auth-file",
            None,
            None,
            "connect mode: htpasswd file of bcrypt entries (htpasswd -B, tunnelkit passwd).",
        ],
        ["tls-min-version", None, "1.2", "Oldest TLS version accepted from clients: 1.2 or 1.3."],
        ["tls-ciphers", None, None, "OpenSSL cipher list for TLS 1.2 clients."],
        [
            "alpn",
            None,
            None,
            "ALPN protocols offered to clients, e.g. http/1.1 (offer h2 only if every backend"
            " speaks HTTP/2: tunnelkit does not translate).",
        ],
        ["tls-client-ca", None, None, "Require client certificates signed by a CA in this file."],
        [
            "tls-handshake-timeout",
            None,
            10.0,
            "Seconds a TLS client has to complete its handshake",
            _positive_seconds,
        ],
        ["backend-ca", None, None, "CA file backend certificates must chain to (default: system)."],
        [
            "backend-sni",
            None,
            None,
            "SNI name sent to TLS backends and checked in their certificate.",
        ],
        ["backend-cert", None, None, "Client certificate presented to TLS backends."],
        ["backend-key", None, None, "Key of --backend-cert (default: read from that file)."],
    ]

    #: Repeatable options that only a proxy mode (which chooses targets) uses.
    _PROXY_ONLY = ("allow-dest", "deny-dest", "allow-port", "auth-file")

    #: Options that mean nothing without --tls-cert.
    _SERVER_TLS_ONLY = (
        "tls-key",
        "tls-strict-sni",
        "tls-ciphers",
        "alpn",
        "tls-client-ca",
        "tls-client-optional",
    )

    #: Options that mean nothing without a TLS backend.
    _BACKEND_TLS_ONLY = (
        "backend-ca",
        "backend-sni",
        "backend-cert",
        "backend-key",
        "backend-insecure",
    )

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        for name in (
            "listen",
            "to",
            "allow-dest",
            "deny-dest",
            "allow-port",
            "tls-cert",
            "tls-key",
        ):
            self[name] = []
        self["allow-client"] = []
        self["deny-client"] = []
        self.listeners: list[tuple[str, IStreamServerEndpoint]] = []
        self.backends: list[Backend] = []
        self.socket_options = SocketOptions()
        self.clients = ClientPolicy()
        self.targets = TargetPolicy()
        self.users: Htpasswd | None = None
        self.tls: ServerTLS | None = None
        self.backend_tls: BackendTLS | None = None
        self.access_log: AccessLogFile | None = None

    def _gather_parameters(self) -> tuple[Any, ...]:
        # Every value option reports a bad value with its name (_NamedParameter).
        *gathered, dispatch = super()._gather_parameters()  # type: ignore[no-untyped-call]
        named = {name: _NamedParameter(self, d.coerce) for name, d in dispatch.items()}  # type: ignore[no-untyped-call]
        return (*gathered, named)

    def opt_version(self) -> NoReturn:
        """Print tunnelkit's version (and Twisted's) and exit."""
        from importlib.metadata import version

        from twisted import copyright

        print(f"tunnelkit {version('tunnelkit')}")
        print(f"Twisted {copyright.version}")
        raise SystemExit(0)

    def opt_listen(self, value: str) -> None:
        """Where to accept clients (repeatable); a bare PORT listens on all IPv4 interfaces."""
        self["listen"].append(value)

    def opt_to(self, value: str) -> None:
        """A backend (repeatable: tried in the order given, first that connects)."""
        self["to"].append(value)

    def opt_tls_cert(self, value: str) -> None:
        """Terminate TLS with this certificate (chain) file (repeatable: chosen by SNI)."""
        self["tls-cert"].append(value)

    def opt_tls_key(self, value: str) -> None:
        """The key of the --tls-cert at the same position (default: in the certificate file)."""
        self["tls-key"].append(value)

    def opt_allow_dest(self, value: str) -> None:
        """connect mode: allow targets matching CIDR, NAME or *.DOMAIN, optionally :PORT[-PORT] (repeatable; overrides the refusal of private addresses)."""
        self["allow-dest"].append(value)

    def opt_deny_dest(self, value: str) -> None:
        """connect mode: refuse targets matching this rule (repeatable; beats --allow-dest)."""
        self["deny-dest"].append(value)

    def opt_allow_port(self, value: str) -> None:
        """connect mode: only these target ports, PORT or PORT-PORT (repeatable; default: all)."""
        self["allow-port"].append(value)

    def opt_allow_client(self, value: str) -> None:
        """Only clients from this address or CIDR may connect (repeatable)."""
        self["allow-client"].append(value)

    def opt_deny_client(self, value: str) -> None:
        """Clients from this address or CIDR are closed at once (repeatable)."""
        self["deny-client"].append(value)

    def parseOptions(self, options: list[str] | None = None) -> None:
        #: The plugin's own arguments, as given: ``--workers`` passes them on.
        self.arguments = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            raise SystemExit(f"tunnelkit: error: {e} (see --help)") from None

    def postOptions(self) -> None:
        if self["nodelay"] and self["no-nodelay"]:
            raise usage.UsageError("--nodelay and --no-nodelay contradict each other")
        if not self["listen"]:
            raise usage.UsageError("--listen is required (e.g. --listen 8888)")
        if self["mode"] not in MODES:
            raise usage.UsageError(f"--mode must be one of {', '.join(MODES)}")
        self._performance()
        if self["mode"] == "forward":
            if not self["to"]:
                raise usage.UsageError("--to is required (e.g. --to 127.0.0.1:80)")
            for name in self._PROXY_ONLY:
                if self[name]:
                    raise usage.UsageError(f"--{name} applies to --mode connect only")
        self._policies()
        self.socket_options = SocketOptions(
            nodelay=not self["no-nodelay"],
            keepalive=self["keepalive"],
            sndbuf=self["sndbuf"],
            rcvbuf=self["rcvbuf"],
            mss=self["mss"],
            read_size=self["read-size"],
        )
        # Decided before anything imports the reactor (twisted.internet.tcp
        # imports pyOpenSSL when it can): see tunnelkit.app.tls_stack.
        if not tls_stack.needed(self["listen"], self["to"], self.tls_options_given()):
            tls_stack.keep_out()
        self._tls()
        if self.reactor is None:
            self.reactor = _reactor()
        from tunnelkit.app.build import open_endpoints

        open_endpoints(self)
        if self["engine"] == "native":
            from tunnelkit.app.build import why_twisted

            why = why_twisted(self)
            if why is not None:
                raise usage.UsageError(f"--engine native: {why}")
        self._access_log()
        self._preflight()

    def _preflight(self) -> None:
        """twistd's log and pid files now, before it daemonizes; with --check, the rest, and exit."""
        for error in preflight.twistd_file_errors(self.parent):
            raise usage.UsageError(error)
        if self["check"]:
            self._check()

    def _check(self) -> NoReturn:
        """``--check``: what only the network can tell (backend names), then exit 0 or 1."""
        from tunnelkit.app.build import client_endpoint_types

        if self.access_log is not None:
            self.access_log.close()
        names = preflight.named_backends(self["to"], client_endpoint_types())
        errors = preflight.unresolved(names)
        for error in errors:
            print(f"tunnelkit: error: {error}", file=sys.stderr)
        if errors:
            raise SystemExit(1)
        print("tunnelkit: configuration OK")
        raise SystemExit(0)

    def tls_options_given(self) -> bool:
        """Whether any option asks for TLS towards clients or backends."""
        return bool(self["tls-cert"] or self["backend-tls"])

    def _performance(self) -> None:
        if self["splice"] not in SPLICE_CHOICES:
            raise usage.UsageError(f"--splice must be one of {', '.join(SPLICE_CHOICES)}")
        if self["splice"] == "on" and not splice.AVAILABLE:
            raise usage.UsageError("--splice on: this system has no splice(2) (Linux only)")
        if self["engine"] not in ENGINE_CHOICES:
            raise usage.UsageError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}")

    def _access_log(self) -> None:
        """Open --access-log now: a path that cannot be written fails here, before daemonizing."""
        from tunnelkit.logs.access_file import FORMATS, AccessLogFile

        path, fmt = self["access-log"], self["access-log-format"]
        if fmt is not None and fmt not in FORMATS:
            raise usage.UsageError(f"--access-log-format must be one of {', '.join(FORMATS)}")
        if path is None:
            if fmt is not None:
                raise usage.UsageError("--access-log-format needs --access-log")
            return
        if self["no-access-log"]:
            raise usage.UsageError("--access-log and --no-access-log contradict each other")
        try:
            self.access_log = AccessLogFile(path, fmt or FORMATS[0])
        except OSError as e:
            raise usage.UsageError(f"--access-log {path}: {e.strerror or e}") from None

    def _policies(self) -> None:
        try:
            self.clients = ClientPolicy.from_options(self["allow-client"], self["deny-client"])
            self.targets = TargetPolicy.from_options(
                self["allow-dest"], self["deny-dest"], self["allow-port"]
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["auth-file"] is not None:
            # bcrypt is loaded only by the listeners that authenticate.
            from tunnelkit.policy.htpasswd import Htpasswd, HtpasswdError

            try:
                self.users = Htpasswd.load(self["auth-file"])
            except (OSError, HtpasswdError) as e:
                raise usage.UsageError(f"--auth-file: {e}") from None

    def _tls(self) -> None:
        if not self["tls-cert"]:
            for name in self._SERVER_TLS_ONLY:
                if self[name]:
                    raise usage.UsageError(f"--{name} needs --tls-cert")
        tls_backends = self["backend-tls"] or any(text[:4].lower() == "tls:" for text in self["to"])
        if not tls_backends:
            for name in self._BACKEND_TLS_ONLY:
                if self[name]:
                    raise usage.UsageError(
                        f"--{name} needs a tls:HOST:PORT backend or --backend-tls"
                    )
        if self["tls-min-version"] not in ("1.2", "1.3"):
            raise usage.UsageError("--tls-min-version must be 1.2 or 1.3")
        if not (self["tls-cert"] or tls_backends):
            return
        # The TLS stack (pyOpenSSL, cryptography) is loaded only when TLS is used.
        from tunnelkit.tls.backend import BackendTLS, BackendTLSSettings
        from tunnelkit.tls.server import ServerTLS, TLSConfigError

        try:
            if self["tls-cert"]:
                self.tls = ServerTLS(self._server_tls_settings())
            if tls_backends:
                self.backend_tls = BackendTLS(
                    BackendTLSSettings(
                        ca=self["backend-ca"],
                        sni=self["backend-sni"],
                        cert=self["backend-cert"],
                        key=self["backend-key"],
                        insecure=self["backend-insecure"],
                    )
                )
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _server_tls_settings(self) -> ServerTLSSettings:
        from tunnelkit.tls.server import CertificatePair, ServerTLSSettings

        certs, keys = self["tls-cert"], self["tls-key"]
        if keys and len(keys) != len(certs):
            raise usage.UsageError(
                f"{len(certs)} --tls-cert but {len(keys)} --tls-key: give one key per"
                " certificate, or none (keys inside the certificate files)"
            )
        alpn = tuple(p.strip().encode() for p in (self["alpn"] or "").split(",") if p.strip())
        if any(len(p) > 255 for p in alpn):
            raise usage.UsageError("--alpn: a protocol name is at most 255 bytes")
        if self["alpn"] is not None and not alpn:
            raise usage.UsageError(f"--alpn {self['alpn']!r}: no protocol name, e.g. h2,http/1.1")
        return ServerTLSSettings(
            pairs=tuple(CertificatePair(c, k) for c, k in zip(certs, keys or certs, strict=True)),
            strict_sni=bool(self["tls-strict-sni"]),
            min_version=self["tls-min-version"],
            ciphers=self["tls-ciphers"],
            alpn=alpn,
            client_ca=self["tls-client-ca"],
            client_optional=bool(self["tls-client-optional"]),
            handshake_timeout=self["tls-handshake-timeout"],
        )


def _reactor() -> Any:
    """tunnelkit's epoll reactor where there is epoll and none is installed yet."""
    try:
        from tunnelkit.app.reactor import installed
    except ImportError:  # no epoll on this system
        from twisted.internet import reactor

        return reactor
    return installed()


def makeService(config: Options) -> IService:
    """Listen now (before daemonizing) and return the service for twistd to run."""
    from tunnelkit.app.build import build_service, client_endpoint_types, log_relay_plane
    from tunnelkit.app.service import ListenError
    from tunnelkit.backends.resolver import system_resolver

    # Here, not in build_service: each worker of --workers builds one too.
    log_relay_plane(config)
    tunnels = build_service(config)
    try:
        tunnels.listen()
    except ListenError as e:
        print(f"tunnelkit: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    names = preflight.named_backends(config["to"], client_endpoint_types())
    if names:
        resolve = system_resolver(config.reactor)
        config.reactor.callWhenRunning(preflight.warn_unresolved, resolve, names)
    top = MultiService()
    if config["workers"] > 1:
        from tunnelkit.app.supervisor import Workers

        if config.access_log is not None:
            # Opened only to check the path: each worker opens and writes its own.
            config.access_log.close()

        workers = Workers(
            config["workers"],
            config.arguments,
            tunnels.ports,
            config["drain-timeout"],
            config.reactor,
        )
        workers.setServiceParent(top)  # type: ignore[no-untyped-call]
    else:
        tunnels.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
