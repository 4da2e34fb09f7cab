"""What a target host string denotes, and whether that address is public.

Resolvers read more than dotted quads: glibc's ``inet_aton`` (which
``getaddrinfo`` uses) takes ``127.1``, ``2130706433``, ``0x7f.1`` and
``0177.0.0.1`` as 127.0.0.1 and ``0`` as 0.0.0.0. A policy that checks only
the dotted-quad spelling can be walked around with any of these, so
:func:`classify_host` reads hosts with the same rules and returns the address
they denote; a string that merely looks numeric (``256.1.1.1``) is invalid
rather than a name to look up.

:func:`is_public` is the default destination test: ``is_global`` plus the
entries older Pythons lack, with IPv4-mapped addresses judged as IPv4 and
6to4, NAT64 and Teredo addresses also judged by the IPv4 address they carry.
Everything here is pure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class InvalidHost(ValueError):
    """A target host that is neither a usable address nor a plain DNS name."""


# Not globally reachable, although is_global says otherwise on some Pythons
# (3.11's tables predate these IANA entries; 3.12.4+ fixed part of them).
_NOT_GLOBAL_V4 = (
    IPv4Network("192.0.0.0/24"),  # IETF protocol assignments (RFC 6890)
    IPv4Network("224.0.0.0/4"),  # multicast: meaningless for TCP
)
_NOT_GLOBAL_V6 = (
    IPv6Network("::/96"),  # unspecified, loopback, deprecated IPv4-compatible (RFC 4291)
    IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
    IPv6Network("fec0::/10"),  # site-local, deprecated (RFC 3879)
    IPv6Network("3fff::/20"),  # documentation (RFC 9637)
    IPv6Network("5f00::/16"),  # SRv6 SIDs (RFC 9602)
    IPv6Network("ff00::/8"),  # multicast
)
_NAT64 = IPv6Network("64:ff9b::/96")  # well-known prefix (RFC 6052)

#: One DNS label, lower-cased.
HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
#: A last label that makes a host numeric: decimal, octal or hex (``0x``).
NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"), 16: frozenset("0123456789abcdef")}


def inet_aton(text: str) -> IPv4Address | None:
    """Read ``text`` as C ``inet_aton`` does, or return ``None``.

    One to four dot-separated parts, each decimal, octal (leading ``0``) or hex
    (``0x``); the last part fills the remaining bytes: ``127.1`` is 127.0.0.1,
    ``2130706433`` and ``0x7f000001`` too. glibc's ``getaddrinfo`` accepts the
    same forms, which is why the policy must understand them.
    """
    parts = text.lower().split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if part.startswith("0x"):
            digits, base = part[2:], 16
        elif part.startswith("0") and len(part) > 1:
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        if not digits or not set(digits) <= _DIGITS[base]:
            return None
        values.append(int(digits, base))
    *head, last = values
    if any(value > 255 for value in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = 0
    for value in head:
        number = number << 8 | value
    return IPv4Address(number << (8 * (4 - len(head))) | last)


def plain_address(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address is the IPv4 address the kernel will reach."""
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def embedded_ipv4(ip: IPAddress) -> list[IPv4Address]:
    """IPv4 addresses an IPv6 address carries through a translator or tunnel."""
    if isinstance(ip, IPv4Address):
        return []
    found: list[IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public(ip: IPAddress) -> bool:
    """True if ``ip`` is globally reachable: the only default-allowed destinations."""
    ip = plain_address(ip)
    if isinstance(ip, IPv4Address):
        extra: Sequence[IPNetwork] = _NOT_GLOBAL_V4
    else:
        extra = _NOT_GLOBAL_V6
    if not ip.is_global or any(ip in net for net in extra):
        return False
    return all(is_public(v4) for v4 in embedded_ipv4(ip))


def classify_host(host: str) -> IPAddress | str:
    """The address a target host denotes, or its normalized DNS name.

    IPv6 literals (no brackets, no zone) and every ``inet_aton`` form become
    addresses; IPv4-mapped IPv6 becomes IPv4. Anything else must be a DNS name
    of letters, digits, ``-`` and ``_`` labels; it is returned lower-cased
    without a trailing dot. A name whose last label is numeric is refused
    unless it is an ``inet_aton`` address: no real top-level domain is numeric,
    and passing such strings to a resolver invites surprises.
    Raises :class:`InvalidHost`.
    """
    if ":" in host:
        try:
            v6 = IPv6Address(host)
        except ValueError:
            raise InvalidHost("not an IPv6 address") from None
        if v6.scope_id is not None:
            raise InvalidHost("IPv6 zone identifiers are not accepted")
        return plain_address(v6)
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise InvalidHost("not a host name")
    if NUMERIC_LABEL.fullmatch(labels[-1]):
        address = inet_aton(name)
        if address is None:
            raise InvalidHost("numeric host that is not an address")
        return address
    return name
