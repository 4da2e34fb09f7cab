"""One name lookup per proxied request, whose answer is the only one used.

A CONNECT or SOCKS proxy must connect to exactly the addresses its policy
checked: resolving again at connect time (as ``HostnameEndpoint`` would) lets
a short-TTL name answer a public address to the check and ``127.0.0.1`` to
the connect (DNS rebinding). So the mode resolves once with a
:data:`Resolve` callable, hands the answer to the policy, and connects to the
checked addresses with plain TCP endpoints.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ``resolve(host, port)`` fires with the addresses of ``host``, in the
#: system resolver's order, or fails with :class:`ResolveError`.
Resolve = Callable[[str, int], Deferred[list[IPAddress]]]


class ResolveError(Exception):
    """The name has no usable address; the message is safe to log and show."""


def lookup(host: str, port: int) -> list[IPAddress]:
    """The addresses of ``host`` now (``getaddrinfo``, which blocks), or :class:`ResolveError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ResolveError(f"cannot resolve {host!r}: {e}") from None
    found: list[IPAddress] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if ip not in found:
                found.append(ip)
    if not found:
        raise ResolveError(f"{host!r} has no IPv4 or IPv6 address")
    return found


def system_resolver(reactor: Any) -> Resolve:
    """``getaddrinfo`` in the reactor's thread pool (it blocks)."""

    def resolve(host: str, port: int) -> Deferred[list[IPAddress]]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), lookup, host, port)

    return resolve
