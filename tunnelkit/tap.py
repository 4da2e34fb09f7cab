"""``twistd tunnelkit`` / ``twist tunnelkit``: command-line options and the service.

Every option is validated while parsing, before ``twistd`` daemonizes, and a
bad one ends the command with a one-line message and exit status 1 (twistd's
own handling would print the whole usage text first).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, serverFromString
from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
)
from twisted.plugin import getPlugins
from twisted.python import usage

from tunnelkit.addresses import HostPort, backend_address, listen_description
from tunnelkit.dialer import Backend, Dialer
from tunnelkit.forward import ForwardFactory
from tunnelkit.registry import TunnelRegistry
from tunnelkit.relay import Timeouts
from tunnelkit.service import ListenError, TunnelService, default_max_tunnels, raise_fd_limit
from tunnelkit.sockopts import DEFAULT_READ_SIZE, SocketOptions, tuned_reactor


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

    synopsis = "--listen ENDPOINT --to BACKEND [--to BACKEND ...] [options]"
    longdesc = (
        "Relay every connection accepted on --listen to the first --to backend that "
        "connects. ENDPOINT is PORT, ADDR:PORT, [V6ADDR]:PORT or any Twisted server "
        "endpoint string (tcp:, ssl:, unix:, systemd:). BACKEND is HOST:PORT, "
        "[V6ADDR]:PORT (names resolve to IPv4 and IPv6) or a client endpoint string "
        "(tcp:, tls:, unix:)."
    )
    optFlags = [
        ["nodelay", None, "Set TCP_NODELAY on both legs (the default)."],
        ["no-nodelay", None, "Leave Nagle's algorithm on."],
    ]
    optParameters = [
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
    ]

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self["listen"] = []
        self["to"] = []
        self.listeners: list[tuple[str, IStreamServerEndpoint]] = []
        self.backends: list[Backend] = []
        self.socket_options = SocketOptions()

    def opt_listen(self, value: str) -> None:
        """Where to accept clients (repeatable)."""
        self["listen"].append(value)

    def opt_to(self, value: str) -> None:
        """A backend (repeatable: tried in the order given, first that connects)."""
        self["to"].append(value)

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
        if not self["to"]:
            raise usage.UsageError("--to is required (e.g. --to 127.0.0.1:80)")
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
                return HostnameEndpoint(
                    outbound, address.host, address.port, timeout=self["connect-timeout"]
                )
            client: IStreamClientEndpoint = clientFromString(outbound, address)
            return client
        except Exception as e:
            raise usage.UsageError(f"--to {text!r}: {e}") from None


def build_service(config: Options) -> TunnelService:
    """The tunnel service for parsed options, not yet listening."""
    reactor = config.reactor
    max_tunnels = config["max-connections"] or default_max_tunnels(raise_fd_limit())
    registry = TunnelRegistry(reactor, max_tunnels)
    dialer = Dialer(config.backends, reactor, config["connect-timeout"])
    timeouts = Timeouts(idle=config["idle-timeout"] or None, fin=config["fin-timeout"] or None)

    def factory_for(listener: str) -> ForwardFactory:
        return ForwardFactory(
            listener=listener,
            dialer=dialer,
            registry=registry,
            clock=reactor,
            timeouts=timeouts,
            read_size=config.socket_options.read_size,
        )

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
