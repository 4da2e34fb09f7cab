"""Short forms for listen and backend addresses.

Users type ``8888``, ``127.0.0.1:8888`` or ``[::1]:8888`` far more often than
Twisted endpoint strings, so both ``--listen`` and ``--to`` accept those short
forms and pass everything else to Twisted's endpoint parsers unchanged. This
module is pure (no reactor): it only decides which of the two a string is.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

#: Listen backlog of every listener whose string does not give one. Twisted's
#: default of 50 is marginal for connection bursts (socat's backlog of 5 pushed
#: its p99 past a second in the peer benchmarks); the kernel caps it at
#: ``somaxconn`` anyway. ``backlog=N`` in an endpoint string sets it per listener.
DEFAULT_BACKLOG = 1024

#: Endpoint types that take a ``backlog`` parameter (``systemd:`` sockets already listen).
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})
_HAS_BACKLOG = re.compile(r"(?<!\\):backlog=", re.IGNORECASE)

_PORT = r"(?P<port>\d{1,5})"
_V6 = re.compile(r"^\[(?P<host>[0-9A-Fa-f:.%\w-]+)\]:" + _PORT + "$")
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9._-]+):" + _PORT + "$")
_BARE_PORT = re.compile(r"^" + _PORT + "$")
_NO_HOST = re.compile(r"^:" + _PORT + "$")
_NO_PORT = re.compile(r"^(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.%\w-]*\]):$")

#: What ``--listen`` accepts, for messages.
LISTEN_FORMS = "PORT (all IPv4 interfaces), ADDR:PORT, [V6ADDR]:PORT or an endpoint string"


class AddressError(ValueError):
    """A listen or backend address that cannot be understood."""


def _port(text: str, *, allow_zero: bool) -> int:
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise AddressError(f"port {port} is out of range ({low}-65535)")
    return port


def _escape(value: str) -> str:
    """Escape ``:`` and ``\\`` the way Twisted's endpoint-string parser expects."""
    return value.replace("\\", "\\\\").replace(":", "\\:")


def listen_description(text: str) -> str:
    """Turn a ``--listen`` value into a Twisted server endpoint string.

    ``8888`` listens on all IPv4 addresses, ``ADDR:8888`` on one IPv4 address
    (``localhost`` meaning 127.0.0.1) and ``[V6]:8888`` on one IPv6 address.
    Anything else is taken to be an endpoint string already; ``tcp:``,
    ``tcp6:``, ``ssl:`` and ``unix:`` ones get ``backlog=1024`` unless they
    say otherwise. A short form with its address or port left out
    (``:8888``, ``127.0.0.1:``) is an error that says so, not an unknown
    endpoint type.
    """
    text = text.strip()
    if not text:
        raise AddressError("empty listen address")
    if m := _NO_HOST.match(text):
        raise AddressError(
            f"no address before the port: {m['port']} listens on all IPv4 interfaces,"
            f" 127.0.0.1:{m['port']} on the loopback one only"
        )
    if m := _NO_PORT.match(text):
        raise AddressError(f"no port after {m['host']} (e.g. {m['host']}:8888)")
    if m := _BARE_PORT.match(text):
        port = _port(m["port"], allow_zero=True)
        return f"tcp:{port}:backlog={DEFAULT_BACKLOG}"
    if m := _V6.match(text):
        host = m["host"]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"{host!r} is not an IPv6 address") from None
        port = _port(m["port"], allow_zero=True)
        return f"tcp6:{port}:interface={_escape(host)}:backlog={DEFAULT_BACKLOG}"
    if m := _HOST_PORT.match(text):
        host = "127.0.0.1" if m["host"] == "localhost" else m["host"]
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            # Not an address: it is an endpoint type such as "tcp:8888".
            return _with_backlog(text)
        port = _port(m["port"], allow_zero=True)
        return f"tcp:{port}:interface={host}:backlog={DEFAULT_BACKLOG}"
    return _with_backlog(text)


def wildcard_scope(host: str | None) -> str:
    """``"; all IPv4 interfaces"`` for a listener bound to 0.0.0.0 (``"; all interfaces"`` for ::), else ``""``.

    ``--listen 8888`` reaches every network the host is on; the start-up line says so.
    """
    if host == "0.0.0.0":
        return "; all IPv4 interfaces"
    if host == "::":
        return "; all interfaces"
    return ""


def _with_backlog(description: str) -> str:
    """``description`` with ``backlog=`` :data:`DEFAULT_BACKLOG` if its type takes one and it has none."""
    kind = description.partition(":")[0].lower()
    if kind not in _BACKLOG_TYPES or _HAS_BACKLOG.search(description):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


@attrs.frozen
class HostPort:
    """A backend given as ``host:port``: resolved to IPv4 and IPv6 at connect time."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def backend_address(text: str, endpoint_types: frozenset[str]) -> HostPort | str:
    """Split a ``--to`` value into a short form or a client endpoint string.

    ``endpoint_types`` are the lower-cased prefixes Twisted's client parsers
    know (``tcp``, ``tls``, ``unix``, plugins...): ``tcp:80`` is the endpoint
    type ``tcp``, never a host called "tcp".
    """
    text = text.strip()
    if not text:
        raise AddressError("empty backend address")
    if m := _V6.match(text):
        try:
            ipaddress.IPv6Address(m["host"].split("%", 1)[0])
        except ValueError:
            raise AddressError(f"{m['host']!r} is not an IPv6 address") from None
        return HostPort(m["host"], _port(m["port"], allow_zero=False))
    if (m := _HOST_PORT.match(text)) and m["host"].lower() not in endpoint_types:
        return HostPort(m["host"], _port(m["port"], allow_zero=False))
    prefix = text.split(":", 1)[0].lower()
    if ":" not in text or prefix not in endpoint_types:
        raise AddressError(
            f"{text!r} is neither host:port, [v6]:port nor a client endpoint string"
            f" ({', '.join(sorted(endpoint_types))})"
        )
    return text


def tls_host_port(text: str) -> HostPort | None:
    """``tls:HOST:PORT`` or ``tls:[V6]:PORT`` as a host and port; ``None`` for anything else.

    Other ``tls:`` strings (with Twisted's ``trustRoots=``, ``certificate=``
    ... arguments) are left to Twisted's own endpoint parser.
    """
    if text[:4].lower() != "tls:":
        return None
    try:
        address = backend_address(text[4:], frozenset())
    except AddressError:
        return None
    return address if isinstance(address, HostPort) else None


#: The prefix of UDP listen and backend addresses (``udp:5353``, ``udp:10.0.0.2:53``).
UDP_PREFIX = "udp:"


def is_udp(text: str) -> bool:
    """Whether a ``listen`` or ``to`` value is a UDP one (``udp:...``)."""
    return text.strip()[: len(UDP_PREFIX)].lower() == UDP_PREFIX


def udp_listen_address(text: str) -> tuple[str, int]:
    """``udp:PORT`` (all IPv4 interfaces), ``udp:HOST:PORT`` or ``udp:[V6]:PORT`` as (interface, port).

    The same short forms as TCP listeners, behind ``udp:``; ``localhost``
    means 127.0.0.1. Raises :class:`AddressError`.
    """
    rest = text.strip()[len(UDP_PREFIX) :]
    if m := _BARE_PORT.match(rest):
        return "0.0.0.0", _port(m["port"], allow_zero=True)
    if m := _V6.match(rest):
        host = m["host"]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"{host!r} is not an IPv6 address") from None
        return host, _port(m["port"], allow_zero=True)
    if m := _HOST_PORT.match(rest):
        host = "127.0.0.1" if m["host"] == "localhost" else m["host"]
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise AddressError(f"{host!r} is not an IPv4 address (IPv6: udp:[V6]:PORT)") from None
        return host, _port(m["port"], allow_zero=True)
    raise AddressError(f"{text!r}: give udp:PORT, udp:ADDR:PORT or udp:[V6ADDR]:PORT")


def udp_backend_address(text: str) -> HostPort:
    """``udp:HOST:PORT`` or ``udp:[V6]:PORT`` as a host (a name or an address) and port."""
    address = backend_address(text.strip()[len(UDP_PREFIX) :], frozenset())
    assert isinstance(address, HostPort)  # no endpoint type is allowed
    return address
