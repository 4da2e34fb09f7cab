"""The tunnel service for parsed options: endpoints, factories, shared state.

Imported once the options are parsed (see :mod:`tunnelkit.tap`): from here on
the reactor and, when the options ask for TLS, the TLS stack are loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, clientFromString, serverFromString
from twisted.internet.interfaces import (
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python import usage

from tunnelkit import native, splice
from tunnelkit.addresses import HostPort, backend_address, listen_description, tls_host_port
from tunnelkit.connect_mode import ConnectFactory, ConnectSettings
from tunnelkit.dialer import Backend, Dialer, host_endpoint
from tunnelkit.forward import ForwardFactory
from tunnelkit.idle_watch import IdleWatch
from tunnelkit.listener import TunnelFactory
from tunnelkit.registry import TunnelRegistry
from tunnelkit.relay import Timeouts, TunnelRecord
from tunnelkit.resolver import system_resolver
from tunnelkit.service import TunnelService, default_max_tunnels, fd_slots, raise_fd_limit
from tunnelkit.sockopts import tuned_reactor
from tunnelkit.tunnel_log import TunnelLog

if TYPE_CHECKING:
    from tunnelkit.native_tls import EngineTLS
    from tunnelkit.tap import Options
    from tunnelkit.tls_server import ServerTLS

log = Logger(namespace="tunnelkit.tap")


def client_endpoint_types() -> frozenset[str]:
    """Prefixes ``clientFromString`` understands: built-ins and installed plugins."""
    plugins = getPlugins(IStreamClientEndpointStringParserWithReactor)
    return frozenset({"tcp", "ssl", "unix"} | {p.prefix.lower() for p in plugins})


def open_endpoints(config: Options) -> None:
    """Make the listeners' and backends' endpoints of ``config`` (nothing listens or connects yet)."""
    config.listeners = [(text, _server_endpoint(config, text)) for text in config["listen"]]
    for text, endpoint in config.listeners:
        if config["workers"] > 1 and isinstance(endpoint, SSL4ServerEndpoint):
            raise usage.UsageError(
                f"--workers: the workers cannot share the TLS of --listen {text!r};"
                " use --tls-cert/--tls-key with a tcp: listener"
            )
    outbound = tuned_reactor(config.reactor, config.socket_options)
    types = client_endpoint_types()
    config.backends = [
        Backend(text, _client_endpoint(config, outbound, text, types)) for text in config["to"]
    ]


def _server_endpoint(config: Options, text: str) -> IStreamServerEndpoint:
    try:
        endpoint: IStreamServerEndpoint = serverFromString(config.reactor, listen_description(text))
        return endpoint
    except Exception as e:
        raise usage.UsageError(f"--listen {text!r}: {e}") from None


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
    from tunnelkit.tls_backend import TLSClientEndpoint

    assert config.backend_tls is not None and isinstance(address, HostPort)
    inner = host_endpoint(outbound, address.host, address.port, config["connect-timeout"])
    return TLSClientEndpoint(
        inner,
        config.backend_tls.creator(address.host),
        read_size=config.socket_options.read_size,
        write_through=not config["no-write-through"],
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


def _on_sighup(*actions: Callable[[], object] | None) -> Callable[[], None] | None:
    """What SIGHUP does: each of ``actions`` that is given, in turn; ``None`` if none is."""
    chosen = [action for action in actions if action is not None]
    if not chosen:
        return None

    def reload() -> None:
        for action in chosen:
            action()

    return reload


def _engine_tls(tls: ServerTLS) -> EngineTLS:
    from tunnelkit.native_tls import EngineTLS  # only a TLS process loads pyOpenSSL

    return EngineTLS(tls)


def build_service(config: Options) -> TunnelService:
    """The tunnel service for parsed options, not yet listening."""
    reactor = config.reactor
    max_tunnels = config["max-connections"] or default_max_tunnels(raise_fd_limit())
    why_python = (
        "--engine python" if config["engine"] == "python" else native.why_not_native(config)
    )
    use_native = why_python is None
    log.info(
        "relaying with {engine}",
        event="engine",
        engine="the native engine" if use_native else f"Twisted ({why_python})",
        native=use_native,
    )
    registry = (
        native.NativeRegistry(reactor, max_tunnels)
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
        from tunnelkit.tls_leg import HandshakeLeg
        from tunnelkit.tls_transport import RelayTLSFactory

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
        native.NativeRelay(
            reactor,
            config.backends,
            registry=registry,  # type: ignore[arg-type]
            timeouts=timeouts,
            connect_timeout=config["connect-timeout"],
            socket_options=config.socket_options,
            splice=config["splice"] if splice.AVAILABLE else "off",
            bulk_read=min(splice.BULK_READ, config.socket_options.read_size),
            log_records=not config["no-access-log"],
            restricts_clients=config.clients.restricts,
            tls=_engine_tls(config.tls) if config.tls is not None else None,
            fd_slots=fd_slots(),
        )
        if use_native
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
            access_log.reopen if access_log is not None else None,
            config.tls.reload if config.tls is not None else None,
        ),
        on_stopped=stopped,
        native=relay,
    )
