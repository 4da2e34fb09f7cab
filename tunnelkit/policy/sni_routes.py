"""Which backend a TLS client goes to, by the server name (and ALPN offer) of its ClientHello.

``--route NAME[,alpn=PROTOCOL]=BACKEND`` says where clients go (see
docs/sni.md). ``NAME`` is an exact host name (``api.example.com``), a
wildcard of every name under a domain at any depth (``*.example.com``
matches ``a.example.com`` and ``a.b.example.com``, not ``example.com``,
as nginx's ``map`` and HAProxy's ``-m end`` do), or ``*`` for every name a
client sends. Names compare without regard to case or a trailing dot, and
an internationalized name may be written in Unicode (it is matched as its
``xn--`` form, which is what clients send).

When several routes match, the most specific wins, independent of the order
they were given in:

1. a route whose ALPN protocol the client offers beats every route without
   one (``*,alpn=acme-tls/1`` takes ACME's TLS-ALPN-01 challenges of every
   name, whatever the name routes);
2. then the most specific name: exact, then the longest wildcard domain,
   then ``*``;
3. among ALPN routes of the same name, the protocol the client prefers
   (listed first).

A client without SNI matches no route. This module is pure: the table maps
matches to whatever the caller routes to (backend groups), and is tested
without sockets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

import attrs

T = TypeVar("T")

#: Every name, in a route.
ANY = "*"

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_ROUTE = re.compile(r"(?P<name>[^=,]*)(?:,alpn=(?P<alpn>[^=,]*))?=(?P<backend>.*)", re.DOTALL)
#: What an ALPN protocol may be written as: printable ASCII without spaces, ``,`` or ``=``.
_PROTOCOL = re.compile(r"[!-+\--<>-~]{1,255}")


class RouteError(ValueError):
    """A ``--route`` value that cannot be understood; the message says why."""


@attrs.frozen
class RouteMatch:
    """What one route matches: a server name pattern, and an ALPN protocol the client must offer."""

    #: A lower-case host name, ``*.`` and a domain, or ``*``.
    name: str
    alpn: bytes | None = None

    def __str__(self) -> str:
        """As a route is written (the access log's ``route`` field)."""
        if self.alpn is None:
            return self.name
        return f"{self.name},alpn={self.alpn.decode('ascii')}"


def parse_route(text: str) -> tuple[RouteMatch, str]:
    """``NAME[,alpn=PROTOCOL]=BACKEND``: what it matches, and the backend as written."""
    found = _ROUTE.fullmatch(text.strip())
    if found is None:
        raise RouteError(
            f"{text!r}: give NAME=BACKEND or NAME,alpn=PROTOCOL=BACKEND"
            " (e.g. api.example.com=10.0.0.5:443)"
        )
    name = route_name(found["name"])
    alpn = found["alpn"]
    if alpn is not None and not _PROTOCOL.fullmatch(alpn):
        raise RouteError(
            f"alpn={alpn!r}: an ALPN protocol is 1 to 255 printable ASCII characters"
            " without spaces, commas or '=' (e.g. h2, http/1.1, acme-tls/1)"
        )
    backend = found["backend"].strip()
    if not backend:
        raise RouteError(f"{text!r}: no backend after '='")
    return RouteMatch(name, None if alpn is None else alpn.encode("ascii")), backend


def route_name(text: str) -> str:
    """A route's name pattern, checked and in the form clients' names are compared with."""
    name = text.strip()
    if name == ANY:
        return ANY
    wildcard = name.startswith("*.")
    domain = normal_name(name[2:] if wildcard else name)
    if domain is None:
        raise RouteError(
            f"{text!r} is not a host name, *.DOMAIN or *"
            " (letters, digits, '-' and '_' in labels of 1 to 63, dot-separated)"
        )
    return f"*.{domain}" if wildcard else domain


def normal_name(name: str) -> str | None:
    """``name`` lower-cased, without a trailing dot, Unicode as ``xn--``; ``None`` if not a host name."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


@attrs.frozen
class _Level(Generic[T]):
    """The routes of one name pattern: without an ALPN condition, and by protocol."""

    plain: tuple[RouteMatch, T] | None
    by_alpn: dict[bytes, tuple[RouteMatch, T]]


class SniRoutes(Generic[T]):
    """The routing table of an SNI listener: ``pick`` finds the route of a ClientHello."""

    def __init__(self, routes: Iterable[tuple[RouteMatch, T]]) -> None:
        plain: dict[str, tuple[RouteMatch, T]] = {}
        by_alpn: dict[str, dict[bytes, tuple[RouteMatch, T]]] = {}
        for match, target in routes:
            if match.alpn is None:
                if match.name in plain:
                    raise RouteError(f"two routes for {match}: give them as one")
                plain[match.name] = (match, target)
            else:
                protocols = by_alpn.setdefault(match.name, {})
                if match.alpn in protocols:
                    raise RouteError(f"two routes for {match}: give them as one")
                protocols[match.alpn] = (match, target)
        self._levels = {
            name: _Level(plain.get(name), by_alpn.get(name, {})) for name in {*plain, *by_alpn}
        }

    def __len__(self) -> int:
        return sum(
            (level.plain is not None) + len(level.by_alpn) for level in self._levels.values()
        )

    def pick(
        self, server_name: str | None, offered: Sequence[bytes] = ()
    ) -> tuple[RouteMatch, T] | None:
        """The route of a client that sent ``server_name`` and offered ``offered``; ``None``: none matches."""
        if server_name is None:
            return None
        name = normal_name(server_name)
        if name is None:
            return None
        levels = [level for pattern in _patterns(name) if (level := self._levels.get(pattern))]
        for level in levels:
            for protocol in offered:
                if protocol in level.by_alpn:
                    return level.by_alpn[protocol]
        for level in levels:
            if level.plain is not None:
                return level.plain
        return None


def _patterns(name: str) -> list[str]:
    """The patterns that match ``name``, most specific first: itself, ``*.`` each parent, ``*``."""
    labels = name.split(".")
    return [name, *(f"*.{'.'.join(labels[i:])}" for i in range(1, len(labels))), ANY]
