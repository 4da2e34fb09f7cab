"""From settings to a serving process: load what they name, choose each listener's plane, listen.

Three steps, each with one job:

1. :func:`prepare` turns frozen :class:`~tunnelkit.config.model.Settings` into
   :class:`Prepared`: the endpoints made, certificates and password files
   read, the access log opened, and the plane of each listener chosen (the
   native engine, or Twisted and why). Every failure is a
   :class:`~tunnelkit.config.model.Problem` with its key path, all of them
   collected, so ``--check`` and a start report the same errors. Nothing
   listens yet.
2. :func:`build_service` makes, per listener, the factory that runs each
   connection through its phases (:mod:`tunnelkit.relay.phases`) and, for
   the listeners the engine takes, the engine's profile; one registry
   counts and drains every tunnel of the process.
3. :func:`make_service` listens (before ``twistd`` daemonizes, so a port in
   use is an error in the shell) and returns the service, or the supervisor
   of ``--workers``.

Imported once the settings are parsed: from here on the reactor and, when a
listener needs TLS, the TLS stack are loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
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

from tunnelkit.admin.observe import ListenerView, Observer, ProcessSource
from tunnelkit.admin.token import load_token
from tunnelkit.app import resolving, systemd
from tunnelkit.app.service import (
    ListenError,
    Listening,
    Monitor,
    TunnelService,
    default_max_tunnels,
    fd_slots,
    raise_fd_limit,
)
from tunnelkit.backends import resolver
from tunnelkit.backends.endpoints import host_endpoint
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.backends.health import HealthChecker
from tunnelkit.config.addresses import LISTEN_FORMS, HostPort
from tunnelkit.config.keys import KEYS
from tunnelkit.config.model import (
    BackendSpec,
    ConfigError,
    ListenerSettings,
    Path,
    Problem,
    Settings,
)
from tunnelkit.engine import driver
from tunnelkit.logs.tunnel_log import TunnelLog
from tunnelkit.logs.twistd_text import TwistdText
from tunnelkit.modes.auto import AutoMode, AutoModes
from tunnelkit.modes.connect import ConnectMode
from tunnelkit.modes.forward import ForwardMode
from tunnelkit.modes.proxy_route import ProxySettings
from tunnelkit.modes.sni import SniMode, SniSettings
from tunnelkit.modes.socks5 import Socks5Mode
from tunnelkit.policy.client_limits import ClientTable
from tunnelkit.policy.sni_routes import RouteMatch, SniRoutes
from tunnelkit.proxy_protocol.accept import AcceptProxyHeader
from tunnelkit.proxy_protocol.send import HeaderSender
from tunnelkit.relay import splice
from tunnelkit.relay.factory import TunnelFactory
from tunnelkit.relay.idle_watch import IdleWatch
from tunnelkit.relay.phases import Mode
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.tcp_tuning import tuned_reactor
from tunnelkit.relay.tunnel import Leg, Tunnel, TunnelRecord

if TYPE_CHECKING:
    from tunnelkit.admin.site import Source
    from tunnelkit.engine.tls import EngineTLS
    from tunnelkit.logs.access_file import AccessLogFile
    from tunnelkit.policy.htpasswd import Htpasswd
    from tunnelkit.tls.backend import BackendTLS
    from tunnelkit.tls.server import ServerTLS
    from tunnelkit.udp.sessions import UdpBackend

log = Logger(namespace="tunnelkit.tap")


def client_endpoint_types() -> frozenset[str]:
    """Prefixes ``clientFromString`` understands: built-ins and installed plugins."""
    plugins = getPlugins(IStreamClientEndpointStringParserWithReactor)
    return frozenset({"tcp", "ssl", "unix"} | {p.prefix.lower() for p in plugins})


def server_endpoint_types() -> frozenset[str]:
    """Prefixes ``serverFromString`` understands: built-ins and installed plugins."""
    plugins = getPlugins(IStreamServerEndpointStringParser)
    return frozenset({"tcp", "ssl", "unix"} | {p.prefix.lower() for p in plugins})


#: Backend values and the addresses each became (names resolved at start).
Resolved = tuple[tuple[BackendSpec, resolving.Addresses], ...]


@attrs.frozen
class LoadedRoute:
    """The backends of one SNI route: every ``route`` value with the same match, balanced."""

    match: RouteMatch
    backends: tuple[Backend, ...]
    resolved: Resolved


@attrs.frozen
class Listener:
    """One listener's settings and what was loaded for them."""

    settings: ListenerSettings
    #: ``(listen text, endpoint)`` for each ``listen`` value.
    endpoints: tuple[tuple[str, IStreamServerEndpoint], ...]
    backends: tuple[Backend, ...]
    #: Each ``to`` value and the backends it became (names resolved at start).
    resolved: tuple[tuple[BackendSpec, resolving.Addresses], ...]
    tls: ServerTLS | None
    backend_tls: BackendTLS | None
    users: Htpasswd | None
    #: Why Twisted relays this listener's tunnels; ``None``: the native engine does.
    why_twisted: str | None
    #: sni mode: the routes' backends.
    routes: tuple[LoadedRoute, ...] = ()
    #: A ``udp:`` listener's backends (tunnelkit.udp), names resolved at start.
    udp_backends: tuple[UdpBackend, ...] = ()


@attrs.frozen
class Prepared:
    """Settings with everything they name loaded: ready to build and listen."""

    settings: Settings
    listeners: tuple[Listener, ...]
    access_log: AccessLogFile | None
    reactor: Any
    #: ``admin-token``'s token (never logged).
    admin_token: bytes | None = None

    def close(self) -> None:
        """Let go of what was opened (``--check``; a worker's supervisor)."""
        if self.access_log is not None:
            self.access_log.close()


class _Problems:
    """Problems found while loading one listener, at key paths under its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found: list[Problem] = []

    def add(self, path: Path, message: str) -> None:
        self.found.append(Problem((*self.path, *path), message))


#: A flag named in a message of a loader (``--tls-cert x: ...``) becomes a key
#: reference, shown as ``tls-cert`` for a file and ``--tls-cert`` for flags.
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def _as_keys(message: str) -> str:
    return _FLAG.sub(lambda m: "{" + m[1] + "}" if m[1] in KEYS else m[0], message)


def prepare(settings: Settings, reactor: Any, *, adopting: bool = False) -> Prepared:
    """Load what ``settings`` name; :class:`ConfigError` names every problem found.

    ``adopting``: a worker of ``--workers``, which adopts its supervisor's
    listening sockets (and has none from systemd).
    """
    problems: list[Problem] = []
    listeners = []
    engine_sockets = 0
    for listener in settings.listeners:
        found = _Problems(listener.path)
        loaded = _load_listener(listener, settings, reactor, found, adopting)
        if loaded is not None and loaded.why_twisted is None:
            loaded = _within_engine(loaded, engine_sockets, found)
            engine_sockets += len(loaded.endpoints) if loaded.why_twisted is None else 0
        problems += found.found
        if loaded is not None:
            listeners.append(loaded)
    access_log = None
    if settings.access_log is not None and not problems:
        from tunnelkit.logs.access_file import AccessLogFile

        try:
            access_log = AccessLogFile(settings.access_log, settings.access_log_format)
        except OSError as e:
            problems.append(
                Problem(("access-log",), f"{{access-log}} {settings.access_log}: {e.strerror or e}")
            )
    admin_kind = settings.admin.partition(":")[0].lower() if settings.admin else None
    if admin_kind is not None and admin_kind not in server_endpoint_types():
        problems.append(Problem(("admin",), f"{{admin}}: {admin_kind!r} is not an endpoint type"))
    admin_token = None
    if settings.admin_token is not None:
        try:
            admin_token = load_token(settings.admin_token)
        except ValueError as e:
            problems.append(Problem(("admin-token",), str(e)))
    if problems:
        raise ConfigError(
            problems, "" if settings.source == "the command line" else settings.source
        )
    return Prepared(settings, tuple(listeners), access_log, reactor, admin_token)


def _load_listener(
    listener: ListenerSettings,
    settings: Settings,
    reactor: Any,
    problems: _Problems,
    adopting: bool = False,
) -> Listener | None:
    if listener.udp is not None:
        from tunnelkit.udp import build as udp

        return udp.load(listener, settings, reactor, problems)
    if listener.splice == "on" and not splice.AVAILABLE:
        problems.add(("splice",), "{splice} on: this system has no splice(2) (Linux only)")
    tls, backend_tls = _load_tls(listener, problems)
    users = _load_users(listener, problems)
    if problems.found:  # the endpoints would only repeat what is missing
        return None
    endpoints = []
    for index, text in enumerate(listener.listen):
        endpoint = _server_endpoint(reactor, listener.endpoints[index], problems, index, adopting)
        if endpoint is not None:
            endpoints.append((text, _tls_listener(listener, settings, endpoint, problems, index)))
    make_backend = _backend_maker(reactor, listener, backend_tls, settings.write_through)
    backends, resolved = _at_start(
        [(("to", index), spec) for index, spec in enumerate(listener.backends)],
        make_backend,
        problems,
        by_proxy=bool(listener.via),
    )
    routes = _load_routes(listener, make_backend, problems)
    if problems.found:
        return None
    why = _why_twisted(listener, backends, settings.write_through)
    if listener.engine == "native" and why is not None:
        problems.add(("engine",), f"{{engine}} native: {why}")
        return None
    return Listener(
        listener, tuple(endpoints), backends, resolved, tls, backend_tls, users, why, routes
    )


def _at_start(
    specs: Sequence[tuple[Path, BackendSpec]],
    make_backend: Callable[[str, BackendSpec], Backend],
    problems: _Problems,
    *,
    by_proxy: bool = False,
) -> tuple[tuple[Backend, ...], Resolved]:
    """The backends of ``specs`` (each with its key path), their names resolved now.

    ``by_proxy``: reached through ``--via``, whose proxy resolves the names.
    """
    resolved, backends = [], []
    for path, spec in specs:
        try:
            addresses = resolving.at_start(spec) if not by_proxy else ((spec.text, spec),)
            backends += [make_backend(name, each) for name, each in addresses]
            resolved.append((spec, addresses))
        except Exception as e:
            problems.add(path, str(e))
    return tuple(backends), tuple(resolved)


def _load_routes(
    listener: ListenerSettings,
    make_backend: Callable[[str, BackendSpec], Backend],
    problems: _Problems,
) -> tuple[LoadedRoute, ...]:
    """The backends of each SNI route: the ``route`` values of one match make one group."""
    grouped: dict[RouteMatch, list[tuple[Path, BackendSpec]]] = {}
    for index, route in enumerate(listener.routes):
        grouped.setdefault(route.match, []).append((("route", index), route.backend))
    return tuple(
        LoadedRoute(match, *_at_start(specs, make_backend, problems, by_proxy=bool(listener.via)))
        for match, specs in grouped.items()
    )


def _backend_maker(
    reactor: Any,
    listener: ListenerSettings,
    backend_tls: BackendTLS | None,
    write_through: bool,
) -> Callable[[str, BackendSpec], Backend]:
    """How a listener's backends are made from one address each (at start, and when names change)."""
    outbound = tuned_reactor(reactor, listener.socket_options)

    def make(name: str, spec: BackendSpec) -> Backend:
        dial = _client_endpoint(listener, outbound, spec, backend_tls, write_through)
        return Backend(name, dial, spec.weight, spec.backup)

    return make


def _within_engine(listener: Listener, taken: int, problems: _Problems) -> Listener:
    """``listener`` on Twisted's plane if its sockets would not fit the engine after ``taken``.

    One engine serves every engine listener of the process, and it takes
    a bounded number of listening sockets in all.
    """
    room = driver.listening_sockets() - taken
    if len(listener.endpoints) <= room:
        return listener
    why = (
        f"the engine takes at most {driver.listening_sockets()} listening sockets in all,"
        f" and the listeners before this one use {taken}"
    )
    if listener.settings.engine == "native":
        problems.add(("engine",), f"{{engine}} native: {why}")
    return attrs.evolve(listener, why_twisted=why)


def _why_twisted(
    listener: ListenerSettings, backends: Sequence[Backend], write_through: bool
) -> str | None:
    if listener.engine == "python":
        return "--engine python"
    return driver.why_not_native(
        mode=listener.mode,
        listen=listener.listen,
        backends=backends,
        terminates_tls=listener.tls is not None,
        backend_tls=listener.backend_tls is not None,
        write_through=write_through,
        accepts_proxy_protocol=listener.trusted_proxies is not None,
        via=bool(listener.via),
    )


def _load_tls(
    listener: ListenerSettings, problems: _Problems
) -> tuple[ServerTLS | None, BackendTLS | None]:
    if listener.tls is None and listener.backend_tls is None:
        return None, None
    # The TLS stack (pyOpenSSL, cryptography) is loaded only when TLS is used.
    from tunnelkit.tls.backend import BackendTLS
    from tunnelkit.tls.server import ServerTLS, TLSConfigError

    tls = backend_tls = None
    try:
        if listener.tls is not None:
            tls = ServerTLS(listener.tls)
        if listener.backend_tls is not None:
            backend_tls = BackendTLS(listener.backend_tls)
    except TLSConfigError as e:
        problems.add((), _as_keys(str(e)))
    return tls, backend_tls


def _load_users(listener: ListenerSettings, problems: _Problems) -> Htpasswd | None:
    if listener.auth_file is None:
        return None
    # bcrypt is loaded only by the listeners that authenticate.
    from tunnelkit.policy.htpasswd import Htpasswd, HtpasswdError

    try:
        return Htpasswd.load(listener.auth_file)
    except (OSError, HtpasswdError) as e:
        problems.add(("auth-file",), f"{{auth-file}}: {e}")
        return None


def _server_endpoint(
    reactor: Any, description: str, problems: _Problems, index: int, adopting: bool = False
) -> IStreamServerEndpoint | None:
    kind = description.partition(":")[0].lower()
    if adopting and kind == "systemd":
        return systemd.AdoptedBySupervisor(description)
    types = server_endpoint_types()
    if kind not in types:
        problems.add(
            ("listen", index),
            f"{kind!r} is not an endpoint type; give {LISTEN_FORMS}"
            f" ({', '.join(f'{t}:' for t in sorted(types))})",
        )
        return None
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    except Exception as e:
        problems.add(("listen", index), systemd.endpoint_problem(description, e))
        return None
    if isinstance(endpoint, AdoptedStreamServerEndpoint):
        wrong = systemd.passed_socket_problem(endpoint.fileno, endpoint.addressFamily)
        if wrong is not None:
            problems.add(("listen", index), wrong)
            return None
    if isinstance(endpoint, UNIXServerEndpoint):
        # Twisted's own error would name the lock file instead.
        directory = os.path.dirname(os.path.abspath(endpoint._address))
        if not os.path.isdir(directory):
            problems.add(("listen", index), f"directory {directory} does not exist")
            return None
    return endpoint


def _tls_listener(
    listener: ListenerSettings,
    settings: Settings,
    endpoint: IStreamServerEndpoint,
    problems: _Problems,
    index: int,
) -> IStreamServerEndpoint:
    """An ``ssl:`` listener is served by tunnelkit's TLS transport (see tunnelkit.tls.listener)."""
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint
    if settings.workers > 1:
        problems.add(
            ("listen", index),
            "the workers of {workers} cannot share its TLS; use {tls-cert}/{tls-key} with"
            " a tcp: listener",
        )
    if listener.tls is not None:
        problems.add(
            ("listen", index),
            "has its own certificate, and {tls-cert} would wrap it in TLS twice; with"
            " {tls-cert}, listen on a port or a tcp: endpoint",
        )
    if listener.trusted_proxies is not None:
        problems.add(
            ("listen", index),
            "reads no PROXY header before its TLS; with {accept-proxy-protocol}, use"
            " {tls-cert}/{tls-key} on a port or a tcp: endpoint",
        )
    from tunnelkit.tls.listener import SSLListener

    return SSLListener(
        endpoint,
        read_size=listener.socket_options.read_size,
        write_through=settings.write_through,
    )


def _client_endpoint(
    listener: ListenerSettings,
    outbound: Any,
    spec: BackendSpec,
    backend_tls: BackendTLS | None,
    write_through: bool,
) -> IStreamClientEndpoint:
    address = spec.address
    if spec.tls:
        assert backend_tls is not None and isinstance(address, HostPort)
        inner = _tcp_endpoint(listener, outbound, address, backend_tls, write_through)
        return _tls_endpoint(listener, inner, address.host, backend_tls, write_through)
    if isinstance(address, HostPort):
        return _tcp_endpoint(listener, outbound, address, backend_tls, write_through)
    client: IStreamClientEndpoint = clientFromString(outbound, address)
    return client


def _tcp_endpoint(
    listener: ListenerSettings,
    outbound: Any,
    address: HostPort,
    backend_tls: BackendTLS | None,
    write_through: bool,
) -> IStreamClientEndpoint:
    """TCP to ``address``: direct, or through the listener's ``--via`` proxies (docs/via.md).

    The first proxy is dialled directly; each one asks for the next (its
    TLS, for an ``https://`` one, inside the tunnel before it), and the last
    one for ``address``.
    """
    timeout, chain = listener.connect_timeout, listener.via
    if not chain:
        return host_endpoint(outbound, address.host, address.port, timeout)
    from tunnelkit.backends.via import ViaEndpoint

    endpoint = host_endpoint(outbound, chain[0].host, chain[0].port, timeout)
    targets = [*((via.host, via.port) for via in chain[1:]), (address.host, address.port)]
    for via, (host, port) in zip(chain, targets, strict=True):
        if via.tls:
            assert backend_tls is not None
            endpoint = _tls_endpoint(
                listener, endpoint, via.host, backend_tls, write_through, exact=True
            )
        endpoint = ViaEndpoint(endpoint, via, host, port)
    return endpoint


def _tls_endpoint(
    listener: ListenerSettings,
    inner: IStreamClientEndpoint,
    host: str,
    backend_tls: BackendTLS,
    write_through: bool,
    *,
    exact: bool = False,
) -> IStreamClientEndpoint:
    """TLS over ``inner``, verified for ``host`` (``exact``: never ``--backend-sni``, as for a proxy)."""
    from tunnelkit.tls.backend import TLSClientEndpoint

    return TLSClientEndpoint(
        inner,
        backend_tls.creator(host, exact=exact),
        read_size=listener.socket_options.read_size,
        write_through=write_through,
        diagnose=lambda connection, failure: backend_tls.diagnose(
            host, connection, failure, exact=exact
        ),
    )


def _proxy_settings(reactor: Any, listener: Listener, group: BackendGroup | None) -> ProxySettings:
    users = listener.users
    authenticate = None
    if users is not None:

        def authenticate(user: str, password: str) -> Deferred[bool]:
            # bcrypt takes tens of milliseconds of CPU: never on the reactor thread.
            checked: Deferred[bool] = deferToThreadPool(
                reactor, reactor.getThreadPool(), users.check, user, password
            )
            return checked

    settings = listener.settings
    return ProxySettings(
        policy=settings.targets,
        resolve=resolver.system_resolver(reactor),
        outbound=tuned_reactor(reactor, settings.socket_options),
        connect_timeout=settings.connect_timeout,
        header_timeout=settings.header_timeout,
        authenticate=authenticate,
        fixed=group,
    )


def _unlogged(record: TunnelRecord, listener: str) -> None:
    """``no-access-log``: the record of a tunnel is dropped."""


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


def _reload_tls(listeners: Sequence[Listener]) -> Callable[[], None] | None:
    servers = [listener.tls for listener in listeners if listener.tls is not None]
    if not servers:
        return None

    def reload() -> None:
        for tls in servers:
            tls.reload()

    return reload


def _handshake_leg(tls: ServerTLS) -> Callable[[Tunnel], Leg]:
    """The client leg of a listener that terminates TLS: it waits for the handshake."""
    from tunnelkit.tls.leg import HandshakeLeg

    return lambda tunnel: HandshakeLeg(tunnel, tls)


def _engine_tls(tls: ServerTLS) -> EngineTLS:
    from tunnelkit.engine.tls import EngineTLS  # only a TLS process loads pyOpenSSL

    return EngineTLS(tls)


def log_relay_plane(prepared: Prepared) -> None:
    """Say once, at start-up, who relays each listener's tunnels and why not the engine."""
    several = len(prepared.listeners) > 1
    for listener in prepared.listeners:
        why = listener.why_twisted
        engine = "the native engine" if why is None else f"Twisted, not the native engine: {why}"
        name = listener.settings.name
        log.info(
            "{listener}: relaying with {engine}" if several else "relaying with {engine}",
            event="engine",
            engine=engine,
            native=why is None,
            listener=name,
        )


def build_service(prepared: Prepared) -> TunnelService:
    """The tunnel service of ``prepared``, not yet listening."""
    reactor, settings = prepared.reactor, prepared.settings
    max_tunnels = settings.max_connections or default_max_tunnels(raise_fd_limit())
    engine_listeners = [listener for listener in prepared.listeners if listener.why_twisted is None]
    registry = (
        driver.NativeRegistry(reactor, max_tunnels)
        if engine_listeners
        else TunnelRegistry(reactor, max_tunnels)
    )
    access_log = prepared.access_log
    # The default log: twistd's own lines, a batch per write (docs/logging.md).
    tunnel_log = TunnelLog(reactor, sink=access_log if access_log is not None else TwistdText())
    relay = (
        driver.NativeRelay(reactor, registry=registry, fd_slots=fd_slots())  # type: ignore[arg-type]
        if engine_listeners
        else None
    )
    pipes: list[splice.PipePool] = []
    listening = []
    groups: list[BackendGroup] = []
    monitors: list[Monitor] = []
    observer = Observer()
    for listener in prepared.listeners:
        if listener.settings.udp is not None:
            from tunnelkit.udp import build as udp

            udp_ports, udp_checks = udp.listening(reactor, listener, registry)
            listening += udp_ports
            monitors += udp_checks
            continue
        make_factory, make_profile, group, routed = _listener_factories(
            prepared, listener, registry=registry, tunnel_log=tunnel_log, relay=relay, pipes=pipes
        )
        for route, route_group in routed:
            groups.append(route_group)
            monitors += _monitors(prepared, listener, route_group, None, route.resolved)
        profile = make_profile() if make_profile is not None else None
        if group is not None:
            groups.append(group)
            swap = (
                _engine_swap(
                    prepared, listener, group, (relay, profile, make_profile), lambda: service
                )
                if relay is not None and make_profile is not None
                else None
            )
            monitors += _monitors(prepared, listener, group, swap)
        view = ListenerView(
            listener.settings.name,
            ([("", group)] if group is not None else [])
            + [(str(route.match), each) for route, each in routed],
            profile,
            timed=settings.admin is not None,
        )
        observer.views.append(view)
        make_factory = view.factory(make_factory)
        listening += [
            Listening(name, endpoint, make_factory, listener.settings.socket_options, profile)
            for name, endpoint in listener.endpoints
        ]
        if listener.backend_tls is not None and listener.backend_tls.settings.insecure:
            log.warn(
                "--backend-insecure: backend certificates are not verified; anyone on the path"
                " can read and change the traffic",
                event="backend_insecure",
            )

    def stopped() -> None:
        if relay is not None:
            relay.close()
        tunnel_log.flush()
        if access_log is not None:
            access_log.close()
        for pool in pipes:
            pool.close()
        for group in groups:
            group.stop()

    # Named: an engine listener's swap looks its ports up in the service once started.
    service = TunnelService(
        listening,
        registry,
        settings.drain_timeout,
        reactor=reactor,
        on_reload=_on_sighup(
            ("the access log", access_log.reopen if access_log is not None else None),
            ("the TLS certificates", _reload_tls(prepared.listeners)),
        ),
        on_stopped=stopped,
        native=relay,
        monitors=monitors,
        observer=observer,
    )
    observer.service = service
    return service


def _monitors(
    prepared: Prepared,
    listener: Listener,
    group: BackendGroup,
    swap: Callable[[list[Backend]], object] | None,
    resolved: Resolved | None = None,
) -> list[Monitor]:
    """What runs beside one of ``listener``'s groups: its names resolved again, its health checks.

    ``resolved``: the group's backend values (default: the listener's ``to``).
    """
    settings = listener.settings
    health = settings.health
    resolved = listener.resolved if resolved is None else resolved
    names = any(resolving.resolvable(spec) for spec, _ in resolved)
    if names and settings.resolve_interval > 0:
        reactor = prepared.reactor
        make_backend = _backend_maker(
            reactor, settings, listener.backend_tls, prepared.settings.write_through
        )
        # The refresher owns the checks: it restarts them on each new set of backends.
        return [
            resolving.Refresher(
                group,
                resolved,
                settings.resolve_interval,
                resolve=resolver.system_resolver(reactor),
                make_backend=make_backend,
                swap=swap,
                health=health,
            )
        ]
    return [HealthChecker(group, health)] if health is not None else []


def _engine_swap(
    prepared: Prepared,
    listener: Listener,
    group: BackendGroup,
    engine: tuple[driver.NativeRelay, Any, Callable[[], Any]],
    service: Callable[[], TunnelService],
) -> Callable[[list[Backend]], None]:
    """How an engine listener takes new backends: its group's, then a new profile for new clients.

    ``engine`` is the relay, the profile the listener started with (which
    names its ports in the engine) and how to make another. Live tunnels
    keep the profile (and pool) they began with. A set the engine cannot
    serve (more backends than it takes) is refused whole.
    """
    relay, started, make_profile = engine

    def swap(backends: list[Backend]) -> None:
        why = _why_twisted(listener.settings, backends, prepared.settings.write_through)
        if why is not None:
            raise resolving.Unservable(why)
        group.replace(backends)
        profile = make_profile()
        for index in service().engine_indexes(started):
            relay.set_profile(index, profile)

    return swap


def _listener_factories(
    prepared: Prepared,
    listener: Listener,
    *,
    registry: TunnelRegistry,
    tunnel_log: TunnelLog,
    relay: driver.NativeRelay | None,
    pipes: list[splice.PipePool],
) -> tuple[
    Callable[[str], IProtocolFactory],
    Callable[[], Any] | None,
    BackendGroup | None,
    list[tuple[LoadedRoute, BackendGroup]],
]:
    """How to make the factory of each of ``listener``'s ports; its engine profiles, if any; its backends; its routes'.

    An engine profile is made of the group's backends as they are when it is
    made (again when names resolve to new addresses).
    """
    reactor, settings = prepared.reactor, listener.settings
    write_through = prepared.settings.write_through
    options = settings.socket_options
    group = (
        BackendGroup(
            listener.backends,
            reactor,
            settings.connect_timeout,
            settings.balancing,
            listener=settings.name,
        )
        if listener.backends
        else None
    )
    routed = [
        (
            route,
            BackendGroup(
                route.backends,
                reactor,
                settings.connect_timeout,
                settings.balancing,
                listener=settings.name,
            ),
        )
        for route in listener.routes
    ]
    mode = _mode(reactor, listener, group, routed, write_through)
    idle_watch = IdleWatch(reactor, settings.timeouts.idle) if settings.timeouts.idle else None
    pool = (
        splice.PipePool(
            eager=settings.splice == "on",
            read_size=options.read_size,
            slots=fd_slots(),
            live=registry.live,
            peers=pipes,  # the descriptor budget is the process's, not the listener's
        )
        if settings.splice != "off" and splice.AVAILABLE
        else None
    )
    # An auto listener terminates TLS only for the clients that begin with a ClientHello.
    tls = listener.tls if settings.mode != "auto" else None
    client_leg = _handshake_leg(tls) if tls is not None else None
    limits = settings.client_limits
    # One table per listener, whatever its endpoints (and the engine's for its profiles).
    clients = ClientTable(limits, reactor, settings.name) if limits is not None else None

    def make_factory(name: str) -> IProtocolFactory:
        factory = TunnelFactory(
            mode=mode,
            listener=name,
            registry=registry,
            clock=reactor,
            timeouts=settings.timeouts,
            idle_watch=idle_watch,
            tunnel_log=tunnel_log if settings.access_log else _unlogged,
            read_size=options.read_size,
            clients=settings.clients,
            write_through=write_through,
            pipes=pool,
            client_leg=client_leg,
            proxies=settings.trusted_proxies,
            proxy_header=HeaderSender(settings.proxy_protocol) if settings.proxy_protocol else None,
            client_limits=clients,
        )
        accept = (
            AcceptProxyHeader(
                settings.header_timeout, factory.client_allowed, factory.limit_carried
            )
            if settings.trusted_proxies is not None
            else None
        )
        if tls is None:
            factory.preamble = accept
            return factory
        from tunnelkit.tls.transport import RelayTLSFactory

        return RelayTLSFactory(
            tls,
            False,
            factory,
            read_size=options.read_size,
            write_through=write_through,
            before_tls=accept.before_tls if accept is not None else None,
        )

    make_profile = None
    if relay is not None and listener.why_twisted is None:
        assert group is not None  # the engine forwards to backends
        make_profile = partial(
            relay.profile,
            group,
            timeouts=settings.timeouts,
            connect_timeout=settings.connect_timeout,
            socket_options=options,
            splice=settings.splice if splice.AVAILABLE else "off",
            bulk_read=min(splice.BULK_READ, options.read_size),
            # --admin times every tunnel from its record, also unlogged.
            log_records=settings.access_log or prepared.settings.admin is not None,
            restricts_clients=settings.clients.restricts,
            tls=_engine_tls(tls) if tls is not None else None,
            proxy_protocol=settings.proxy_protocol,
            clients=relay.client_table(limits) if limits is not None else None,
        )
    return make_factory, make_profile, group, routed


def _mode(
    reactor: Any,
    listener: Listener,
    group: BackendGroup | None,
    routed: list[tuple[LoadedRoute, BackendGroup]],
    write_through: bool,
) -> Mode:
    """The listener's mode: what its identify and route phases do."""
    if listener.settings.mode == "auto":
        return _auto_mode(reactor, listener, group, routed, write_through)
    if listener.settings.mode == "connect":
        return ConnectMode(_proxy_settings(reactor, listener, group), reactor)
    if listener.settings.mode == "socks5":
        return Socks5Mode(_proxy_settings(reactor, listener, group), reactor)
    if listener.settings.mode == "sni":
        return _sni_mode(listener, group, routed)
    assert group is not None
    return ForwardMode(group)


def _sni_mode(
    listener: Listener, group: BackendGroup | None, routed: list[tuple[LoadedRoute, BackendGroup]]
) -> SniMode:
    routes = SniRoutes((route.match, each) for route, each in routed)
    return SniMode(SniSettings(routes, group, listener.settings.header_timeout))


def _auto_mode(
    reactor: Any,
    listener: Listener,
    group: BackendGroup | None,
    routed: list[tuple[LoadedRoute, BackendGroup]],
    write_through: bool,
) -> AutoMode:
    """One port for all: both proxies, TLS (terminated, or routed by SNI), and ``to`` for the rest.

    The proxies choose their own targets here: ``to`` is where the clients
    no mode claims go, never a fixed target for CONNECT or SOCKS5.
    """
    settings = listener.settings
    proxy = _proxy_settings(reactor, listener, None)
    upgrade = None
    if listener.tls is not None:
        from tunnelkit.tls.upgrade import TLSUpgrade

        upgrade = TLSUpgrade(
            listener.tls, read_size=settings.socket_options.read_size, write_through=write_through
        )
    modes = AutoModes(
        socks5=Socks5Mode(proxy, reactor),
        connect=ConnectMode(proxy, reactor),
        tls=_sni_mode(listener, group, routed) if routed else None,
        other=ForwardMode(group) if group is not None else None,
        upgrade=upgrade,
    )
    return AutoMode(modes, settings.detect_timeout, settings.header_timeout)


def make_service(settings: Settings, reactor: Any, arguments: Sequence[str]) -> IService:
    """Load, build and listen now (before daemonizing); the service for twistd to run."""
    prepared = prepare(settings, reactor)
    # Here, not in build_service: each worker of --workers builds one too.
    log_relay_plane(prepared)
    tunnels = build_service(prepared)
    try:
        tunnels.listen()
    except ListenError as e:
        raise ConfigError([Problem((), str(e))]) from None
    # The process systemd watches (this one, never a worker) tells it how it is doing.
    notifier = systemd.Notifier.from_environment()
    main: IService = tunnels
    assert tunnels.observer is not None
    source: Source = ProcessSource(tunnels.observer)
    if settings.workers > 1:
        from tunnelkit.app.supervisor import Workers

        # Opened only to check the path: each worker opens and writes its own.
        prepared.close()
        main = source = Workers(
            settings.workers,
            arguments,
            tunnels.ports,
            settings.drain_timeout,
            reactor,
            notifier=notifier,
            scraped=settings.admin is not None,
        )
    else:
        tunnels.notifier = notifier
    if notifier is not None:
        reactor.callWhenRunning(notifier.start_watchdog, reactor)
    if settings.admin is None:
        top = MultiService()
        main.setServiceParent(top)
        return top
    # Loaded only when used (twisted.web, prometheus_client). A refusal
    # ends the command, which closes the listeners too.
    from tunnelkit.admin.service import serve

    return serve(settings.admin, main, source, prepared.admin_token, reactor)
