"""PROXY protocol headers (HAProxy's proxy-protocol.txt, versions 1 and 2) as bytes to send.

A backend behind tunnelkit sees tunnelkit's address as its peer; a header
written before any payload tells it the real client's address and the
address the client connected to, as HAProxy's ``send-proxy`` and
``send-proxy-v2`` do. The engine builds the same bytes in C
(``proxy_header()`` in ``engine/_engine.c``); tests hold the two against
each other.

Addresses are ``(host, port)`` pairs. A pair that is not an IP address (a
UNIX socket's peer), or two of different families, cannot be said: version
1 then sends ``PROXY UNKNOWN`` and version 2 a ``LOCAL`` header, which tell
the receiver to use the connection's own addresses (HAProxy does the same).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

#: The 12 bytes every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: Version 2 commands (the low nibble of the 13th byte; the high one is the version, 2).
LOCAL, PROXY = 0x20, 0x21
#: Version 2 address families and transports (the 14th byte).
UNSPEC, TCP4, TCP6 = 0x00, 0x11, 0x21

#: TLV types tunnelkit sends (proxy-protocol.txt section 2.2).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
#: Bits of the SSL TLV's ``client`` byte.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

Address = tuple[str, int]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(address: Address | None) -> IP | None:
    """The IP address of ``address`` (a zone index dropped), ``None`` if it is not one."""
    if address is None:
        return None
    try:
        return ipaddress.ip_address(address[0].split("%", 1)[0])
    except ValueError:
        return None


def _pair(source: Address | None, destination: Address | None) -> tuple[IP, IP] | None:
    """Both addresses as IPs of one family, or ``None`` when they cannot be said."""
    src, dst = _ip(source), _ip(destination)
    if src is None or dst is None:
        return None
    if src.version != dst.version:
        # A dual-stack socket's IPv4 peer: both said as IPv6, as HAProxy does.
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    return src, dst


def v1(source: Address | None, destination: Address | None) -> bytes:
    """The version 1 (text) header: ``PROXY TCP4 src dst sport dport\\r\\n``."""
    pair = _pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    assert source is not None and destination is not None
    src, dst = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {_text(src)} {_text(dst)} {source[1]} {destination[1]}\r\n".encode()


def _text(ip: IP) -> str:
    """As ``inet_ntop`` writes it (the engine's spelling: ``::ffff:127.0.0.1``)."""
    return socket.inet_ntop(socket.AF_INET if ip.version == 4 else socket.AF_INET6, ip.packed)


def tlv(kind: int, value: bytes) -> bytes:
    """One version 2 TLV: type, 16-bit length, value."""
    return struct.pack("!BH", kind, len(value)) + value


def v2(source: Address | None, destination: Address | None, tlvs: Iterable[bytes] = ()) -> bytes:
    """The version 2 (binary) header, with ``tlvs`` (each made by :func:`tlv`) after the addresses.

    Addresses that cannot be said make a ``LOCAL`` header, which carries no
    TLV either: the receiver ignores everything after its length field.
    """
    pair = _pair(source, destination)
    if pair is None:
        return V2_SIGNATURE + struct.pack("!BBH", LOCAL, UNSPEC, 0)
    assert source is not None and destination is not None
    src, dst = pair
    family = TCP4 if src.version == 4 else TCP6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + b"".join(tlvs)
    return V2_SIGNATURE + struct.pack("!BBH", PROXY, family, len(body)) + body


def header(
    version: int, source: Address | None, destination: Address | None, tlvs: Iterable[bytes] = ()
) -> bytes:
    """The header of ``version`` (1 or 2); TLVs are version 2's only."""
    return v1(source, destination) if version == 1 else v2(source, destination, tlvs)
