"""``twistd tunnelkit`` / ``twist tunnelkit``: command-line options and the service.

Every option is validated while parsing, before ``twistd`` daemonizes, and a
bad one ends the command with a one-line message and exit status 1 (twistd's
own handling would print the whole usage text first).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
)
from twisted.internet.threads import deferToThreadPool
from twisted.plugin import getPlugins
from twisted.python import usage

from tunnelkit.addresses import HostPort, backend_address, listen_description
from tunnelkit.connect_mode import ConnectFactory, ConnectSettings
from tunnelkit.dialer import Backend, Dialer, host_endpoint
from tunnelkit.forward import ForwardFactory
from tunnelkit.listener import TunnelFactory
from tunnelkit.registry import TunnelRegistry
from tunnelkit.relay import Timeouts
from tunnelkit.resolver import system_resolver
from tunnelkit.service import ListenError, TunnelService, default_max_tunnels, raise_fd_limit
from tunnelkit.sockopts import DEFAULT_READ_SIZE, SocketOptions, tuned_reactor
from tunnelkit.target_policy import ClientPolicy, TargetPolicy

if TYPE_CHECKING:
    from tunnelkit.htpasswd import Htpasswd

#: The values of ``--mode``.
MODES = ("forward", "connect")


def _number(kind: Callable[[str], Any], low: float, what: str) -> Callable[[str], Any]:
    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {what}") from None
        if value < low:
            raise ValueError(f"{text!r} is below {low:g}")
        return value

    coerce.coerceDoc = f"Must be {what}."  # type: ignore[attr-defined]
    return coerce


_seconds = _number(float, 0, "a number of seconds")
_positive_seconds = _number(float, 0.001, "a positive number of seconds")
_bytes = _number(int, 1, "a positive whole number of bytes")
_count = _number(int, 1, "a positive whole number")


def client_endpoint_types() -> frozenset[str]:
    """Prefixes ``clientFromString`` understands: built-ins and installed plugins."""
    plugins = getPlugins(IStreamClientEndpointStringParserWithReactor)
    return frozenset({"tcp", "ssl", "unix"} | {p.prefix.lower() for p in plugins})


class Options(usage.Options):
    """Options of the ``tunnelkit`` twistd plugin."""

    synopsis = "--listen ENDPOINT [--mode connect] [--to BACKEND ...] [options]"
    longdesc = (
        "Relay every connection accepted on --listen to the first --to backend that "
        "connects, or with --mode connect to the target of an HTTP CONNECT request "
        "(loopback, private and link-local targets are refused unless --allow-dest "
        "names them). ENDPOINT is PORT, ADDR:PORT, [V6ADDR]:PORT or any Twisted server "
        "endpoint string (tcp:, ssl:, unix:, systemd:). BACKEND is HOST:PORT, "
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
    ]
    optParameters = [
        ["mode", "m", "forward", "forward (relay to --to) or connect (HTTP CONNECT proxy)."],
        ["keepalive", None, None, "TCP keepalive idle time, seconds (off by default).", _count],
        ["sndbuf", None, None, "SO_SNDBUF for both legs, bytes (kernel default).", _bytes],
        ["rcvbuf", None, None, "SO_RCVBUF for both legs, bytes (kernel default).", _bytes],
        ["mss", None, None, "TCP_MAXSEG, the TCP segment size for both legs, bytes.", _bytes],
        ["read-size", None, DEFAULT_READ_SIZE, "Bytes read per event on each leg.", _bytes],
        ["connect-timeout", None, 10.0, "Seconds to connect to a backend.", _positive_seconds],
        [
            "idle-timeout",
            None,
            3600.0,
            "Close a tunnel that moved no byte this long (0: never).",
            _seconds,
        ],
        [
            "fin-timeout",
            None,
            60.0,
            "Longest a half-closed tunnel may linger (0: no limit).",
            _seconds,
        ],
        ["drain-timeout", None, 30.0, "On SIGTERM, seconds to let tunnels finish.", _seconds],
        [
            "max-connections",
            None,
            None,
            "Most tunnels at once (default: what the file-descriptor limit allows).",
            _count,
        ],
        [
            "header-timeout",
            None,
            10.0,
            "connect mode: seconds from accept to the end of the request head.",
            _positive_seconds,
        ],
        [
            "auth-file",
            None,
            None,
            "connect mode: htpasswd file of bcrypt entries (htpasswd -B, tunnelkit passwd).",
        ],
    ]

    #: Repeatable options that only a proxy mode (which chooses targets) uses.
    _PROXY_ONLY = ("allow-dest", "deny-dest", "allow-port", "auth-file")

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        for name in ("listen", "to", "allow-dest", "deny-dest", "allow-port"):
            self[name] = []
        self["allow-client"] = []
        self["deny-client"] = []
        self.listeners: list[tuple[str, IStreamServerEndpoint]] = []
        self.backends: list[Backend] = []
        self.socket_options = SocketOptions()
        self.clients = ClientPolicy()
        self.targets = TargetPolicy()
        self.users: Htpasswd | None = None

    def opt_listen(self, value: str) -> None:
        """Where to accept clients (repeatable)."""
        self["listen"].append(value)

    def opt_to(self, value: str) -> None:
        """A backend (repeatable: tried in the order given, first that connects)."""
        self["to"].append(value)

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
        if self["mode"] == "forward":
            if not self["to"]:
                raise usage.UsageError("--to is required (e.g. --to 127.0.0.1:80)")
            for name in self._PROXY_ONLY:
                if self[name]:
                    raise usage.UsageError(f"--{name} applies to --mode connect only")
        self._policies()
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        self.socket_options = SocketOptions(
            nodelay=not self["no-nodelay"],
            keepalive=self["keepalive"],
            sndbuf=self["sndbuf"],
            rcvbuf=self["rcvbuf"],
            mss=self["mss"],
            read_size=self["read-size"],
        )
        self.listeners = [(text, self._server_endpoint(text)) for text in self["listen"]]
        outbound = tuned_reactor(self.reactor, self.socket_options)
        types = client_endpoint_types()
        self.backends = [
            Backend(text, self._client_endpoint(outbound, text, types)) for text in self["to"]
        ]

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
            from tunnelkit.htpasswd import Htpasswd, HtpasswdError

            try:
                self.users = Htpasswd.load(self["auth-file"])
            except (OSError, HtpasswdError) as e:
                raise usage.UsageError(f"--auth-file: {e}") from None

    def _server_endpoint(self, text: str) -> IStreamServerEndpoint:
        try:
            endpoint: IStreamServerEndpoint = serverFromString(
                self.reactor, listen_description(text)
            )
            return endpoint
        except Exception as e:
            raise usage.UsageError(f"--listen {text!r}: {e}") from None

    def _client_endpoint(
        self, outbound: Any, text: str, types: frozenset[str]
    ) -> IStreamClientEndpoint:
        try:
            address = backend_address(text, types)
            if isinstance(address, HostPort):
                return host_endpoint(outbound, address.host, address.port, self["connect-timeout"])
            client: IStreamClientEndpoint = clientFromString(outbound, address)
            return client
        except Exception as e:
            raise usage.UsageError(f"--to {text!r}: {e}") from None


def _connect_settings(config: Options, dialer: Dialer | None) -> ConnectSettings:
    reactor = config.reactor
    users = config.users
    authenticate = None
    if users is not None:

        def authenticate(user: str, password: str) -> Deferred[bool]:
            # bcrypt takes tens of milliseconds of CPU: never on the reactor thread.
            checked: Deferred[bool] = deferToThreadPool(
                reactor, reactor.getThreadPool(), users.check, user, password
            )
            return checked

    return ConnectSettings(
        policy=config.targets,
        resolve=system_resolver(reactor),
        outbound=tuned_reactor(reactor, config.socket_options),
        connect_timeout=config["connect-timeout"],
        header_timeout=config["header-timeout"],
        authenticate=authenticate,
        fixed=dialer,
    )


def build_service(config: Options) -> TunnelService:
    """The tunnel service for parsed options, not yet listening."""
    reactor = config.reactor
    max_tunnels = config["max-connections"] or default_max_tunnels(raise_fd_limit())
    registry = TunnelRegistry(reactor, max_tunnels)
    dialer = (
        Dialer(config.backends, reactor, config["connect-timeout"]) if config.backends else None
    )
    timeouts = Timeouts(idle=config["idle-timeout"] or None, fin=config["fin-timeout"] or None)
    settings = _connect_settings(config, dialer) if config["mode"] == "connect" else None

    def factory_for(listener: str) -> TunnelFactory:
        common: dict[str, Any] = {
            "listener": listener,
            "registry": registry,
            "clock": reactor,
            "timeouts": timeouts,
            "read_size": config.socket_options.read_size,
            "clients": config.clients,
            "write_through": not config["no-write-through"],
        }
        if settings is not None:
            return ConnectFactory(settings=settings, **common)
        assert dialer is not None
        return ForwardFactory(dialer=dialer, **common)

    return TunnelService(
        config.listeners,
        factory_for,
        registry,
        config.socket_options,
        config["drain-timeout"],
        reactor=reactor,
    )


def makeService(config: Options) -> IService:
    """Listen now (before daemonizing) and return the service for twistd to run."""
    tunnels = build_service(config)
    try:
        tunnels.listen()
    except ListenError as e:
        print(f"tunnelkit: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    top = MultiService()
    tunnels.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
