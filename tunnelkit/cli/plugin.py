"""``twistd tunnelkit`` / ``twist tunnelkit``: the command line, and the service it asks for.

The flags are made from :data:`tunnelkit.config.keys.KEYS`, the one table of
settings that the TOML file (``--config FILE``) shares, so a flag and a file
key cannot drift apart. Parsing only reads: it turns the flags (or the file)
into frozen :class:`~tunnelkit.config.model.Settings` and checks the log and
pid files twistd will write (:mod:`tunnelkit.cli.preflight`); a bad value ends
the command with one line per problem and exit status 1 (twistd's own
handling would print the whole usage text first). Nothing here installs the
reactor, opens a file or makes an endpoint: :func:`makeService` does that,
through :mod:`tunnelkit.app.build`, still before ``twistd`` daemonizes. What
parsing does decide is whether the TLS stack may load at all
(:mod:`tunnelkit.app.tls_stack`), since the reactor's import depends on it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.python import usage

from tunnelkit.app import tls_stack
from tunnelkit.cli import preflight
from tunnelkit.config import toml_file
from tunnelkit.config.keys import KEYS, TEXT, Key, Scope
from tunnelkit.config.model import ConfigError, Settings

if TYPE_CHECKING:
    from twisted.application.service import IService

#: Flags of the command line alone: they describe the run, not what is served.
_COMMAND_FLAGS = [
    ["nodelay", None, "Set TCP_NODELAY on both legs (the default)."],
    [
        "check",
        None,
        "Check the options (or --config's file), the files they name and that backend names"
        " resolve, then exit (0: configuration OK, 1: the errors); nothing listens.",
    ],
]


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


def _coerce(key: Key) -> Any:
    """``key``'s reader of a flag's text, with the sentence ``--help`` adds about it."""

    def coerce(text: str) -> Any:
        return key.kind.from_text(text)

    coerce.coerceDoc = f"Must be {key.kind.what}."  # type: ignore[attr-defined]
    return coerce


def _help(key: Key) -> str:
    return key.help + ("" if key.help.endswith(".") else ".")


def _repeatable(key: Key) -> Any:
    def option(self: Options, value: str) -> None:
        self[key.name].append(value)

    option.__doc__ = _help(key)
    return option


class Options(usage.Options):
    """Options of the ``tunnelkit`` twistd plugin: one listener, or ``--config FILE``."""

    synopsis = "--listen ENDPOINT [--mode connect] [--to BACKEND ...] [options] | --config FILE"
    longdesc = (
        "Relay every connection accepted on --listen to the first --to backend that "
        "connects, or with --mode connect to the target of an HTTP CONNECT request "
        "(loopback, private and link-local targets are refused unless --allow-dest "
        "names them). ENDPOINT is PORT (all IPv4 interfaces: reachable from every network "
        "the host is on), ADDR:PORT (e.g. 127.0.0.1:8888, this machine only), [V6ADDR]:PORT "
        "or any Twisted server endpoint string (tcp:, ssl:, unix:, systemd:). BACKEND is HOST:PORT, "
        "[V6ADDR]:PORT (names resolve to IPv4 and IPv6) or a client endpoint string "
        "(tcp:, tls:, unix:). --config FILE serves every listener of a TOML file instead"
        " (docs/config.md)."
    )
    optFlags = [[k.name, None, _help(k)] for k in KEYS.values() if k.switch] + _COMMAND_FLAGS
    optParameters = [
        # Twisted adds the coerced kind's "Must be ..." after the help's text.
        [k.name, None, k.default, k.help, None if k.kind is TEXT else _coerce(k)]
        for k in KEYS.values()
        if not (k.switch or k.repeatable)
    ] + [["config", "c", None, "Serve the listeners of this TOML file (see docs/config.md)."]]

    locals().update(
        {
            "opt_" + k.attribute: _repeatable(k)
            for k in KEYS.values()
            if k.repeatable and not k.switch
        }
    )

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        #: The reactor to serve on; ``None``: tunnelkit's, installed by :func:`makeService`.
        self.reactor = reactor
        for key in KEYS.values():
            if key.repeatable:
                self[key.name] = []
        self.settings: Settings | None = None

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

    def parseOptions(self, options: list[str] | None = None) -> None:
        #: The plugin's own arguments, as given: ``--workers`` passes them on.
        self.arguments = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            raise SystemExit(f"tunnelkit: error: {e} (see --help)") from None
        except ConfigError as e:
            raise SystemExit(self.error_lines(e)) from None

    def error_lines(self, error: ConfigError) -> str:
        """Every problem of ``error`` on its own line, as flags or as the file's key paths."""
        if error.source:
            return "\n".join(f"tunnelkit: error: {line}" for line in str(error).splitlines())
        return "\n".join(f"tunnelkit: error: {p.as_flag(self)}" for p in error.problems)

    def given(self) -> dict[str, Any]:
        """The settings' flags given on the command line, with their values."""
        return {
            name: self[name]
            for name, key in KEYS.items()
            if self[name] not in (None, [], ()) and self[name] != key.default
        }

    def postOptions(self) -> None:
        if self["nodelay"] and self["no-nodelay"]:
            raise usage.UsageError("--nodelay and --no-nodelay contradict each other")
        if self["access-log"] is not None and self["no-access-log"]:
            raise usage.UsageError("--access-log and --no-access-log contradict each other")
        document = None
        if self["config"] is not None:
            document = toml_file.read(self["config"])
            listeners = toml_file.listener_tables(document)
        elif not self["listen"]:
            raise usage.UsageError("--listen is required (e.g. --listen 8888), or --config FILE")
        else:
            listeners = [self]
        # Decided before anything imports Twisted's endpoints (and with them
        # pyOpenSSL, where it can): see tunnelkit.app.tls_stack.
        if not tls_stack.needed_by(listeners):
            tls_stack.keep_out()
        from tunnelkit.app.build import client_endpoint_types

        types = client_endpoint_types()
        if document is not None:
            self.settings = self._from_file(self["config"], document, types)
        else:
            self.settings = _from_flags(self.given(), types)
        for error in preflight.twistd_file_errors(self.parent):
            raise usage.UsageError(error)
        if self["check"]:
            self._check(self.settings)

    def _from_file(
        self, path: str, document: dict[str, Any], endpoint_types: frozenset[str]
    ) -> Settings:
        """The file's settings; flags may only add process settings the file leaves out."""
        given = self.given()
        listener_flags = [name for name in given if KEYS[name].scope is Scope.LISTENER]
        if listener_flags:
            raise usage.UsageError(
                f"--{listener_flags[0]} cannot be combined with --config: the file's"
                " [[listener]] tables say what each listener does"
            )
        twice = [name for name in given if name in document]
        if twice:
            raise usage.UsageError(f"--{twice[0]} is also set in {path}: give it in one place")
        # Checked with the file's own values, as if the file had said them.
        return toml_file.from_document({**document, **given}, path, endpoint_types)

    def _check(self, settings: Settings) -> NoReturn:
        """``--check``: load everything a start would, resolve backend names, then exit 0 or 1."""
        from tunnelkit.app.build import client_endpoint_types, prepare

        try:
            prepared = prepare(settings, self.reactor or installed_reactor())
        except ConfigError as e:
            print(self.error_lines(e), file=sys.stderr)
            raise SystemExit(1) from None
        prepared.close()
        # Behind --via the proxy resolves the backends' names: its own must resolve here.
        direct = [listener for listener in settings.listeners if not listener.via]
        types = client_endpoint_types()
        texts = [b.text for listener in direct for b in listener.backends]
        routed = [r.backend.text for listener in direct for r in listener.routes]
        errors = preflight.unresolved(preflight.named_backends(texts, types))
        errors += preflight.unresolved(preflight.named_backends(routed, types), "--route")
        errors += preflight.unresolved_proxies(
            [listener.via[0] for listener in settings.listeners if listener.via]
        )
        for error in errors:
            print(f"tunnelkit: error: {error}", file=sys.stderr)
        if errors:
            raise SystemExit(1)
        print("tunnelkit: configuration OK")
        raise SystemExit(0)


def _from_flags(given: dict[str, Any], endpoint_types: frozenset[str]) -> Settings:
    from tunnelkit.config.model import from_flags

    try:
        return from_flags(given, endpoint_types)
    except ConfigError as e:
        # from_flags renders its problems as flags already.
        raise usage.UsageError("\n".join(p.message for p in e.problems)) from None


def installed_reactor() -> Any:
    """tunnelkit's epoll reactor where there is epoll and none is installed yet."""
    try:
        from tunnelkit.app.reactor import installed
    except ImportError:  # no epoll on this system
        from twisted.internet import reactor

        return reactor
    return installed()


def makeService(config: Options) -> IService:
    """Load what the settings name, listen now (before daemonizing), return the service."""
    from tunnelkit.app.build import make_service

    assert config.settings is not None
    if config.reactor is None:
        config.reactor = installed_reactor()
    try:
        return make_service(config.settings, config.reactor, config.arguments)
    except ConfigError as e:
        print(config.error_lines(e), file=sys.stderr)
        raise SystemExit(1) from None
