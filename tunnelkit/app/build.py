"""The tunnel service for parsed options: endpoints, factories, shared state.

Imported once the options are parsed (see :mod:`tunnelkit.cli.plugin`): from here on
the reactor and, when the options ask for TLS, the TLS stack are loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    UNIXServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import (
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python import usage

from tunnelkit.app.service import TunnelService, default_max_tunnels, fd_slots, raise_fd_limit
from tunnelkit.backends.dialer import Backend, Dialer, host_endpoint
from tunnelkit.backends.resolver import system_resolver
from tunnelkit.config.addresses import (
    LISTEN_FORMS,
    AddressError,
    HostPort,
    backend_address,
    listen_description,
    tls_host_port,
)
from tunnelkit.engine import driver
from tunnelkit.logs.tunnel_log import TunnelLog
from tunnelkit.modes.connect import ConnectFactory, ConnectSettings
from tunnelkit.modes.forward import ForwardFactory
from tunnelkit.relay import splice
from tunnelkit.relay.factory import TunnelFactory
from tunnelkit.relay.idle_watch import IdleWatch
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.tcp_tuning import tuned_reactor
from tunnelkit.relay.tunnel import Timeouts, TunnelRecord

if TYPE_CHECKING:
    from tunnelkit.cli.plugin import Options
    from tunnelkit.engine.tls import EngineTLS
    from tunnelkit.tls.server import ServerTLS

log = Logger(namespace="tunnelkit.tap")


def client_endpoint_types() -> frozenset[str]:
    """Prefixes ``clientFromString`` understands: built-ins and installed plugins."""
    plugins = getPlugins(IStreamClientEndpointStringParserWithReactor)
    return frozenset({"tcp", "ssl", "unix"} | {p.prefix.lower() for p in plugins})


def server_endpoint_types() -> frozenset[str]:
    """Prefixes ``serverFromString`` understands: built-ins and installed plugins."""
    plugins = getPlugins(IStreamServerEndpointStringParser)
    return frozenset({"tcp", "ssl", "unix"} | {p.prefix.lower() for p in plugins})


def open_endpoints(config: Options) -> None:
    """Make the listeners' and backends' endpoints of ``config`` (nothing listens or connects yet)."""
    config.listeners = [
        (text, _tls_listener(config, text, _server_endpoint(config, text)))
        for text in config["listen"]
    ]
    outbound = tuned_reactor(config.reactor, config.socket_options)
    types = client_endpoint_types()
    config.backends = [
        Backend(text, _client_endpoint(config, outbound, text, types)) for text in config["to"]
    ]


def _server_endpoint(config: Options, text: str) -> IStreamServerEndpoint:
    try:
        description = listen_description(text)
        kind = description.partition(":")[0].lower()
        types = server_endpoint_types()
        if kind not in types:
            raise AddressError(
                f"{kind!r} is not an endpoint type; give {LISTEN_FORMS}"
                f" ({', '.join(f'{t}:' for t in sorted(types))})"
            )
        endpoint: IStreamServerEndpoint = serverFromString(config.reactor, description)
    except Exception as e:
        raise usage.UsageError(f"--listen {text!r}: {e}") from None
    if isinstance(endpoint, UNIXServerEndpoint):
        _check_socket_directory(text, endpoint._address)
    return endpoint


def _check_socket_directory(text: str, path: str) -> None:
    """A ``unix:`` listener's directory must exist: Twisted's error names its lock file instead."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise usage.UsageError(f"--listen {text!r}: directory {directory} does not exist")


def _tls_listener(
    config: Options, text: str, endpoint: IStreamServerEndpoint
) -> IStreamServerEndpoint:
    """An ``ssl:`` listener is served by tunnelkit's TLS transport (see tunnelkit.tls.listener)."""
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint
    if config["workers"] > 1:
        raise usage.UsageError(
            f"--workers: the workers cannot share the TLS of --listen {text!r};"
            " use --tls-cert/--tls-key with a tcp: listener"
        )
    if config.tls is not None:
        raise usage.UsageError(
            f"--listen {text!r} has its own certificate, and --tls-cert would wrap it in TLS"
            " twice; with --tls-cert, listen on a port or a tcp: endpoint"
        )
    from tunnelkit.tls.listener import SSLListener

    return SSLListener(
        endpoint,
        read_size=config.socket_options.read_size,
        write_through=not config["no-write-through"],
    )


def _client_endpoint(
    config: Options, outbound: Any, text: str, types: frozenset[str]
) -> IStreamClientEndpoint:
    try:
        address = backend_address(text, types)
        tls_target = tls_host_port(text)
        if tls_target is not None or (config["backend-tls"] and isinstance(address, HostPort)):
            return _tls_endpoint(config, outbound, tls_target or address)
        if isinstance(address, HostPort):
            return host_endpoint(outbound, address.host, address.port, config["connect-timeout"])
        client: IStreamClientEndpoint = clientFromString(outbound, address)
        return client
    except Exception as e:
        raise usage.UsageError(f"--to {text!r}: {e}") from None


def _tls_endpoint(config: Options, outbound: Any, address: Any) -> IStreamClientEndpoint:
    from tunnelkit.tls.backend import TLSClientEndpoint

    assert config.backend_tls is not None and isinstance(address, HostPort)
    inner = host_endpoint(outbound, address.host, address.port, config["connect-timeout"])
    backend_tls, host = config.backend_tls, address.host
    return TLSClientEndpoint(
        inner,
        backend_tls.creator(host),
        read_size=config.socket_options.read_size,
        write_through=not config["no-write-through"],
        diagnose=lambda connection, failure: backend_tls.diagnose(host, connection, failure),
    )


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


def _unlogged(record: TunnelRecord, listener: str) -> None:
    """``--no-access-log``: the record of a tunnel is dropped."""


def _on_sighup(*actions: tuple[str, Callable[[], object] | None]) -> Callable[[], None]:
    """What SIGHUP does: each named action that is given, in turn, after one line saying which.

    SIGHUP's default action ends the process, and logrotate and systemd's
    ``ExecReload`` send it routinely, so it is always handled: a process with
    nothing to reload says so and goes on serving.
    """
    chosen = [(name, action) for name, action in actions if action is not None]

    def reload() -> None:
        if not chosen:
            log.info("SIGHUP: nothing to reload", event="sighup", reloading=[])
            return
        names = [name for name, _ in chosen]
        log.info(
            "SIGHUP: reloading {what}", event="sighup", what=" and ".join(names), reloading=names
        )
        for _, action in chosen:
            action()

    return reload


def _engine_tls(tls: ServerTLS) -> EngineTLS:
    from tunnelkit.engine.tls import EngineTLS  # only a TLS process loads pyOpenSSL

    return EngineTLS(tls)


def why_twisted(config: Options) -> str | None:
    """Why Twisted relays for ``config``; ``None`` when the native engine does."""
    if config["engine"] == "python":
        return "--engine python"
    return driver.why_not_native(
        mode=config["mode"],
        listen=config["listen"],
        backends=config.backends,
        terminates_tls=config.tls is not None,
        backend_tls=config.backend_tls is not None,
        write_through=not config["no-write-through"],
    )


def log_relay_plane(config: Options) -> None:
    """Say once, at start-up, who relays the tunnels and why not the engine."""
    why = why_twisted(config)
    log.info(
        "relaying with {engine}",
        event="engine",
        engine="the native engine" if why is None else f"Twisted, not the native engine: {why}",
        native=why is None,
    )


def build_service(config: Options) -> TunnelService:
    """The tunnel service for parsed options, not yet listening."""
    reactor = config.reactor
    max_tunnels = config["max-connections"] or default_max_tunnels(raise_fd_limit())
    use_native = why_twisted(config) is None
    registry = (
        driver.NativeRegistry(reactor, max_tunnels)
        if use_native
        else TunnelRegistry(reactor, max_tunnels)
    )
    dialer = (
        Dialer(config.backends, reactor, config["connect-timeout"]) if config.backends else None
    )
    timeouts = Timeouts(
        idle=config["idle-timeout"] or None,
        fin=config["fin-timeout"] or None,
        half_close=not config["no-half-close"],
    )
    idle_watch = IdleWatch(reactor, timeouts.idle) if timeouts.idle else None
    access_log = config.access_log
    tunnel_log = TunnelLog(reactor) if access_log is None else TunnelLog(reactor, sink=access_log)
    settings = _connect_settings(config, dialer) if config["mode"] == "connect" else None
    pipes = (
        splice.PipePool(
            eager=config["splice"] == "on",
            read_size=config.socket_options.read_size,
            slots=fd_slots(),
            live=registry.live,
        )
        if config["splice"] != "off" and splice.AVAILABLE
        else None
    )

    def factory_for(listener: str) -> IProtocolFactory:
        common: dict[str, Any] = {
            "listener": listener,
            "registry": registry,
            "clock": reactor,
            "timeouts": timeouts,
            "idle_watch": idle_watch,
            "tunnel_log": _unlogged if config["no-access-log"] else tunnel_log,
            "read_size": config.socket_options.read_size,
            "clients": config.clients,
            "write_through": not config["no-write-through"],
            "pipes": pipes,
        }
        if config.tls is not None:
            return _terminate_tls(config, common)
        return mode_factory(common)

    def mode_factory(common: dict[str, Any]) -> TunnelFactory:
        if settings is not None:
            return ConnectFactory(settings=settings, **common)
        assert dialer is not None
        return ForwardFactory(dialer=dialer, **common)

    def _terminate_tls(config: Options, common: dict[str, Any]) -> IProtocolFactory:
        from tunnelkit.tls.leg import HandshakeLeg
        from tunnelkit.tls.transport import RelayTLSFactory

        tls = config.tls
        assert tls is not None
        factory = mode_factory({**common, "client_leg": lambda tunnel: HandshakeLeg(tunnel, tls)})
        return RelayTLSFactory(
            tls,
            False,
            factory,
            read_size=common["read_size"],
            write_through=common["write_through"],
        )

    if config.backend_tls is not None and config.backend_tls.settings.insecure:
        log.warn(
            "--backend-insecure: backend certificates are not verified; anyone on the path"
            " can read and change the traffic",
            event="backend_insecure",
        )

    relay = (
        driver.NativeRelay(reactor, registry=registry, fd_slots=fd_slots())  # type: ignore[arg-type]
        if use_native
        else None
    )
    profile = (
        relay.profile(
            config.backends,
            timeouts=timeouts,
            connect_timeout=config["connect-timeout"],
            socket_options=config.socket_options,
            splice=config["splice"] if splice.AVAILABLE else "off",
            bulk_read=min(splice.BULK_READ, config.socket_options.read_size),
            log_records=not config["no-access-log"],
            restricts_clients=config.clients.restricts,
            tls=_engine_tls(config.tls) if config.tls is not None else None,
        )
        if relay is not None
        else None
    )

    def stopped() -> None:
        if relay is not None:
            relay.close()
        tunnel_log.flush()
        if access_log is not None:
            access_log.close()
        if pipes is not None:
            pipes.close()

    return TunnelService(
        config.listeners,
        factory_for,
        registry,
        config.socket_options,
        config["drain-timeout"],
        reactor=reactor,
        on_reload=_on_sighup(
            ("the access log", access_log.reopen if access_log is not None else None),
            ("the TLS certificates", config.tls.reload if config.tls is not None else None),
        ),
        on_stopped=stopped,
        native=relay,
        native_profile=profile,
    )
